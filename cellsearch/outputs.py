"""Output paths users name (``export OUT``, ``report --out``, ``retrain --out``, ``show --png``).

An output directory that is an existing file, or lies under one, and a PNG path that is a
directory are the user's mistakes, not the program's: each is one line and exit status 2 in the
CLI (:class:`~cellsearch.errors.UserError`) instead of a ``FileExistsError`` traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from cellsearch.errors import UserError

__all__ = ["output_directory", "output_file"]


def output_directory(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create directory ``path`` (and its parents) if needed and return it; one-line errors otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot create the {what} {path}: a part of that path is a file") from None
    except OSError as error:
        raise UserError(f"cannot create the {what} {path}: {error.strerror or error}") from None
    return path


def output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that a file can be written at ``path`` (not a directory, in an existing directory); return it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"the {what} {path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        reason = "is not a directory" if parent.exists() or _under_a_file(parent) else "does not exist"
        raise UserError(f"cannot write the {what} {path}: {parent} {reason}")
    return path


def _under_a_file(path: Path) -> bool:
    return any(ancestor.is_file() for ancestor in (path, *path.parents))
