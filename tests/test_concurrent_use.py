"""Concurrent and careless use (issue 19, second part): one driver per run, the stored config, safe outputs.

Like tests/test_careless_use.py, each test drives the real CLI in subprocesses and checks the exit
status, the one-line message and what is left on disk (run.json, the database, the user's files):

- two ``search`` on one new run directory, raced: one wins, the other refuses naming it (host, pid,
  since), and run.json and the database agree on the run id; two ``resume``: the second refuses;
  a lock left by a SIGKILLed driver is taken over by ``resume``; ``calibrate`` likewise;
- ``resume`` with an edited config.yaml, or ``--max-steps`` below the steps started, is refused;
- ``report --out`` and ``export`` replace only their own earlier output, atomically; ``--run-dir``
  on a folder of other files is refused;
- SIGTERM stops a serial search within a training step;
- damaged databases, unreadable or corrupt data and runs of other versions are one line;
- the embedded Ray instance listens on loopback only, and the executors follow their Protocol.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from searchchecks import TINY_SEARCH, fresh_postgres_database, needs_postgres
from test_careless_use import cellsearch, local_env, one_line_error

# careless and concurrent use: subprocesses, real locks, Ray (`-m faults` runs them alone; not in the fast tier)
pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
LOCK = ".cellsearch.lock"


def tiny_config(tmp_path: Path, **changes) -> Path:
    """A search of a few seconds per step (arithmetic and xml on the smoke budgets)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_SEARCH, "max_steps": 2, **changes}))
    return path


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cellsearch.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd or REPO, env=local_env())


def holder(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def wait_for_lock(run_dir: Path, process: subprocess.Popen, timeout: float = 120, file: str = "run.json") -> None:
    """Until ``process`` holds the run's lock and ``file`` exists (it is past creating the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = holder(run_dir)
        if record.get("pid") == process.pid and not record.get("released") and (run_dir / file).exists():
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{process.pid} did not take the lock of {run_dir} within {timeout} s")


def stop(process: subprocess.Popen, how: int = signal.SIGTERM) -> tuple[int, str]:
    """Send ``how`` (0: none, just wait) and wait for the exit status and stderr."""
    if how and process.poll() is None:
        process.send_signal(how)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def stored_run_id(run_dir: Path) -> str | None:
    engine = sa.create_engine(f"sqlite:///{run_dir / 'run.db'}")
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT run_id FROM cs_run")).scalar()
    finally:
        engine.dispose()


# -- item 1: one driver per run -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attempt", range(3))
def test_two_searches_racing_for_a_new_run_dir_one_wins(tmp_path, attempt):
    config = tiny_config(tmp_path, max_steps=50)
    run_dir = tmp_path / "run"
    racers = [start("search", str(config), "--executor", "serial", "--no-progress", "--run-dir", str(run_dir))
              for _ in range(2)]
    # The loser ends at once; the winner searches until it is stopped.
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in racers):
        assert time.monotonic() < deadline, "neither search ended"
        time.sleep(0.05)
    loser = next(p for p in racers if p.poll() is not None)
    winner = next(p for p in racers if p is not loser)
    _, err = loser.communicate()
    loser_result = subprocess.CompletedProcess(loser.args, loser.returncode, "", err)
    line = one_line_error(loser_result, f"pid {winner.pid}", "cellsearch search", "since")
    assert str(run_dir) in line
    wait_for_lock(run_dir, winner)
    status, err = stop(winner)
    assert status in (130, 143), err[-3000:]
    # run.json was written by the winner only, and it and the database name the same run.
    info = json.loads((run_dir / "run.json").read_text())
    assert stored_run_id(run_dir) == info["run_id"]
    record = holder(run_dir)
    assert record["pid"] == winner.pid and record["released"] is True
    assert str(loser.pid) not in (run_dir / "run.json").read_text()


def test_second_resume_refuses_naming_the_first(tmp_path):
    config = tiny_config(tmp_path, max_steps=50)
    run_dir = tmp_path / "run"
    first = start("search", str(config), "--executor", "serial", "--no-progress", "--run-dir", str(run_dir))
    wait_for_lock(run_dir, first)
    # a resume while the search runs
    refused = cellsearch("resume", str(run_dir), "--executor", "serial", env=local_env())
    one_line_error(refused, f"pid {first.pid}", "cellsearch search", "in use")
    status, err = stop(first)
    assert status in (130, 143), err[-3000:]
    before = (run_dir / "config.yaml").read_text()

    resumed = start("resume", str(run_dir), "--executor", "serial", "--no-progress")
    wait_for_lock(run_dir, resumed)
    second = cellsearch("resume", str(run_dir), "--executor", "serial", "--max-steps", "60", env=local_env())
    one_line_error(second, f"pid {resumed.pid}", "cellsearch resume", "since")
    assert (run_dir / "config.yaml").read_text() == before  # the refused resume wrote nothing
    status, err = stop(resumed, signal.SIGINT)  # Ctrl-C: running units finish, then the lock is released
    assert status == 130, err[-3000:]
    assert holder(run_dir)["released"] is True


def test_lock_of_a_killed_driver_is_taken_over_by_resume(tmp_path):
    config = tiny_config(tmp_path, max_steps=1)
    run_dir = tmp_path / "run"
    killed = start("search", str(config), "--executor", "serial", "--no-progress", "--run-dir", str(run_dir))
    wait_for_lock(run_dir, killed)
    stop(killed, signal.SIGKILL)
    record = holder(run_dir)
    assert record["pid"] == killed.pid and not record.get("released")  # the lock file still names it

    resumed = cellsearch("resume", str(run_dir), "--executor", "serial", "--no-progress", env=local_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"pid {killed.pid}" in resumed.stderr and "taking it over" in resumed.stderr
    assert holder(run_dir)["released"] is True
    info = json.loads((run_dir / "run.json").read_text())
    assert stored_run_id(run_dir) == info["run_id"]


def test_a_run_database_named_by_another_search_is_refused_while_it_runs(tmp_path):
    from cellsearch.search.storage import sqlite_url

    config = tiny_config(tmp_path, max_steps=50)
    run_dir = tmp_path / "run"
    first = start("search", str(config), "--executor", "serial", "--no-progress", "--run-dir", str(run_dir))
    try:
        wait_for_lock(run_dir, first)
        other = tmp_path / "other"
        refused = cellsearch("search", str(config), "--executor", "serial", "--run-dir", str(other), "--storage",
                             sqlite_url(run_dir / "run.db"), env=local_env())
        one_line_error(refused, "the run database", f"pid {first.pid}", "in use")
        assert not (other / "run.json").exists()
    finally:
        status, err = stop(first)
    assert status in (130, 143), err[-3000:]


@needs_postgres
def test_two_run_dirs_on_one_postgres_database_exclude_each_other(tmp_path):
    with fresh_postgres_database("cellsearch_lock") as url:
        # long enough that neither driver can finish before it is stopped, however slow the machine
        config = tiny_config(tmp_path, max_steps=5000)
        run_dir = tmp_path / "run"
        first = start("search", str(config), "--executor", "serial", "--no-progress", "--run-dir", str(run_dir),
                      "--storage", url)
        try:
            wait_for_lock(run_dir, first)
            # a copy of the run directory reaches the same database: the database's own lock refuses it
            copy = tmp_path / "copy"
            copy.mkdir()
            for name in ("run.json", "config.yaml", "versions.json"):
                (copy / name).write_bytes((run_dir / name).read_bytes())
            refused = cellsearch("resume", str(copy), "--executor", "serial", env=local_env())
            one_line_error(refused, "the run database", f"pid {first.pid}", "in use")
        finally:
            status, err = stop(first)
        assert status in (130, 143), err[-3000:]
        resumed = start("resume", str(copy), "--executor", "serial", "--no-progress")
        try:
            wait_for_lock(copy, resumed)  # released with the first driver's session
        finally:
            status, err = stop(resumed)
        assert status in (130, 143), err[-3000:]


def test_second_calibrate_on_one_study_dir_refuses(tmp_path):
    out = tmp_path / "study"
    args = ("calibrate", "--task", "memorize", "--in-process", "--cells", "gru,lstm", "--mutated", "6", "--seeds",
            "2", "--budget", "smoke", "--no-progress")
    first = start(*args, "--out", str(out))
    try:
        wait_for_lock(out, first, file="study.db")
        for second in (("--out", str(out)), ("--resume", str(out))):
            refused = cellsearch(*args, *second, env=local_env())
            one_line_error(refused, "the study directory", f"pid {first.pid}", "cellsearch calibrate")
    finally:
        stop(first)
    assert holder(out).get("pid") == first.pid


# -- item 2: the stored config is the run's ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished two-step serial search (arithmetic and xml)."""
    base = tmp_path_factory.mktemp("tiny")
    run_dir = base / "run"
    result = cellsearch("search", str(tiny_config(base)), "--executor", "serial", "--no-progress", "--run-dir",
                        str(run_dir), env=local_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_resume_refuses_an_edited_config_and_a_shorter_length(tmp_path, tiny_run):
    import shutil

    from cellsearch.results import load_run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    original = (run_dir / "config.yaml").read_text()
    edited = yaml.safe_load(original)
    edited["population_size"] = 5
    edited["resources"]["num_cpus"] = 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(edited))
    refused = cellsearch("resume", str(run_dir), "--executor", "serial", env=local_env())
    line = one_line_error(refused, "differs from the config stored", "population_size: 4 -> 5",
                          "resources.num_cpus: 1.0 -> 2.0", "undo the edit")
    assert "max_steps" not in line.split("(", 1)[1].split(")")[0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == edited  # the user's file is left alone

    # a deleted config.yaml is written again from the database
    (run_dir / "config.yaml").unlink()
    short = cellsearch("resume", str(run_dir), "--executor", "serial", "--max-steps", "1", env=local_env())
    one_line_error(short, "--max-steps 1 is below the 2 search steps", "give at least 2")
    assert not (run_dir / "config.yaml").exists()  # a refused resume writes nothing
    rewritten = cellsearch("resume", str(run_dir), "--executor", "serial", "--no-progress", env=local_env())
    assert rewritten.returncode == 0 and "written again" in rewritten.stderr, rewritten.stderr[-3000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == yaml.safe_load(original)

    longer = cellsearch("resume", str(run_dir), "--executor", "serial", "--no-progress", "--max-steps", "3",
                        env=local_env())
    assert longer.returncode == 0, longer.stderr[-3000:]
    # every reader sees the new length: the database, config.yaml and load_run
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["max_steps"] == 3
    run = load_run(run_dir)
    try:
        assert run.config.max_steps == 3
        assert (run.steps()["kind"] != "seed").sum() == 3
    finally:
        run.close()
    again = cellsearch("resume", str(run_dir), "--executor", "serial", "--no-progress", env=local_env())
    assert again.returncode == 0 and "differs" not in again.stderr, again.stderr[-3000:]


# -- item 3: outputs never destroy or mix the user's files -------------------------------------------------------

def _entries(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.iterdir())


def test_export_replaces_only_its_own_earlier_output(tmp_path, tiny_run):
    out = tmp_path / "cells"
    first = cellsearch("export", str(tiny_run), "--top", "3", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    specs = [name for name in _entries(out) if not name.startswith(".")]
    assert specs and ".cellsearch-output" in _entries(out)
    again = cellsearch("export", str(tiny_run), "--top", "1", "--format", "yaml", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    # the new output as a whole, nothing of the old one mixed in
    assert [name for name in _entries(out) if not name.startswith(".")] == [specs[0].replace(".json", ".yaml")]
    assert _entries(tmp_path) == ["cells"]  # no staging folder left next to it

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    refused = cellsearch("export", str(tiny_run), str(mine))
    one_line_error(refused, str(mine), "not an output of this command", "--force")
    assert _entries(mine) == ["notes.txt"] and refused.stdout == ""
    # an earlier report is not an export either
    report = tmp_path / "report"
    assert cellsearch("report", str(tiny_run), "--out", str(report), "--drawn", "0", "--lineages", "0").returncode == 0
    one_line_error(cellsearch("export", str(tiny_run), str(report)), "an output of `cellsearch report`")
    forced = cellsearch("export", str(tiny_run), "--top", "1", "--force", str(mine))
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "notes.txt" not in _entries(mine)
    assert sorted(_entries(tmp_path)) == ["cells", "mine", "report"]


def test_report_regeneration_killed_at_any_moment_leaves_a_whole_report(tmp_path, tiny_run):
    out = tmp_path / "report"
    args = ("report", str(tiny_run), "--out", str(out), "--drawn", "2", "--lineages", "1")
    first = cellsearch(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    complete = _entries(out)
    assert "index.html" in complete and ".cellsearch-output" in complete
    for delay in (0.5, 1.5, 2.5, 3.5, 5.0, 8.0):
        process = start(*args)
        time.sleep(delay)
        process.kill()
        process.communicate()
        # the old report or the new one, whole either way
        assert _entries(out) == complete, delay
        json.loads((out / ".cellsearch-output").read_text())  # the marker is whole too
    last = cellsearch(*args)
    assert last.returncode == 0, last.stderr[-3000:]
    assert _entries(out) == complete
    assert _entries(tmp_path) == ["report"]  # the killed runs' staging folders were cleaned up

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page\n")
    refused = cellsearch("report", str(tiny_run), "--out", str(mine))
    one_line_error(refused, str(mine), "not an output of this command")
    assert (mine / "index.html").read_text() == "my page\n"


def test_run_dir_holding_other_files_is_refused(tmp_path):
    config = tiny_config(tmp_path)
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "thesis.tex").write_text("\\documentclass{article}\n")
    refused = cellsearch("search", str(config), "--executor", "serial", "--run-dir", str(run_dir), env=local_env())
    one_line_error(refused, str(run_dir), "not a cellsearch run", "thesis.tex")
    assert _entries(run_dir) == ["thesis.tex"]
    refused = cellsearch("resume", str(run_dir), "--executor", "serial", env=local_env())
    one_line_error(refused, "not a search run directory")
    assert _entries(run_dir) == ["thesis.tex"]


# -- item 4: SIGTERM stops a serial search within a training step --------------------------------------------------

def test_sigterm_stops_a_serial_search_within_a_training_step(tmp_path):
    # medium budgets: one unit trains for minutes; a stop that waited for the unit would take that long
    config = tiny_config(tmp_path, budget_profile="medium")
    run_dir = tmp_path / "run"
    search = start("search", str(config), "--executor", "serial", "--no-progress", "--run-dir", str(run_dir))
    wait_for_lock(run_dir, search)
    time.sleep(6)  # into the first unit's training
    signalled = time.monotonic()
    status, err = stop(search)
    elapsed = time.monotonic() - signalled
    assert status == 130, err[-3000:]
    assert elapsed < 30, elapsed
    assert "Traceback" not in err and "terminated: stopping now" in err
    engine = sa.create_engine(f"sqlite:///{run_dir / 'run.db'}")
    try:
        with engine.connect() as connection:
            statuses = connection.execute(sa.text("SELECT status FROM cs_units")).scalars().all()
            evaluations = connection.execute(sa.text("SELECT COUNT(*) FROM cs_evaluations")).scalar()
    finally:
        engine.dispose()
    # the stopped unit is not a result: it stays pending, to re-run on resume
    assert statuses and set(statuses) == {"pending"} and evaluations == 0
    assert holder(run_dir)["released"] is True


# -- item 5: one line instead of tracebacks --------------------------------------------------------------------------

def _settled_copy(run_dir: Path, target: Path) -> Path:
    """A copy of a run whose database is one file (WAL folded in), ready to be damaged."""
    import shutil
    import sqlite3

    shutil.copytree(run_dir, target)
    connection = sqlite3.connect(target / "run.db")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.execute("PRAGMA journal_mode=DELETE")
    connection.close()
    for suffix in ("-wal", "-shm"):
        (target / f"run.db{suffix}").unlink(missing_ok=True)
    return target


def _damage(database: Path, how: str) -> None:
    import sqlite3

    if how == "empty":
        database.write_bytes(b"")
    elif how == "random":
        database.write_bytes(os.urandom(64 * 1024))
    elif how == "truncated":
        data = database.read_bytes()
        database.write_bytes(data[: len(data) // 3])
    elif how == "dropped table":
        connection = sqlite3.connect(database)
        connection.execute("DROP TABLE cs_evaluations")
        connection.commit()
        connection.close()


@pytest.mark.parametrize("how", ["empty", "random", "truncated", "dropped table"])
def test_damaged_database_is_one_line_in_every_reader(tmp_path, tiny_run, how):
    from cellsearch import zoo

    run_dir = _settled_copy(tiny_run, tmp_path / "run")
    _damage(run_dir / "run.db", how)
    damaged = (run_dir / "run.db").read_bytes()
    commands = {
        "top": ("top", str(run_dir)),
        "top --csv": ("top", str(run_dir), "--csv"),
        "show": ("show", str(run_dir), zoo.get("gru").hash[:10]),
        "export": ("export", str(run_dir), str(tmp_path / "cells")),
        "report": ("report", str(run_dir), "--out", str(tmp_path / "report")),
    }
    for what, args in commands.items():
        result = cellsearch(*args)
        line = one_line_error(result, "run database")
        assert "damaged" in line or "holds no" in line, (what, line)
        assert "restore it from a backup" in line or "resume" in line, (what, line)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["run"]  # no output folder, no staging left
    assert (run_dir / "run.db").read_bytes() == damaged  # readers never write


def test_resume_on_an_empty_database_names_the_cause(tmp_path, tiny_run):
    run_dir = _settled_copy(tiny_run, tmp_path / "run")
    _damage(run_dir / "run.db", "empty")
    result = cellsearch("resume", str(run_dir), "--executor", "serial", env=local_env())
    one_line_error(result, "run.db", "is empty (0 bytes", "restore it from a backup")
    assert (run_dir / "run.db").stat().st_size == 0
    (run_dir / "run.db").unlink()
    result = cellsearch("resume", str(run_dir), "--executor", "serial", env=local_env())
    one_line_error(result, "run.db", "is missing")
    assert not (run_dir / "run.db").exists()


def _ptb_copy(ptb_dir: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(ptb_dir, target)
    return target


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file with mode 000; the in-process variant covers it")
def test_unreadable_ptb_file_is_one_line(tmp_path, ptb_dir):
    data = _ptb_copy(ptb_dir, tmp_path / "ptb")
    (data / "ptb.valid.txt").chmod(0)
    train = cellsearch("train", "gru", "--task", "ptb", "--profile", "smoke", "--data-dir", str(data), "--no-progress")
    one_line_error(train, "cannot read the Penn Treebank file", "ptb.valid.txt", "Permission denied")
    config = tiny_config(tmp_path, tasks=["arithmetic", "ptb"])
    search = cellsearch("search", str(config), "--executor", "serial", "--run-dir", str(tmp_path / "run"),
                        env=local_env(CELLSEARCH_PTB_DIR=str(data)))
    one_line_error(search, "ptb.valid.txt", "Permission denied")
    assert not (tmp_path / "run").exists()


def test_unreadable_ptb_file_is_one_line_in_process(tmp_path, ptb_dir, monkeypatch, capsys):
    """EACCES simulated for root (mode 000 does not stop root); EIO takes the same path (an OSError on read)."""
    import errno
    import pathlib

    from cellsearch.cli import main
    from cellsearch.search import run as run_module

    data = _ptb_copy(ptb_dir, tmp_path / "ptb")
    real_open = pathlib.Path.open

    def refusing_open(self, *args, **kwargs):
        if self.name == "ptb.valid.txt" and self.parent == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refusing_open)
    run_module._cached_task.cache_clear()
    assert main(["train", "gru", "--task", "ptb", "--profile", "smoke", "--data-dir", str(data),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read the Penn Treebank file" in err[0] and "Permission denied" in err[0], err
    config = tiny_config(tmp_path, tasks=["arithmetic", "ptb"])
    monkeypatch.setenv("CELLSEARCH_PTB_DIR", str(data))
    assert main(["search", str(config), "--executor", "serial", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ptb.valid.txt" in err[0] and "Permission denied" in err[0], err
    assert not (tmp_path / "run").exists()


# -- item 6: rough edges --------------------------------------------------------------------------------------------

def test_failed_ptb_checksum_leaves_no_run_directory(tmp_path, ptb_dir):
    data = _ptb_copy(ptb_dir, tmp_path / "ptb")
    with open(data / "ptb.test.txt", "a") as handle:
        handle.write(" the\n")
    config = tiny_config(tmp_path, tasks=["arithmetic", "ptb"])
    result = cellsearch("search", str(config), "--executor", "serial", "--run-dir", str(tmp_path / "run"),
                        env=local_env(CELLSEARCH_PTB_DIR=str(data)))
    one_line_error(result, "ptb.test.txt", "SHA-256")
    assert not (tmp_path / "run").exists()  # nothing pins the bad data directory
    default = cellsearch("search", str(config), "--executor", "serial", cwd=tmp_path,
                         env=local_env(CELLSEARCH_PTB_DIR=str(data)))
    one_line_error(default, "SHA-256")
    assert not (tmp_path / "runs").exists()


def test_default_run_dirs_of_one_second_differ(tmp_path):
    from datetime import datetime, timezone

    from cellsearch.commands.search import default_run_dir

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    first, _ = default_run_dir("smoke", now, tmp_path / "runs")
    second, made = default_run_dir("smoke", now, tmp_path / "runs")
    assert first.name == "smoke-20260102-030405" and second.name == "smoke-20260102-030405-2"
    assert made == [second]
    # and through the CLI: two searches started together without --run-dir
    config = tiny_config(tmp_path, max_steps=1)
    searches = [start("search", str(config), "--executor", "serial", "--no-progress", cwd=tmp_path)
                for _ in range(2)]
    for search in searches:
        status, err = stop(search, 0)
        assert status == 0, err[-3000:]
    runs = sorted((tmp_path / "runs").glob("tiny-*"))
    assert len(runs) == 2 and all((run / "run.json").is_file() for run in runs)
    assert len({json.loads((run / "run.json").read_text())["run_id"] for run in runs}) == 2


def test_run_of_another_cellsearch_version_resumes_with_a_warning(tmp_path, tiny_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    engine = sa.create_engine(f"sqlite:///{run_dir / 'run.db'}")
    with engine.begin() as connection:
        versions = json.loads(connection.execute(sa.text("SELECT versions_json FROM cs_run")).scalar())
        connection.execute(sa.text("UPDATE cs_run SET versions_json = :v"),
                           {"v": json.dumps({**versions, "cellsearch": "0.0.1"})})
    engine.dispose()
    result = cellsearch("resume", str(run_dir), "--executor", "serial", "--no-progress", env=local_env())
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "cellsearch 0.0.1" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), result.stderr[-3000:]


# -- item 7: the embedded Ray instance listens on loopback only ------------------------------------------------------

_LISTENERS = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from raysockets import descendants, listening_sockets
from cellsearch.search.config import ResourcesConfig
from cellsearch.search.executors import RayExecutor
executor = RayExecutor(lambda name: None, ResourcesConfig(), num_cpus=1)
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
sockets = sorted(listening_sockets(descendants(os.getpid()) | {os.getpid()}))
executor.close()
print(json.dumps(sockets))
"""


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    import ipaddress

    result = subprocess.run([sys.executable, "-c", _LISTENERS, str(Path(__file__).parent)], capture_output=True,
                            text=True, cwd=tmp_path, env=local_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sockets = json.loads(result.stdout.strip().splitlines()[-1])
    # GCS, raylet (node and object manager), the driver's and the worker's core workers, the dashboard agent
    # (gRPC and Prometheus metrics export) and the runtime env agent: at least 7 listening sockets
    assert len(sockets) >= 7, sockets
    for host, port, pid, command in sockets:
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        assert address.is_loopback, (host, port, command)


def test_executors_follow_the_protocol():
    from cellsearch.search.executors import Executor, SerialExecutor

    serial = SerialExecutor(lambda name: None)
    assert isinstance(serial, Executor)
    serial.stop()
    assert serial.wait(0) == []


# -- retrain: one per output directory, never over a user's files, SIGTERM stops cleanly ---------------------------

RETRAIN = ["retrain", "gru", "--task", "memorize", "--preset", "tiny", "--seeds", "1", "--baselines", "lstm_b",
           "--no-progress"]


def test_a_second_retrain_into_the_same_out_refuses_naming_the_first(tmp_path):
    from cellsearch.search.lock import acquire

    out = tmp_path / "out"
    out.mkdir()
    held = acquire(out, f"the retrain directory {out}", command="cellsearch retrain")  # another retrain, running
    try:
        one_line_error(cellsearch(*RETRAIN, "--in-process", "--out", str(out), env=local_env()),
                       "is in use by cellsearch retrain", f"pid {os.getpid()}")
    finally:
        held.release()
    completed = cellsearch(*RETRAIN, "--in-process", "--out", str(out), env=local_env())
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_retrain_refuses_an_out_directory_holding_other_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    one_line_error(cellsearch(*RETRAIN, "--in-process", "--out", str(out), env=local_env()),
                   "holds files that are not a cellsearch retrain", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_sigterm_stops_a_ray_retrain_cleanly_and_leaves_it_resumable(tmp_path):
    """Ray's own SIGTERM handler used to abort the driver (a C++ stack dump, exit 134): now exit 143, one line."""
    out = tmp_path / "out"
    args = ["retrain", "gru", "--task", "memorize", "--preset", "quick", "--seeds", "1", "--baselines", "lstm_b",
            "--workers", "1", "--no-progress", "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "cellsearch.cli", *args], cwd=REPO, env=local_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("**/*.pt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # training has started once the first checkpoint exists
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, (process.returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "terminated" in stderr.strip().splitlines()[-1], stderr[-3000:]
    # Ray was shut down and the lock released (the next retrain may start), and the checkpoints are there for it to
    # resume from (resuming to the uninterrupted result is tests/test_retrain.py's SIGKILL test)
    from cellsearch.search.lock import check_free

    check_free(out, "the retrain directory")
    assert (out / "plan.json").is_file() and list(out.glob("**/*.pt"))
