"""Storage faults: a restarting PostgreSQL server, an unwritable run directory, a full disk, low free space,
and database passwords that must never be written down.

Every search here is the real CLI in a subprocess attached to the session's Ray (``--address``). The
PostgreSQL tests need the server of ``.ci/postgres.sh`` (``export CELLSEARCH_TEST_POSTGRES_URL="$(bash
.ci/postgres.sh)"``); they restart it, finding its data directory and ``pg_ctl`` from the server itself
(or ``CELLSEARCH_TEST_POSTGRES_DATA`` / ``CELLSEARCH_TEST_PG_CTL``). The disk tests mount small tmpfs
file systems (root), falling back to ``RLIMIT_FSIZE`` where mounting is not permitted.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from cellsearch.cli import main
from cellsearch.config import from_mapping
from cellsearch.results import load_run
from cellsearch.search.config import SearchConfig
from cellsearch.search.run import create_run
from searchchecks import POSTGRES_URL, TINY_SEARCH, admin_engine, assert_search_consistent, committed, \
    fresh_postgres_database, needs_postgres, read_only_engine
from cellsearch.search.storage import STORAGE_URL_ENV, RunStorage, StorageUnreachable, connect_url, normalize_url, \
    redact_url, sqlite_url

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
#: The tiny search of the fault tests: two tasks, seeds, a few steps (20 to 60 s on 2 cores).
CONFIG = TINY_SEARCH
#: The smallest search (one seed, one task, one setting, no filter task) for the credential checks.
TINY = {**CONFIG, "tasks": ["arithmetic"], "initial_cells": ["gru"], "memorize_task": None, "settings_per_task": 1,
        "reevaluate_probability": 0.0, "max_steps": 1}
#: Seed of the restart schedule (kept fixed so that a failure can be replayed).
RESTART_SEED = 20261128
#: Exit status of a search stopped by its storage (StorageFull) and its message.
EXIT_STORAGE_FULL = 74


# -- helpers --------------------------------------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no database credentials unless a test passes them."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", STORAGE_URL_ENV, "RAY_ADDRESS")}
    env.update(extra)
    return env


def start(args: list[str], address: str, env: dict[str, str] | None = None, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cellsearch.cli", *args, "--address", address, "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or clean_env(), preexec_fn=preexec_fn)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**CONFIG, **changes}))
    return path


def wait_for_evaluations(url: str, process: subprocess.Popen, count: int, timeout: float = 180) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while len(rows := committed(url)) < count:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the search made no progress"
        time.sleep(0.2)
    return rows


def assert_complete_and_consistent(url: str, run_dir: Path, snapshots: list[list[tuple]], max_steps: int) -> None:
    """The search reached its end, kept every snapshot of committed work, counted nothing twice, and
    every Optuna trial is finished with the committed score."""
    after = committed(url)
    for snapshot in snapshots:
        assert after[: len(snapshot)] == snapshot, "committed evaluations were lost or changed"
    assert_search_consistent(url, run_dir, max_steps)


def assert_one_line_stop(stderr: str, *fragments: str) -> None:
    """A storage stop ends with one clear line naming the cause and how to resume; no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "stopped:" in last and "committed work is safe" in last and "cellsearch resume" in last, stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, stderr[-3000:]


# -- the retry policy, in process ----------------------------------------------------------------------------------

def evaluation(trial: int, score: float = 0.5) -> dict:
    return {"trial_number": trial, "params_json": "{}", "seed": 1, "score": score, "status": "ok",
            "duration_s": 0.1, "train_steps": 1, "epochs": 1, "metrics_json": "{}", "curve_json": "[]",
            "node_id": "n", "worker_pid": 1, "hostname": "h"}


def test_transient_errors_are_retried_then_reported_in_one_line(tmp_path):
    # A SQLite file whose write lock another process holds: retried, each retry logged, then one line.
    logged: list[str] = []
    storage = RunStorage(sqlite_url(tmp_path / "run.db"), create=True, retry_s=2.0, log=logged.append)

    @sa.event.listens_for(storage.engine, "connect")
    def _short_busy_timeout(connection, _record):  # SQLite's own wait (30 s) would hide the retries
        connection.execute("PRAGMA busy_timeout=50")

    storage.engine.dispose()
    holder = sqlite3.connect(tmp_path / "run.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageUnreachable, match="database is locked.*storage_retry_s = 2.*committed work is safe"):
            storage.add_units([{"step": 0, "stage": 0, "cell_hash": "c", "task": "t", "slot": 0,
                                "settings_json": "[]"}])
        assert len(logged) >= 2 and all("record units failed (database is locked); retry" in m for m in logged)
        holder.execute("ROLLBACK")
        assert storage.add_units([{"step": 0, "stage": 0, "cell_hash": "c", "task": "t", "slot": 0,
                                   "settings_json": "[]"}]) == [1]
    finally:
        holder.close()
        storage.close()
    # A refused connection is transient too.
    refused = RunStorage(normalize_url("postgresql://nobody@127.0.0.1:1/none"), retry_s=0.6, log=lambda message: None)
    with pytest.raises(StorageUnreachable, match="Connection refused"):
        refused.run_row()
    refused.close()


def test_a_database_that_cannot_be_opened_is_not_a_full_disk(tmp_path):
    # SQLite's "unable to open database file" (its directory removed or moved away, a path it cannot use) once
    # read as a full disk: exit 74 and "after freeing space". It is its own error, with its own remedy.
    from cellsearch.search.storage import StorageCannotOpen, is_storage_full

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    storage = RunStorage(sqlite_url(run_dir / "run.db"), create=True, retry_s=1.0, log=lambda message: None)
    storage.engine.dispose()
    shutil.rmtree(run_dir)
    with pytest.raises(StorageCannotOpen) as caught:
        storage.active_steps()
    error = caught.value
    assert error.exit_status == 73 and not is_storage_full(error.__cause__)
    assert "unable to open database file" in str(error) and "space" not in f"{error} {error.remedy}"
    assert "absolute path" in error.remedy
    with pytest.raises(StorageCannotOpen):  # a new database in a directory that does not exist: the same
        RunStorage(sqlite_url(tmp_path / "missing" / "run.db"), create=True, retry_s=1.0)


def test_urls_are_stored_without_passwords_and_completed_from_the_environment():
    stored = redact_url("postgresql+psycopg2://alice:s3cret@db.example:5433/search?sslmode=require")
    assert stored == "postgresql+psycopg2://alice@db.example:5433/search?sslmode=require"
    assert redact_url("sqlite:////tmp/run.db") == "sqlite:////tmp/run.db"
    full = "postgresql://alice:s3cret@db.example:5433/search"
    assert connect_url(stored, {STORAGE_URL_ENV: full}).endswith("alice:s3cret@db.example:5433/search")
    # Another server or database: the variable is not for this run.
    assert connect_url(stored, {STORAGE_URL_ENV: "postgresql://alice:s3cret@db.example:5433/other"}) == stored
    assert connect_url(stored, {STORAGE_URL_ENV: "postgresql://alice:s3cret@elsewhere:5433/search"}) == stored
    assert connect_url(stored, {}) == stored


# -- PostgreSQL -----------------------------------------------------------------------------------------------------

class PostgresServer:
    """The test server, restarted with its own pg_ctl as the owner of its data directory."""

    def __init__(self, url: str):
        admin = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
        with admin.connect() as connection:
            data = connection.execute(sa.text("SHOW data_directory")).scalar_one()
            bindir = connection.execute(sa.text("SELECT setting FROM pg_config WHERE name = 'BINDIR'")).scalar_one()
        admin.dispose()
        self.data = Path(os.environ.get("CELLSEARCH_TEST_POSTGRES_DATA") or data)
        self.pg_ctl = os.environ.get("CELLSEARCH_TEST_PG_CTL") or str(Path(bindir) / "pg_ctl")
        owner = self.data.owner()
        # postgres refuses to run as root: act as the data directory's owner.
        self.prefix = ["runuser", "-u", owner, "--"] if os.geteuid() == 0 and owner != "root" else []

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-l", str(self.data / "server.log"), "-w",
                        "-t", "60", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=90)

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def start(self) -> None:
        # `restart` of a stopped server starts it with the options it last ran with (postmaster.opts).
        self._pg_ctl("restart", "-m", "fast")

    def running(self) -> bool:
        return subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "status"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


@pytest.fixture(scope="module")
def postgres_server():
    server = PostgresServer(POSTGRES_URL)
    yield server
    if not server.running():
        server.start()


@pytest.fixture
def database():
    """A fresh database on the server, dropped afterwards."""
    with fresh_postgres_database("cellsearch_faults") as url:
        yield url


@needs_postgres
def test_postgres_restarts_mid_search(tmp_path, database, postgres_server, ray_address):
    """Restarts (fast restart, or stop - pause - start) at random moments: the driver reconnects and retries;
    the search ends as configured with nothing lost or counted twice."""
    run_dir = tmp_path / "run"
    # Long enough (16 steps) that a fast machine still sees every restart: the test once failed on CI
    # because a 6-step search ended after 2 of them.
    max_steps = 16
    config = write_config(tmp_path / "search.yaml", max_steps=max_steps)
    driver = start(["search", str(config), "--run-dir", str(run_dir), "--storage", database], ray_address)
    rng = np.random.default_rng(RESTART_SEED)
    snapshots = [wait_for_evaluations(database, driver, 4)]
    restarts = 0
    try:
        while driver.poll() is None and restarts < 4:
            time.sleep(rng.uniform(0.3, 2.0))
            if driver.poll() is not None:
                break
            snapshots.append(committed(database))
            if rng.random() < 0.5:
                postgres_server.restart()
            else:
                postgres_server.stop()
                time.sleep(rng.uniform(1.0, 3.0))
                postgres_server.start()
            restarts += 1
    finally:
        if not postgres_server.running():
            postgres_server.start()
    status, stderr = finish(driver)
    assert status == 0, stderr[-3000:]
    assert restarts >= 3, f"the search ended after {restarts} restarts; it should outlast at least 3"
    assert "retry 1 in" in stderr, "no retry was logged: the restarts did not reach the driver"
    assert_complete_and_consistent(database, run_dir, snapshots, max_steps)


@needs_postgres
def test_stop_now_during_a_database_outage_is_prompt(tmp_path, database, postgres_server, ray_address):
    """SIGTERM while the database is down: the retry wait ends at once (not after storage_retry_s), one line,
    and everything committed before the outage is still there (resume after a stop: the restart test)."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "search.yaml", max_steps=4, storage_retry_s=600)
    driver = start(["search", str(config), "--run-dir", str(run_dir), "--storage", database], ray_address)
    snapshots = [wait_for_evaluations(database, driver, 2)]
    try:
        postgres_server.stop()
        time.sleep(3)  # units finish meanwhile: their commits fail and wait for a retry
        driver.terminate()
        status, stderr = finish(driver, timeout=90)  # a wait for the retry window would take 600 s
    finally:
        if not postgres_server.running():
            postgres_server.start()
    assert status in (75, 143), stderr[-3000:]
    if status == 75:
        assert_one_line_stop(stderr, "asked to stop now while the run database")
    else:
        assert "Traceback" not in stderr, stderr[-3000:]
    after = committed(database)
    assert after[: len(snapshots[0])] == snapshots[0]


def test_a_retry_wait_ends_when_the_caller_gives_up():
    from cellsearch.search.storage import retry

    started = time.monotonic()

    def refused():
        raise sa.exc.OperationalError("connect", {}, ConnectionRefusedError("connection refused"))

    with pytest.raises(StorageUnreachable, match="asked to stop now"):
        retry(refused, "a write", 600, lambda message: None, give_up=lambda: time.monotonic() - started > 1.0)
    assert time.monotonic() - started < 60


@needs_postgres
def test_password_comes_from_the_environment_and_is_never_written(tmp_path, ray_address, monkeypatch, capsys):
    """A role that must give its password: the URL's password works for the session, is written nowhere,
    and resume and load_run find it in PGPASSWORD / $CELLSEARCH_STORAGE_URL (and fail clearly without)."""
    role, password, name = (f"cs_pw_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex, f"cs_pw_db_{uuid.uuid4().hex[:10]}")
    admin = admin_engine()
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE cellsearch_password_auth"))
        connection.execute(sa.text(f'CREATE DATABASE "{name}" OWNER {role}'))
    server = sa.engine.make_url(normalize_url(POSTGRES_URL))
    url = sa.engine.URL.create(server.drivername, username=role, password=password, host=server.host,
                               port=server.port, database=name)
    with_password = url.render_as_string(hide_password=False)
    bare = sa.engine.URL.create(server.drivername, username=role, host=server.host, port=server.port,
                                database=name).render_as_string(hide_password=False)
    try:
        monkeypatch.delenv("PGPASSWORD", raising=False)
        monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
        probe = sa.create_engine(bare, poolclass=sa.pool.NullPool)
        with pytest.raises(sa.exc.OperationalError, match="password"):
            probe.connect().close()  # else the server trusts the role: rerun .ci/postgres.sh to set it up
        probe.dispose()

        run_dir = tmp_path / "run"
        config = tmp_path / "search.yaml"
        config.write_text(yaml.safe_dump(TINY))
        status, stderr = finish(start(["search", str(config), "--run-dir", str(run_dir), "--storage", with_password],
                                      ray_address))
        assert status == 0, stderr[-3000:]
        assert "password in the storage URL is used for this session but not stored" in stderr
        assert json.loads((run_dir / "run.json").read_text())["storage"] == bare
        for path in run_dir.rglob("*"):
            assert password.encode() not in path.read_bytes(), path
        reader_engine = sa.create_engine(with_password, poolclass=sa.pool.NullPool)
        with reader_engine.connect() as connection:
            stored = connection.execute(sa.text("SELECT config_yaml, versions_json FROM cs_run")).one()
        reader_engine.dispose()
        assert password not in stored[0] + stored[1] and f"storage: {bare}" in stored[0]

        # Without a password in the environment: one clear line (it fails before any unit runs).
        status, stderr = run_cli(capsys, "resume", str(run_dir), "--max-steps", "2", "--no-progress")
        assert status == 2 and stderr.count("\n") == 1, stderr
        assert "cannot use the run database" in stderr and "password" in stderr and password not in stderr

        # With PGPASSWORD (libpq's own variable) resume finishes the longer search.
        status, stderr = finish(start(["resume", str(run_dir), "--max-steps", "2"], ray_address,
                                      env=clean_env(PGPASSWORD=password)))
        assert status == 0, stderr[-3000:]
        assert password.encode() not in (run_dir / "config.yaml").read_bytes()

        # load_run takes the full URL from $CELLSEARCH_STORAGE_URL.
        monkeypatch.setenv(STORAGE_URL_ENV, with_password)
        results = load_run(run_dir)
        try:
            assert (results.steps()["kind"] != "seed").sum() == 2 and len(results.evaluations()) > 0
        finally:
            results.close()
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


# -- unwritable run directories -------------------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str]:
    status = main(list(args))
    return status, capsys.readouterr().err


def test_unwritable_run_directory_is_a_one_line_error(tmp_path, capsys):
    config = write_config(tmp_path / "search.yaml")
    # Under a regular file: the directory cannot exist.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    status, stderr = run_cli(capsys, "search", str(config), "--run-dir", str(blocker / "run"), "--no-progress")
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert "cannot create the run directory" in stderr and "Not a directory" in stderr

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available: cannot make a directory unwritable for root")
    # An immutable directory: unwritable even for root. A new search, and resuming an existing run there.
    empty, existing = tmp_path / "empty", tmp_path / "existing"
    empty.mkdir()
    create_run(from_mapping(SearchConfig, CONFIG), existing, log=lambda message: None)[1].close()
    subprocess.run(["chattr", "+i", str(empty), str(existing)], check=True)
    try:
        status, stderr = run_cli(capsys, "search", str(config), "--run-dir", str(empty), "--no-progress")
        assert status == 2 and stderr.count("\n") == 1, stderr
        assert f"the run directory {empty} is not writable" in stderr
        status, stderr = run_cli(capsys, "resume", str(existing), "--no-progress")
        assert status == 2 and stderr.count("\n") == 1, stderr
        assert f"the run directory {existing} is not writable" in stderr
    finally:
        subprocess.run(["chattr", "-i", str(empty), str(existing)], check=True)
    assert list(empty.iterdir()) == []


# -- full disks -----------------------------------------------------------------------------------------------------

class SmallDisk:
    """A tmpfs of a given size at ``path`` (root), or a per-file size limit for the CLI child where
    mounting is not permitted (``preexec_fn``: RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG)."""

    def __init__(self, path: Path, size_kib: int):
        self.path = path
        self.size_kib = size_kib
        path.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                                 capture_output=True, text=True)
        self.mounted = mounted.returncode == 0

    def preexec_fn(self):
        if self.mounted:
            return None
        limit = self.size_kib * 1024

        def limit_file_size():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        return limit_file_size

    def grow(self, size_kib: int) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(self.path)], check=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disks: list[SmallDisk] = []

    def make(size_kib: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size_kib))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()


def test_disk_fills_mid_search_then_resume_finishes(tmp_path, small_disk, ray_address):
    """The database's disk fills mid-search (threshold off): a clear stop with its own status, nothing
    committed lost; with room again, resume runs the search to its end without counting anything twice."""
    # The database of this search grows to about 4 MB (mostly its WAL, which SQLite checkpoints at about
    # 4 MB); 2.25 MB fills after about 12 of its about 20 evaluations, whatever the machine's speed.
    disk = small_disk(2304)
    run_dir = disk.path / "run"
    config = write_config(tmp_path / "search.yaml", min_free_space_mb=0, max_steps=3)
    status, stderr = finish(start(["search", str(config), "--run-dir", str(run_dir)], ray_address,
                                  preexec_fn=disk.preexec_fn()))
    url = sqlite_url(run_dir / "run.db")
    before = committed(url)
    assert status == EXIT_STORAGE_FULL, stderr[-3000:]
    assert_one_line_stop(stderr, "cannot write the run database", "after freeing space")
    assert len(before) >= 4, "the disk should fill mid-search, after some evaluations are committed"

    disk.grow(65536)
    resumed = subprocess.run([sys.executable, "-m", "cellsearch.cli", "resume", str(run_dir), "--address",
                              ray_address, "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env=clean_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_complete_and_consistent(url, run_dir, [before], 3)


def test_low_free_space_drains_and_stops(tmp_path, small_disk, ray_address):
    """Free space falls below min_free_space_mb mid-search (another file fills the disk): the driver starts
    nothing new, lets the running units commit and stops with its own status and a one-line message.
    (Resuming after such a stop is the same as after a full disk, tested above.)"""
    disk = small_disk(40 * 1024)
    if not disk.mounted:
        # No file system of our own: a threshold above the free space of the real one stops at the start.
        free_mb = shutil.disk_usage(tmp_path).free / 1e6
        config = write_config(tmp_path / "search.yaml", min_free_space_mb=free_mb + 1e6)
        status, stderr = finish(start(["search", str(config), "--run-dir", str(tmp_path / "run")], ray_address))
        assert status == EXIT_STORAGE_FULL, stderr[-3000:]
        assert_one_line_stop(stderr, "below min_free_space_mb")
        return
    run_dir = disk.path / "run"
    url = sqlite_url(run_dir / "run.db")
    config = write_config(tmp_path / "search.yaml", min_free_space_mb=20, tasks=["arithmetic"])
    driver = start(["search", str(config), "--run-dir", str(run_dir)], ray_address)
    before = wait_for_evaluations(url, driver, 4)
    with open(disk.path / "filler", "wb") as handle:  # leave about 10 MB: the database still fits
        handle.write(b"\0" * int(shutil.disk_usage(disk.path).free - 10e6))
    status, stderr = finish(driver)
    assert status == EXIT_STORAGE_FULL, stderr[-3000:]
    assert_one_line_stop(stderr, "below min_free_space_mb = 20 MB", "after freeing space")
    assert "starting nothing new, finishing the" in stderr
    assert committed(url)[: len(before)] == before
    engine = read_only_engine(url)
    with engine.connect() as connection:
        started = connection.execute(sa.text("SELECT COUNT(*) FROM cs_steps WHERE kind != 'seed'")).scalar_one()
    engine.dispose()
    assert started < CONFIG["max_steps"], "the search should have stopped before its end"
