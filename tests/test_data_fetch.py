"""``cellsearch data fetch ptb`` and the per-user cache, against a local HTTP server (never the internet).

The server (127.0.0.1, a free port, a thread) serves copies of the shared Penn Treebank files under
``/good/``, a copy with one byte changed under ``/corrupt/``, a truncated one under ``/truncated/`` and
nothing under ``/missing/`` (HTTP 404).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from cellsearch.cli import main
from cellsearch.config import from_mapping
from cellsearch.errors import UserError
from cellsearch.search.config import SearchConfig, resolve_ptb_dir
from cellsearch.tasks import ptb

NAMES = tuple(ptb.FILES.values())


class _Server:
    def __init__(self, root: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, folder: str) -> str:
        return f"{self.base}/{folder}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory, ptb_dir):
    root = tmp_path_factory.mktemp("www")
    for folder in ("good", "corrupt", "truncated"):
        (root / folder).mkdir()
        for name in NAMES:
            shutil.copy(ptb_dir / name, root / folder / name)
    (root / "missing").mkdir()
    corrupt = root / "corrupt" / "ptb.train.txt"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    corrupt.write_bytes(bytes(data))
    truncated = root / "truncated" / "ptb.train.txt"
    truncated.write_bytes(truncated.read_bytes()[: 1 << 20])
    running = _Server(root)
    yield running
    running.close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty per-user cache; no CELLSEARCH_PTB_DIR, no mirror variable."""
    monkeypatch.setenv(ptb.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(ptb.ENV_VAR, raising=False)
    monkeypatch.delenv(ptb.URL_ENV_VAR, raising=False)
    return tmp_path / "cache" / "ptb"


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_known_sums_match_the_shared_copys_sha256sums(ptb_dir):
    sums = ptb_dir / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip("the shared copy has no SHA256SUMS")
    listed = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
    assert listed == ptb.SHA256


def test_cache_location_rule(monkeypatch, tmp_path):
    monkeypatch.setenv(ptb.CACHE_ENV_VAR, str(tmp_path / "mine"))
    assert ptb.cache_dir() == tmp_path / "mine" / "ptb"
    monkeypatch.delenv(ptb.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # platformdirs and the built-in XDG rule agree on Linux
    assert ptb.cache_dir() == tmp_path / "xdg" / "cellsearch" / "ptb"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ptb.cache_dir() == tmp_path / "home" / ".cache" / "cellsearch" / "ptb"
    # without platformdirs: the XDG rule, which ignores a relative XDG_CACHE_HOME
    monkeypatch.setitem(sys.modules, "platformdirs", None)
    assert ptb.cache_dir() == tmp_path / "home" / ".cache" / "cellsearch" / "ptb"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ptb.cache_dir() == tmp_path / "xdg" / "cellsearch" / "ptb"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert ptb.cache_dir() == tmp_path / "home" / ".cache" / "cellsearch" / "ptb"


def test_fetch_verifies_and_does_not_download_twice(server, cache):
    seen = []
    assert ptb.fetch(base_url=server.url("good"), report=lambda name, what: seen.append((name, what))) == cache
    assert _files(cache) == sorted(NAMES)  # no temporary file left
    for name in NAMES:
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == ptb.SHA256[name]
    assert {what for _, what in seen} == {"downloaded"}
    ptb.verify(cache)
    before = len(server.requests)
    seen.clear()
    ptb.fetch(base_url=server.url("good"), report=lambda name, what: seen.append((name, what)))
    assert len(server.requests) == before  # nothing downloaded again
    assert {what for _, what in seen} == {"present"}


def test_a_damaged_file_in_place_is_downloaded_again(server, tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    for name in NAMES:
        (target / name).write_text("not the treebank\n")
    ptb.fetch(target, base_url=server.url("good"))
    ptb.verify(target)


@pytest.mark.parametrize("folder", ["corrupt", "truncated"])
def test_corrupt_or_truncated_download_is_refused_and_not_kept(server, cache, folder):
    with pytest.raises(UserError) as caught:
        ptb.fetch(base_url=server.url(folder))
    message = str(caught.value)
    assert "\n" not in message
    assert "ptb.train.txt" in message and f"expected {ptb.SHA256['ptb.train.txt']}" in message
    assert "has SHA-256 " in message and "not kept" in message
    assert _files(cache) == []  # neither the file nor its temporary copy


def test_http_error_is_one_line(server, cache):
    with pytest.raises(UserError, match=r"^cannot download ptb.train.txt: .*/missing/ptb.train.txt answered "
                                        r"HTTP 404 [^\n]*$"):
        ptb.fetch(base_url=server.url("missing"))
    assert _files(cache) == []


def test_timeout_and_refused_connection_are_one_line(cache):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts connections in the backlog, never answers
    try:
        with pytest.raises(UserError, match=r"^cannot download ptb.train.txt from .*: timed out[^\n]*$"):
            ptb.fetch(base_url=f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.5)
    finally:
        silent.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(UserError, match=r"^cannot download ptb.train.txt from [^\n]*$"):
        ptb.fetch(base_url=f"http://127.0.0.1:{port}/", timeout=5)
    assert _files(cache) == []


def test_cli_fetch_and_path(server, cache, capsys):
    assert main(["data", "path", "ptb"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("cellsearch data: error: no Penn Treebank directory given")
    assert "cellsearch data fetch ptb" in error and "\n" not in error

    assert main(["data", "fetch", "ptb", "--url", server.url("good")]) == 0
    out = capsys.readouterr().out
    assert f"Penn Treebank in {cache.resolve()}" in out
    assert out.count("downloaded, checksum verified") == 3
    assert main(["data", "path", "ptb"]) == 0
    assert capsys.readouterr().out.strip() == str(cache.resolve())

    assert main(["data", "fetch", "ptb", "--url", server.url("good")]) == 0
    assert capsys.readouterr().out.count("already present, checksum verified") == 3


def test_cli_fetch_into_a_directory_and_errors(server, cache, tmp_path, capsys, monkeypatch):
    target = tmp_path / "elsewhere"
    monkeypatch.setenv(ptb.URL_ENV_VAR, server.url("good"))  # a mirror through the environment
    assert main(["data", "fetch", "ptb", "--dir", str(target)]) == 0
    assert f"Penn Treebank in {target.resolve()}" in capsys.readouterr().out
    ptb.verify(target)
    assert _files(cache) == []
    assert main(["data", "fetch", "ptb", "--url", server.url("corrupt")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("cellsearch data: error: downloaded ptb.train.txt")
    assert main(["data", "fetch", "ptb", "--url", server.url("missing")]) == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_task_resolution_uses_the_cache(cache, ptb_dir, tmp_path, monkeypatch):
    config = from_mapping(SearchConfig, {"tasks": ["ptb"]})
    with pytest.raises(UserError, match="cellsearch data fetch ptb"):
        resolve_ptb_dir(config)
    with pytest.raises(UserError, match="no Penn Treebank directory given.*cellsearch data fetch ptb"):
        ptb.find_data_dir()
    cache.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(ptb_dir / name, cache / name)
    assert resolve_ptb_dir(config) == str(cache.resolve())
    assert ptb.find_data_dir() == cache
    assert ptb.default_data_dir() == cache
    # the way the project loads tasks (get_task caches per process: start from a clean cache)
    from cellsearch import tasks

    tasks._load.cache_clear()
    try:
        task = tasks.get_task("ptb")
        assert task.source == str(cache)
    finally:
        tasks._load.cache_clear()
    # $CELLSEARCH_PTB_DIR wins over the cache, an explicit directory over both
    other = tmp_path / "other"
    shutil.copytree(ptb_dir, other)
    monkeypatch.setenv(ptb.ENV_VAR, str(other))
    assert resolve_ptb_dir(config) == str(other.resolve())
    assert ptb.find_data_dir() == other
    assert resolve_ptb_dir(config.with_overrides(ptb_dir=str(ptb_dir))) == str(ptb_dir.resolve())
    assert ptb.find_data_dir(ptb_dir) == ptb_dir


def test_a_corrupt_cache_is_not_used(cache, ptb_dir):
    cache.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(ptb_dir / name, cache / name)
    with open(cache / "ptb.test.txt", "a") as handle:
        handle.write("extra\n")
    assert ptb.cached_copy() is None
    with pytest.raises(UserError, match="cellsearch data fetch ptb"):
        ptb.find_data_dir()
