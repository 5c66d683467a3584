"""Run directories: create a search, reopen it, and drive it on an executor.

A run directory holds

``config.yaml``
    the resolved search config (every key, with the storage URL filled in, without its password);
``versions.json``
    the versions of python, torch, ray, optuna, pandas, numpy, networkx,
    sqlalchemy and cellsearch that started the run;
``run.json``
    the run id and storage URL (how ``resume`` and ``load_run`` find the database);
``run.db``
    the SQLite database, unless ``storage`` names another database.

No file and no table holds a database password: a storage URL given with one
is used for the session that created the run, with a warning, and stored
without it; ``resume`` and ``load_run`` connect with the password from the
environment (``PGPASSWORD``, ``~/.pgpass`` or ``$CELLSEARCH_STORAGE_URL``, see
:func:`cellsearch.search.storage.connect_url`). Both ``create_run`` and
``open_run`` first prove the run directory writable by writing a file there.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import signal
import sys
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa

from cellsearch.config import from_mapping, load_yaml, read_data_file
from cellsearch.errors import UserError
from cellsearch.search.config import SearchConfig, resolve_ptb_dir
from cellsearch.search.driver import Progress, SearchDriver
from cellsearch.search.storage import RunStorage, STORAGE_URL_ENV, connect_url, has_password, normalize_url, \
    redact_url, remember_url, sqlite_path, sqlite_url

__all__ = ["package_versions", "create_run", "open_run", "make_executor", "drive", "stop_on_signals",
           "task_loader", "read_run_info", "ensure_writable"]

_PACKAGES = ("torch", "ray", "optuna", "pandas", "numpy", "networkx", "sqlalchemy", "cellsearch")


def package_versions() -> dict[str, str]:
    """Versions of the interpreter and the packages whose behaviour a search result depends on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory (run id and storage URL)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a search run directory (no run.json)")
    info = read_data_file(path, UserError, "run file", fmt="json")
    if not (isinstance(info, dict) and isinstance(info.get("run_id"), str) and isinstance(info.get("storage"), str)):
        raise UserError(f"{path} is not a run file this cellsearch wrote (it needs run_id and storage)")
    # The default database is run.db inside the run directory, stored by absolute path: a run directory
    # moved or copied elsewhere holds its own run.db, and that one is meant (a copy must not write into
    # the original's database). The URL is parsed, not matched as text: the path in it is escaped (a
    # directory may be named `q?mark`).
    try:
        stored = sqlite_path(info["storage"])
    except (sa.exc.ArgumentError, ValueError):
        raise UserError(f"{path} holds a storage URL this cellsearch cannot read") from None
    local = Path(run_dir).resolve() / "run.db"
    if stored is not None and stored.name == "run.db" and stored.parent != local.parent and local.is_file():
        info = {**info, "storage": sqlite_url(local)}
    return info


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and prove it writable by writing (and removing) a file in it.

    A real write, not a permission check: root passes every permission check but not an immutable
    directory, a read-only mount or a full disk.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the run directory {run_dir}: {error.strerror or error}") from None
    probe = run_dir / f".cellsearch-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"cellsearch\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise UserError(f"the run directory {run_dir} is not writable: {error.strerror or error}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a read-only file system may refuse even a missing file; the error above says why
            pass


def _write_file(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temporary file renamed over it): a kill never leaves half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def create_run(config: SearchConfig, run_dir: str | Path,
               log: Callable[[str], None] | None = None) -> tuple[SearchConfig, RunStorage]:
    """A new run: directory, resolved config, versions and an empty database.

    A storage URL with a password is used for this session only (``log`` gets a warning); every
    stored copy of the URL has no password.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    run_dir = Path(run_dir)
    if (run_dir / "run.json").exists():
        raise UserError(f"{run_dir} already holds a search; continue it with `cellsearch resume {run_dir}`")
    ptb_dir = resolve_ptb_dir(config)  # before the directory exists: a bad data directory leaves nothing behind
    ensure_writable(run_dir)
    url = normalize_url(config.storage or sqlite_url(run_dir / "run.db"))
    if has_password(url):
        remember_url(url)
        log(f"warning: the password in the storage URL is used for this session but not stored; `cellsearch "
            f"resume` and load_run take it from PGPASSWORD, ~/.pgpass or ${STORAGE_URL_ENV}")
    else:
        url = connect_url(url)
    resolved = config.with_overrides(storage=redact_url(url), ptb_dir=ptb_dir)
    storage = RunStorage(url, create=True, retry_s=resolved.storage_retry_s, log=log)
    existing = storage.run_row()
    if existing is not None:
        storage.close()
        raise UserError(f"the database {storage.display_url} already holds run {existing['run_id']}; "
                        f"give each search its own database")
    run_id = uuid.uuid4().hex
    versions = package_versions()
    # The files first, the database's run row last: a kill between the two leaves a run that `resume`
    # finishes creating (open_run), never a database row that no run directory points to.
    _write_file(run_dir / "config.yaml", resolved.to_yaml())
    _write_file(run_dir / "versions.json", json.dumps(versions, indent=2) + "\n")
    _write_file(run_dir / "run.json", json.dumps({"run_id": run_id, "storage": resolved.storage}, indent=2) + "\n")
    storage.create_run(run_id, resolved.to_yaml(), versions)
    return resolved, storage


def open_run(run_dir: str | Path, log: Callable[[str], None] | None = None,
             **overrides: Any) -> tuple[SearchConfig, RunStorage]:
    """Reopen a run for ``resume``; ``overrides`` (e.g. a larger ``max_steps``) are saved to its config.

    The database is reached with the stored URL and the password from the environment
    (:func:`~cellsearch.search.storage.connect_url`).
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    config = from_mapping(SearchConfig, load_yaml(run_dir / "config.yaml"))
    ensure_writable(run_dir)
    storage = RunStorage(connect_url(info["storage"]), retry_s=config.storage_retry_s, log=log)
    row = storage.run_row()
    if row is None:
        # `cellsearch search` was stopped after writing run.json but before its first transaction.
        log(f"finishing the creation of run {info['run_id']} (its first start was interrupted)")
        versions_file = run_dir / "versions.json"
        versions = json.loads(versions_file.read_text(encoding="utf-8")) if versions_file.is_file() else {}
        storage.create_run(info["run_id"], config.to_yaml(), versions or package_versions())
    elif row["run_id"] != info["run_id"]:
        storage.close()
        raise UserError(f"the database of {run_dir} does not hold run {info['run_id']}")
    changed = {k: v for k, v in overrides.items() if v is not None}
    if changed:
        config = config.with_overrides(**changed)
        _write_file(run_dir / "config.yaml", config.to_yaml())
        storage.update_config(config.to_yaml())
    return config, storage


@functools.lru_cache(maxsize=16)
def _cached_task(name: str, data_dir: str | None):
    from cellsearch.tasks import get_task

    return get_task(name, data_dir=data_dir)


def task_loader(config: SearchConfig) -> Callable[[str], Any]:
    """``name -> Task`` for the search's tasks (ptb from the config's data directory).

    Cached per process: the driver reads a task's space and the executor puts its data in
    the object store, and PTB should be read once for both.
    """
    def load(name: str):
        return _cached_task(name, config.ptb_dir if name == "ptb" else None)

    return load


def make_executor(config: SearchConfig, executor: str = "ray", workers: int | None = None,
                  address: str | None = None):
    """A :class:`RayExecutor` (embedded Ray with ``workers`` CPUs, or the cluster at ``address``) or a serial one."""
    from cellsearch.search.executors import RayExecutor, SerialExecutor

    if executor == "serial":
        return SerialExecutor(task_loader(config))
    if executor != "ray":
        raise UserError(f"unknown executor {executor!r} (ray or serial)")
    try:
        return RayExecutor(task_loader(config), config.resources, address=address, num_cpus=workers)
    except UserError:  # --workers below 1, or ClusterUnreachable (its own line already names the address)
        raise
    except ConnectionError as error:
        raise UserError(f"cannot attach to the Ray cluster at {address or 'RAY_ADDRESS'}: {error}") from None


@contextmanager
def stop_on_signals(driver: SearchDriver, log: Callable[[str], None]) -> Iterator[None]:
    """Ctrl-C: finish running units, start nothing new (twice: stop at once); SIGTERM: stop at once.

    Units stopped at once stay pending in the database and re-run on resume.
    """
    def on_interrupt(signum, frame):
        if driver.stop_mode is None:
            log("interrupted: finishing the running units (Ctrl-C again to stop now; they re-run on resume)")
            driver.request_stop("drain")
        else:
            log("stopping now; unfinished units re-run on resume")
            driver.request_stop("abandon")

    def on_terminate(signum, frame):
        log("terminated: stopping now; unfinished units re-run on resume")
        driver.request_stop("abandon")

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_terminate)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def drive(config: SearchConfig, storage: RunStorage, executor, on_progress: Callable[[Progress], None] | None = None,
          log: Callable[[str], None] | None = None) -> tuple[Progress, str | None]:
    """Run the search to its end (or a stop) with signal handling; returns the progress and the stop mode."""
    log = log or (lambda message: print(message, file=sys.stderr))
    driver = SearchDriver(config, storage, executor, task_loader(config), on_progress=on_progress, log=log)
    try:
        with stop_on_signals(driver, log):
            progress = driver.run()
    finally:
        executor.close()
    return progress, driver.stop_mode
