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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
import yaml

from cellsearch.config import from_mapping, load_yaml, read_data_file
from cellsearch.errors import UserError
from cellsearch.search.config import SearchConfig, resolve_ptb_dir
from cellsearch.search.driver import Progress, SearchDriver
from cellsearch.search.lock import DATABASE_LOCK_SUFFIX, LOCK_NAME, acquire as acquire_lock, \
    check_free as check_lock_free
from cellsearch.search.storage import DEFAULT_RETRY_S, RunStorage, STORAGE_URL_ENV, connect_url, has_password, \
    normalize_url, redact_url, remember_url, sqlite_path, sqlite_url

__all__ = ["package_versions", "create_run", "open_run", "make_executor", "drive", "stop_on_signals",
           "task_loader", "read_run_info", "ensure_writable", "check_run_directory", "config_changes",
           "check_version", "RUN_FILES", "Outcome", "run_outcome"]

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


#: Names a run directory may hold, besides the lock, write probes and temporary files (hidden names).
RUN_FILES = frozenset({"config.yaml", "versions.json", "run.json", "run.db", "run.db-wal", "run.db-shm",
                       "run.db-journal", "report"})


def check_run_directory(run_dir: Path) -> None:
    """Refuse an existing directory that holds files a search did not write (``--run-dir`` given by mistake).

    An empty directory, or one left by a search stopped before its ``run.json`` (only the files a
    search writes), is fine; anything else is the user's, and a search must not mix its files in.
    """
    try:
        names = sorted(entry.name for entry in os.scandir(run_dir))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        if not run_dir.exists():
            return  # a parent is a file: ensure_writable says "cannot create the run directory" and why
        raise UserError(f"the run directory {run_dir} exists and is not a directory") from None
    except OSError as error:
        raise UserError(f"cannot read the run directory {run_dir}: {error.strerror or error}") from None
    foreign = [name for name in names if not (name in RUN_FILES or name == LOCK_NAME or name.startswith(
        ".cellsearch-write-test-") or (name.startswith(".") and name.endswith((".tmp", DATABASE_LOCK_SUFFIX))))]
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--run-dir {run_dir} already holds files that are not a cellsearch run ({listed}); give a "
                        f"new or empty directory")


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
        check_lock_free(run_dir, f"the run directory {run_dir}")  # a running search is named
        raise UserError(f"{run_dir} already holds a search; continue it with `cellsearch resume {run_dir}`")
    check_run_directory(run_dir)
    ptb_dir = resolve_ptb_dir(config)  # before the directory exists: a bad data directory leaves nothing behind
    if "ptb" in config.all_tasks:
        # read and checksum-verified now (cached: the driver reuses it), so that corrupt or unreadable data
        # fails before a run directory exists whose config would pin that data directory
        _cached_task("ptb", ptb_dir)
    ensure_writable(run_dir)
    url = normalize_url(config.storage or sqlite_url(run_dir / "run.db"))
    # One driver per run: the lock comes before anything else is written (two searches racing for a new
    # run directory: one wins, the other refuses naming it; run.json is written by the winner only).
    lock = acquire_lock(run_dir, f"the run directory {run_dir}", connect_url(url) if not has_password(url) else url,
                        redact_url(url), command="cellsearch search", log=log)
    try:
        return _create_locked(config, run_dir, url, ptb_dir, lock, log)
    except BaseException:
        lock.release()
        raise


def _create_locked(config: SearchConfig, run_dir: Path, url: str, ptb_dir: str | None, lock,
                   log: Callable[[str], None]) -> tuple[SearchConfig, RunStorage]:
    if (run_dir / "run.json").exists():  # created by a driver that held the lock just before this one
        raise UserError(f"{run_dir} already holds a search; continue it with `cellsearch resume {run_dir}`")
    if has_password(url):
        remember_url(url)
        log(f"warning: the password in the storage URL is used for this session but not stored; `cellsearch "
            f"resume` and load_run take it from PGPASSWORD, ~/.pgpass or ${STORAGE_URL_ENV}")
    else:
        url = connect_url(url)
    resolved = config.with_overrides(storage=redact_url(url), ptb_dir=ptb_dir)
    storage = RunStorage(url, create=True, retry_s=resolved.storage_retry_s, log=log)
    storage.hold(lock.release)
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
    (:func:`~cellsearch.search.storage.connect_url`). The run's lock is taken before anything is
    written (a second ``resume`` refuses, naming the first). The config stored in the database is
    the run's config: a ``config.yaml`` edited since is refused with the changed keys (a missing one
    is written again); ``max_steps`` may grow, or shrink to no fewer steps than were started, and
    the change is stored in the database first, so every reader sees it.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if info.get("archive"):  # before a lock file or a Ray instance: an archive is read, never resumed
        raise UserError(f"{run_dir} is an archive of a run (cellsearch archive): top, show, export, report and "
                        f"load_run read it; a search cannot continue from it")
    config_file = run_dir / "config.yaml"
    file_config = from_mapping(SearchConfig, load_yaml(config_file)) if config_file.is_file() else None
    retry_s = file_config.storage_retry_s if file_config is not None else DEFAULT_RETRY_S
    ensure_writable(run_dir)
    url = connect_url(info["storage"])
    _check_database_file(run_dir, url)
    lock = acquire_lock(run_dir, f"the run directory {run_dir}", url, redact_url(url), command="cellsearch resume",
                        log=log)
    try:
        storage = RunStorage(url, retry_s=retry_s, log=log)
    except BaseException:
        lock.release()
        raise
    storage.hold(lock.release)
    try:
        return _open_locked(run_dir, info, file_config, storage, overrides, log)
    except BaseException:
        storage.close()
        raise


def _open_locked(run_dir: Path, info: dict[str, Any], file_config: SearchConfig | None, storage: RunStorage,
                 overrides: dict[str, Any], log: Callable[[str], None]) -> tuple[SearchConfig, RunStorage]:
    config_file = run_dir / "config.yaml"
    row = storage.run_row()
    if row is None:
        if not sa.inspect(storage.engine).has_table("cs_run"):
            # `search` creates the tables before it writes run.json: a database without them was replaced.
            raise UserError(f"the run database {storage.display_url} holds no cellsearch tables (it was emptied or "
                            f"replaced); restore it from a backup, or start a new search")
        if file_config is None:
            raise UserError(f"{config_file} is missing and the database holds no config; start a new search")
        # `cellsearch search` was stopped after writing run.json but before its first transaction.
        log(f"finishing the creation of run {info['run_id']} (its first start was interrupted)")
        versions_file = run_dir / "versions.json"
        versions = json.loads(versions_file.read_text(encoding="utf-8")) if versions_file.is_file() else {}
        storage.create_run(info["run_id"], file_config.to_yaml(), versions or package_versions())
        config = file_config
    elif row["run_id"] != info["run_id"]:
        raise UserError(f"the database of {run_dir} does not hold run {info['run_id']}")
    else:
        config = from_mapping(SearchConfig, yaml.safe_load(row["config_yaml"]))
        check_version(run_dir, row, log)
        if file_config is not None:
            changes = config_changes(config, file_config)
            if changes:
                raise UserError(f"{config_file} differs from the config stored with the run ({changes}); the stored "
                                f"config is the run's: undo the edit, or delete {config_file.name} to have it "
                                f"written again (--max-steps changes the length)")
    changed = {k: v for k, v in overrides.items() if v is not None and v != getattr(config, k)}
    if "max_steps" in changed:
        counts = storage.counts()
        started, done = counts["search_steps"], counts["search_steps_done"]
        if changed["max_steps"] < started:
            raise UserError(f"--max-steps {changed['max_steps']} is below the {started} search steps this run has "
                            f"already started ({done} done); give at least {started}")
    if changed:
        config = config.with_overrides(**changed)
        # the database first: it is what every reader (resume, top, report, load_run) goes by
        storage.update_config(config.to_yaml())
        _write_file(config_file, config.to_yaml())
    elif file_config is None:
        log(f"note: {config_file} was missing; written again from the run database")
        _write_file(config_file, config.to_yaml())
    return config, storage


def config_changes(old: SearchConfig, new: SearchConfig, limit: int = 6) -> str:
    """``key: old -> new, ...`` for the keys whose values differ (nested keys dotted), at most ``limit`` shown."""
    from cellsearch.config import to_mapping
    from cellsearch.errors import shown

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                out.update(flat(item, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: value}

    before, after = flat(to_mapping(old)), flat(to_mapping(new))
    keys = [key for key in dict.fromkeys([*before, *after]) if before.get(key) != after.get(key)]
    text = ", ".join(f"{key}: {shown(before.get(key), 30)} -> {shown(after.get(key), 30)}" for key in keys[:limit])
    return text + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_database_file(run_dir: Path, url: str) -> None:
    """A SQLite run database that is missing or 0 bytes is named as such (SQLite would make an empty one).

    A copied run directory without its run.db is refused too: its run.json still names the original's
    database, and a copy must never write into the original's run.
    """
    database = sqlite_path(url)
    if database is None:
        return
    database = database.resolve()
    local = run_dir.resolve() / "run.db"
    if database != local and database.name == "run.db" and (database.parent / "run.json").is_file():
        raise UserError(f"the run database {local} of {run_dir} is missing (its run.json names {database}, the "
                        f"database of the run directory {database.parent}); restore it, or resume that run instead")
    if not database.exists():
        raise UserError(f"the run database {database} of {run_dir} is missing; restore it from a backup, or start "
                        f"a new search")
    if database.is_file() and database.stat().st_size == 0:
        raise UserError(f"the run database {database} of {run_dir} is empty (0 bytes: truncated or replaced); "
                        f"restore it from a backup, or start a new search")


def check_version(run_dir: Path, row: Any, log: Callable[[str], None]) -> None:
    """A run started by another cellsearch version is accepted with one warning line."""
    try:
        started = json.loads(row["versions_json"]).get("cellsearch")
    except (ValueError, AttributeError, TypeError):
        started = None
    current = package_versions().get("cellsearch")
    if started and current and started != current:
        log(f"warning: {run_dir} was started by cellsearch {started}, this is {current}; continuing it (see "
            f"versions.json)")


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
                  address: str | None = None, load_task: Callable[[str], Any] | None = None):
    """A :class:`RayExecutor` (embedded Ray with ``workers`` CPUs, or the cluster at ``address``) or a serial one.

    Attached to a cluster, the executor checks every node first (see
    :meth:`~cellsearch.search.executors.RayExecutor.check_nodes`): ``search`` makes it before the run
    directory exists, with ``load_task`` reading the tasks of the config that ``create_run`` resolves later.
    """
    from cellsearch.search.executors import RayExecutor, SerialExecutor

    load_task = load_task or task_loader(config)
    if executor == "serial":
        return SerialExecutor(load_task)
    if executor != "ray":
        raise UserError(f"unknown executor {executor!r} (ray or serial)")
    try:
        return RayExecutor(load_task, config.resources, address=address, num_cpus=workers)
    except UserError:  # --workers below 1, or ClusterUnreachable (its own line already names the address)
        raise
    except ConnectionError as error:
        raise UserError(f"cannot attach to the Ray cluster at {address or 'RAY_ADDRESS'}: {error}") from None


@dataclass(frozen=True)
class Outcome:
    """What a search that ran to its end left behind, beyond its results: the reasons it cannot report success.

    ``lost_units``: units still pending although the driver stopped on its own (lost to system failures
    after every retry: they re-run on resume); ``errors``: evaluations recorded with status ``error`` (a
    unit whose code raised: scored 0, as the cell's result); ``reference_missing``: tasks on which the
    reference cell has no positive best score, so that no ratio (no score of any cell) means anything.
    """

    lost_units: int
    errors: int
    reference_missing: tuple[str, ...]


def run_outcome(config: SearchConfig, storage: RunStorage) -> Outcome:
    """The :class:`Outcome` of the run in ``storage`` as committed now."""
    from cellsearch import zoo
    from cellsearch.search.storage import EVALUATIONS, UNITS

    def count(connection, query) -> int:
        return int(connection.execute(query).scalar_one())

    def read(connection) -> tuple[int, int]:
        return (count(connection, sa.select(sa.func.count()).select_from(UNITS).where(UNITS.c.status == "pending")),
                count(connection, sa.select(sa.func.count()).select_from(EVALUATIONS).where(
                    EVALUATIONS.c.status == "error")))

    def attempt() -> tuple[int, int]:
        with storage.engine.connect() as connection:
            return read(connection)

    lost, errors = storage.retry(attempt, "count pending units and errors")
    reference = zoo.get(config.reference_cell).hash
    best = storage.best_scores()
    missing = tuple(task for task in config.tasks if not best.get((reference, task), 0.0) > 0)
    return Outcome(lost, errors, missing)


@contextmanager
def stop_on_signals(driver: SearchDriver, log: Callable[[str], None]) -> Iterator[None]:
    """Ctrl-C: finish running units, start nothing new (twice: stop at once); SIGTERM: stop at once.

    Units stopped at once stay pending in the database and re-run on resume.
    """
    def stop_now() -> None:
        driver.request_stop("abandon")
        stop = getattr(driver.executor, "stop", None)
        if stop is not None:
            stop()  # the serial executor ends its unit after the current training step

    def on_interrupt(signum, frame):
        if driver.stop_mode is None:
            log("interrupted: finishing the running units (Ctrl-C again to stop now; they re-run on resume)")
            driver.request_stop("drain")
        else:
            log("stopping now; unfinished units re-run on resume")
            stop_now()

    def on_terminate(signum, frame):
        log("terminated: stopping now; unfinished units re-run on resume")
        stop_now()

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
