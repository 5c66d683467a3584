"""Output paths users name (``export OUT``, ``report --out``, ``retrain --out``, ``show --png``).

An output directory that is an existing file, or lies under one, and a PNG path that is a
directory are the user's mistakes, not the program's: each is one line and exit status 2 in the
CLI (:class:`~cellsearch.errors.UserError`) instead of a ``FileExistsError`` traceback.

:func:`replaced_directory` writes a whole output folder (``report``, ``export``) the safe way: into a
fresh temporary directory next to the target, which then takes the target's place in one atomic
step (``renameat2(RENAME_EXCHANGE)`` on Linux), so a kill at any moment leaves the old complete
output or the new one, never a mix. Only an empty directory or an earlier output of the same command
(recognised by its :data:`MARKER` file) is replaced; anything else needs ``--force``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from cellsearch.errors import UserError

__all__ = ["output_directory", "output_file", "replaced_directory", "MARKER"]

#: The file that marks a folder as the output of a cellsearch command (``{"command": ..., "written_at": ...}``).
MARKER = ".cellsearch-output"


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


def _marker_command(path: Path) -> str | None:
    try:
        record = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("command") if isinstance(record, dict) else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system without the exchange: the two-rename fallback below
    raise OSError(code, os.strerror(code), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(target: Path) -> None:
    """Remove staging folders of killed earlier runs, and put back an output a killed swap left aside."""
    prefix = f".{target.name}.cellsearch-"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        kind, _, pid = entry.name[len(prefix):].partition("-")
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(entry, target)  # the fallback swap was killed between its two renames
                continue
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def replaced_directory(target: str | os.PathLike, command: str, what: str = "output directory",
                       force: bool = False) -> Iterator[Path]:
    """A fresh directory to write into; on success it atomically becomes ``target`` (see the module docstring).

    ``target`` may be missing, an empty directory or an earlier output of ``command``; anything else
    is refused in one line unless ``force``. On an error the staging directory is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"the {what} {target} exists and is not a directory")
    output_directory(target.parent, f"parent of the {what}")
    _clean_leftovers(target)
    if target.is_dir() and not force:
        try:
            names = [entry.name for entry in os.scandir(target)]
        except OSError as error:
            raise UserError(f"cannot read the {what} {target}: {error.strerror or error}") from None
        previous = _marker_command(target)
        if names and previous != command:
            why = f"an output of `{previous}`" if previous else "not an output of this command"
            raise UserError(f"the {what} {target} already exists and is {why} (it holds {len(names)} entries); "
                            f"give a new directory, or --force to replace it")
    staging = target.parent / f".{target.name}.cellsearch-new-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
    except OSError as error:
        raise UserError(f"cannot create the {what} next to {target}: {error.strerror or error}") from None
    try:
        yield staging
        (staging / MARKER).write_text(json.dumps({"command": command, "written_at": time.time()}) + "\n",
                                      encoding="utf-8")
        if target.exists():
            if not _exchange(staging, target):
                aside = target.parent / f".{target.name}.cellsearch-old-{os.getpid()}"
                os.rename(target, aside)
                os.rename(staging, target)
                staging = aside
        else:
            os.rename(staging, target)
            return
    except OSError as error:
        raise UserError(f"cannot write the {what} {target}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the new folder on failure, the old output on success
