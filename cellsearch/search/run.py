"""Run directories: create a search, reopen it, and drive it on an executor.

A run directory holds

``config.yaml``
    the resolved search config (every key, with the storage URL filled in);
``versions.json``
    the versions of python, torch, ray, optuna, pandas, numpy, networkx,
    sqlalchemy and cellsearch that started the run;
``run.json``
    the run id and storage URL (how ``resume`` and ``load_run`` find the database);
``run.db``
    the SQLite database, unless ``storage`` names another database.
"""

from __future__ import annotations

import functools
import json
import platform
import signal
import sys
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from cellsearch.config import from_mapping, load_yaml
from cellsearch.errors import UserError
from cellsearch.search.config import SearchConfig, resolve_ptb_dir
from cellsearch.search.driver import Progress, SearchDriver
from cellsearch.search.storage import RunStorage, normalize_url, sqlite_url

__all__ = ["package_versions", "create_run", "open_run", "make_executor", "drive", "stop_on_signals",
           "task_loader", "read_run_info"]

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
    return json.loads(path.read_text(encoding="utf-8"))


def create_run(config: SearchConfig, run_dir: str | Path) -> tuple[SearchConfig, RunStorage]:
    """A new run: directory, resolved config, versions and an empty database."""
    run_dir = Path(run_dir)
    if (run_dir / "run.json").exists():
        raise UserError(f"{run_dir} already holds a search; continue it with `cellsearch resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = config.with_overrides(storage=normalize_url(config.storage or sqlite_url(run_dir / "run.db")),
                                     ptb_dir=resolve_ptb_dir(config))
    storage = RunStorage(resolved.storage, create=True)
    existing = storage.run_row()
    if existing is not None:
        storage.close()
        raise UserError(f"the database {_redacted(resolved.storage)} already holds run {existing['run_id']}; "
                        f"give each search its own database")
    run_id = uuid.uuid4().hex
    versions = package_versions()
    storage.create_run(run_id, resolved.to_yaml(), versions)
    (run_dir / "config.yaml").write_text(resolved.to_yaml(), encoding="utf-8")
    (run_dir / "versions.json").write_text(json.dumps(versions, indent=2) + "\n", encoding="utf-8")
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "storage": resolved.storage}, indent=2) + "\n",
                                      encoding="utf-8")
    return resolved, storage


def open_run(run_dir: str | Path, **overrides: Any) -> tuple[SearchConfig, RunStorage]:
    """Reopen a run for ``resume``; ``overrides`` (e.g. a larger ``max_steps``) are saved to its config."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    config = from_mapping(SearchConfig, load_yaml(run_dir / "config.yaml"))
    storage = RunStorage(info["storage"])
    row = storage.run_row()
    if row is None or row["run_id"] != info["run_id"]:
        storage.close()
        raise UserError(f"the database of {run_dir} does not hold run {info['run_id']}")
    changed = {k: v for k, v in overrides.items() if v is not None}
    if changed:
        config = config.with_overrides(**changed)
        (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        storage.update_config(config.to_yaml())
    return config, storage


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


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
