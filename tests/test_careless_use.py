"""Careless use (issue 19): odd run directory names, hangs, wrong output paths, devices and values.

Each test drives the real CLI in a subprocess (real torch, real Ray where a cluster is involved)
the way a hurried user would, and checks the exit status, that the error is exactly one line
without a traceback, and what is left on disk afterwards:

- a run directory named with URL characters (``?``, ``#``, ``%``) keeps its database inside it,
  and ``top``, ``resume`` and ``load_run`` find it again;
- ``--workers 0`` or below and a dead ``--address``/``RAY_ADDRESS`` fail at once (the latter within
  ``CELLSEARCH_RAY_ATTACH_TIMEOUT_S``) and leave no run directory behind;
- an output path that is a file (``export``, ``report --out``, ``retrain --out``, ``show --png``),
  a device this machine lacks or a misspelt one, and hyperparameters beyond float32 are one line;
- a batched model of a cell without linear nodes equals its members run alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from cellsearch import CellRNN, CellSpec
from cellsearch.compiler.batched import BatchedCellRNN
from cellsearch.results import load_run
from cellsearch.search.storage import sqlite_path, sqlite_url

# careless and concurrent use: subprocesses, real locks, Ray (`-m faults` runs them alone; not in the fast tier)
pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "search_configs" / "smoke.yaml")
#: Characters that mean something in a URL: query, fragment, escape (and braces, which Optuna formats).
ODD_NAME = "q?mark#hash%41x"


def cellsearch(*args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert exit 2 and a single stderr line (no traceback) that holds every needle; return it."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def local_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(extra)
    return env


# -- item 3: paths are data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [ODD_NAME, "a{b}c", "sp ace", "at@x;y=1&z", "nl\nx", "ü"])
def test_sqlite_urls_round_trip_any_directory_name(tmp_path, name):
    database = tmp_path / name / "run.db"
    assert sa.engine.make_url(sqlite_url(database)).database == str(database)
    assert sqlite_path(sqlite_url(database)) == database
    assert sqlite_path(sqlite_url(database, read_only=True)) == database
    # SQLite's own URI parsing (read-only mode) reaches the same file, not one at a cut-off name.
    database.parent.mkdir()
    writer = sa.create_engine(sqlite_url(database))
    with writer.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        connection.execute(sa.text("INSERT INTO t VALUES (41)"))
    writer.dispose()
    reader = sa.create_engine(sqlite_url(database, read_only=True))
    with reader.connect() as connection:
        assert connection.execute(sa.text("SELECT x FROM t")).scalar() == 41
    reader.dispose()
    assert sorted(path.name for path in tmp_path.iterdir()) == [name]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, ptb_dir):
    """A one-step serial smoke search in a run directory named ``q?mark#hash%41x``."""
    base = tmp_path_factory.mktemp("careless")
    run_dir = base / ODD_NAME
    result = cellsearch("search", SMOKE, "--executor", "serial", "--max-steps", "1", "--no-progress",
                        "--run-dir", str(run_dir), cwd=base, env=local_env(CELLSEARCH_PTB_DIR=str(ptb_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    return base, run_dir


@pytest.mark.slow
def test_run_directory_with_url_characters_works_end_to_end(odd_run, ptb_dir):
    base, run_dir = odd_run
    # The database lies inside the run directory, and nothing was written next to it.
    assert (run_dir / "run.db").is_file()
    assert [path.name for path in base.iterdir()] == [ODD_NAME]
    info = json.loads((run_dir / "run.json").read_text())
    assert sqlite_path(info["storage"]) == run_dir.resolve() / "run.db"

    top = cellsearch("top", str(run_dir), "-n", "3", cwd=base)
    assert top.returncode == 0, top.stderr[-3000:]
    assert "gru" in top.stdout

    run = load_run(run_dir)
    try:
        assert run.run_id == info["run_id"]
        assert len(run.cells()) >= 2
        assert len(run.evaluations()) > 0
    finally:
        run.close()

    # resume reads the stored config (its storage URL) back; the run is finished, so nothing more trains.
    resumed = cellsearch("resume", str(run_dir), "--executor", "serial", "--no-progress", cwd=base,
                         env=local_env(CELLSEARCH_PTB_DIR=str(ptb_dir)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "gru" in resumed.stdout
    assert sorted(path.name for path in base.iterdir()) == [ODD_NAME]


# -- item 7: hangs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", ["0", "-1"])
def test_search_and_resume_refuse_workers_below_one_at_once(tmp_path, workers):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = cellsearch("search", SMOKE, "--workers", workers, "--run-dir", str(run_dir), env=local_env(),
                        timeout=120)
    one_line_error(result, "--workers must be at least 1")
    assert time.monotonic() - started < 60
    assert not run_dir.exists()
    resumed = cellsearch("resume", str(run_dir), "--workers", workers, env=local_env(), timeout=120)
    one_line_error(resumed, "--workers must be at least 1")
    assert not run_dir.exists()


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_dead_cluster_address_fails_in_bounded_time(tmp_path, how):
    run_dir = tmp_path / "run"
    address = f"127.0.0.1:{_unused_port()}"
    args = ["search", SMOKE, "--run-dir", str(run_dir), "--max-steps", "1"]
    env = local_env()
    if how == "--address":
        args += ["--address", address]
    else:
        env["RAY_ADDRESS"] = address
    started = time.monotonic()
    result = cellsearch(*args, env=env, timeout=120)
    one_line_error(result, "cannot attach to the Ray cluster", address)
    assert time.monotonic() - started < 60
    assert not run_dir.exists()


@pytest.mark.slow
def test_port_that_is_not_ray_fails_within_the_attach_timeout(tmp_path):
    """A port that accepts connections but never speaks Ray (say, a web server): cut off after the timeout."""
    run_dir = tmp_path / "run"
    with socket.socket() as listener:
        # Every interface: Ray turns 127.0.0.1 into this machine's own address.
        listener.bind(("0.0.0.0", 0))
        listener.listen(16)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        result = cellsearch("search", SMOKE, "--run-dir", str(run_dir), "--address", address,
                            env=local_env(CELLSEARCH_RAY_ATTACH_TIMEOUT_S="5"), timeout=120)
        elapsed = time.monotonic() - started
    one_line_error(result, "cannot attach to the Ray cluster", "CELLSEARCH_RAY_ATTACH_TIMEOUT_S")
    assert elapsed < 45, elapsed
    assert not run_dir.exists()
    # A timeout that cannot be meant is refused as such, before anything else.
    bad = cellsearch("search", SMOKE, "--run-dir", str(run_dir), "--address", address,
                     env=local_env(CELLSEARCH_RAY_ATTACH_TIMEOUT_S="0"), timeout=120)
    one_line_error(bad, "CELLSEARCH_RAY_ATTACH_TIMEOUT_S")


# -- item 8: one line instead of a traceback ------------------------------------------------------------------------

@pytest.mark.slow
def test_output_paths_that_are_files_are_one_line(odd_run, tmp_path):
    _, run_dir = odd_run
    user_file = tmp_path / "notes.txt"
    user_file.write_text("the user's notes\n")
    results = {
        "export": cellsearch("export", str(run_dir), "--top", "2", str(user_file)),
        "export under a file": cellsearch("export", str(run_dir), "--top", "2", str(user_file / "cells")),
        "report": cellsearch("report", str(run_dir), "--out", str(user_file)),
        "retrain": cellsearch("retrain", "gru", "--task", "memorize", "--preset", "tiny", "--seeds", "1",
                              "--baselines", "", "--in-process", "--out", str(user_file)),
        "show --png under a file": cellsearch("show", "gru", "--png", str(user_file / "gru.png")),
        "show --png a directory": cellsearch("show", "gru", "--png", str(tmp_path)),
    }
    for what, result in results.items():
        line = one_line_error(result)
        assert str(user_file) in line or str(tmp_path) in line, (what, line)
        assert result.stdout == "", (what, result.stdout)
    assert user_file.read_text() == "the user's notes\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("device, needle", [
    ("banana", "not a torch device"),
    ("cuda;rm -rf x", "not a torch device"),
    ("cuda:99", "cuda:99"),
    ("cuda", "CUDA is not available"),
])
def test_devices_are_checked_before_training(device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    train = cellsearch("train", "gru", "--task", "memorize", "--profile", "smoke", "--device", device,
                       "--no-progress", timeout=120)
    one_line_error(train, "--device", needle)


def test_retrain_checks_the_device_here_unless_a_cluster_trains(tmp_path):
    out = tmp_path / "out"
    result = cellsearch("retrain", "gru", "--task", "memorize", "--preset", "tiny", "--in-process",
                        "--device", "banana", "--out", str(out), timeout=120)
    one_line_error(result, "--device", "not a torch device")
    assert not out.exists()
    if not torch.cuda.is_available():
        result = cellsearch("retrain", "gru", "--task", "memorize", "--preset", "tiny", "--in-process",
                            "--device", "cuda", "--out", str(out), timeout=120)
        one_line_error(result, "--device cuda", "CUDA is not available")
        assert not out.exists()


@pytest.mark.parametrize("setting, needle", [
    ("learning_rate=1e39", "learning_rate"),      # finite, but beyond float32: SGD's step overflowed mid-run
    ("init_scale=1e300", "init_scale"),           # uniform_ bounds out of float32's range
    ("learning_rate=inf", "learning_rate"),
    ("max_grad_norm=nan", "max_grad_norm"),
    ("init_scale=-1", "init_scale"),
])
def test_overflowing_hyperparameters_are_refused_at_parse_time(setting, needle):
    result = cellsearch("train", "gru", "--task", "memorize", "--profile", "smoke", "--set", setting,
                        "--no-progress", timeout=120)
    one_line_error(result, needle)
    assert result.stdout == ""


# -- item 11: a cell without linear nodes, batched ------------------------------------------------------------------

ADD_CELL = {"states": ["h"], "nodes": {"s": {"op": "add", "inputs": ["x", "h"]}}, "outputs": {"h": "s"}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_cell_without_linear_nodes_equals_its_members(dtype):
    spec = CellSpec.from_dict(ADD_CELL)
    members = [CellRNN(spec, 6, 6, num_layers=2).to(dtype) for _ in range(3)]
    assert not list(members[0].parameters())  # h' = x + h: nothing to learn, nothing to stack
    batched = BatchedCellRNN.from_members(members)
    inputs = torch.randn(3, 5, 2, 6, dtype=dtype)
    output, state = batched(inputs)
    assert output.dtype == dtype
    for index, rnn in enumerate(members):
        alone_output, alone_state = rnn(inputs[index])
        torch.testing.assert_close(output[index], alone_output)
        torch.testing.assert_close(state[index], alone_state)
        member_output, _ = batched.member(index)(inputs[index])
        torch.testing.assert_close(member_output, alone_output)
    taken = batched.take([2, 0])
    taken_output, _ = taken(inputs[[2, 0]])
    torch.testing.assert_close(taken_output, output[[2, 0]])


def test_batched_cell_without_linear_nodes_keeps_its_input_projection():
    """At an input width other than the hidden width the first layer projects x: those weights are stacked."""
    spec = CellSpec.from_dict(ADD_CELL)
    members = [CellRNN(spec, 4, 6) for _ in range(2)]
    batched = BatchedCellRNN.from_members(members)
    inputs = torch.randn(2, 5, 3, 4)
    output, _ = batched(inputs)
    for index, rnn in enumerate(members):
        torch.testing.assert_close(output[index], rnn(inputs[index])[0])
        torch.testing.assert_close(batched.member(index)(inputs[index])[0], rnn(inputs[index])[0])
