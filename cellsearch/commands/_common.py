"""Helpers shared by CLI subcommands."""

from __future__ import annotations

import os
from pathlib import Path

from cellsearch.errors import UserError
from cellsearch.zoo import resolve_cell

__all__ = ["resolve_cell", "user_path", "in_ray_job", "RAY_JOB_ENV"]

#: Set by Ray's job supervisor for the entrypoint of `ray job submit` (the job's runtime env as JSON).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a `ray job submit` job."""
    return bool(os.environ.get(RAY_JOB_ENV))


def user_path(given: str | os.PathLike, option: str) -> Path:
    """An output path given on the command line, made absolute against the directory the command ran in.

    Absolute at once: Ray workers, lock files and SQLite URLs must all name the same directory whatever
    working directory they have. Inside a `ray job submit` job a relative path is refused: the job's
    working directory is Ray's temporary copy of ``--working-dir`` (deleted with the job) or wherever Ray
    was started, never the directory the user submitted from.
    """
    path = Path(given).expanduser()
    if not path.is_absolute() and in_ray_job():
        raise UserError(f"{option} {given} is relative, and this command runs as a Ray job, whose working directory "
                        f"is a temporary copy that Ray deletes: give an absolute {option} (on the node the job runs "
                        f"on, or a file system every node mounts)")
    return Path(os.path.abspath(path))
