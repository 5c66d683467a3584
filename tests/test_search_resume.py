"""Killing the driver: SIGKILL mid-search, resume, SIGINT (graceful), resume again; nothing lost or repeated."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
import yaml

from cellsearch.results import load_run
from searchchecks import TINY_SEARCH, assert_search_consistent, committed

REPO = Path(__file__).resolve().parents[1]

CONFIG = TINY_SEARCH


def pending_units(run_dir: Path) -> int:
    engine = sa.create_engine(f"sqlite:///file:{run_dir / 'run.db'}?mode=ro&uri=true")
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT COUNT(*) FROM cs_units WHERE status = 'pending'")).scalar_one()
    finally:
        engine.dispose()


def start(args: list[str], address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cellsearch.cli", *args, "--address", address, "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_evaluations(run_dir: Path, process: subprocess.Popen, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(committed(run_dir)) < count:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the search made no progress"
        time.sleep(0.2)


def test_sigkill_then_sigint_then_resume(tmp_path, ray_address):
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run_dir = tmp_path / "run"

    # 1. kill -9 the driver once the seeds are committed and candidates are in flight.
    driver = start(["search", str(config), "--run-dir", str(run_dir)], ray_address)
    wait_for_evaluations(run_dir, driver, 12)
    running = load_run(run_dir)  # a reader of a running search (read-only connection)
    try:
        assert len(running.evaluations()) >= 12 and running.cells()["name"].isin(["gru", "lstm"]).sum() == 2
    finally:
        running.close()
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    before_kill = committed(run_dir)
    assert pending_units(run_dir) > 0, "the kill should leave planned, uncommitted units"

    # 2. resume, then Ctrl-C (SIGINT) it: it finishes the running units, records them and exits 130.
    resumed = start(["resume", str(run_dir)], ray_address)
    wait_for_evaluations(run_dir, resumed, len(before_kill) + 3)
    resumed.send_signal(signal.SIGINT)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, stderr[-3000:]
    assert "cellsearch resume" in stderr or "resume" in stderr
    before_interrupt = committed(run_dir)

    # 3. resume to the end.
    final = subprocess.run([sys.executable, "-m", "cellsearch.cli", "resume", str(run_dir), "--address", ray_address,
                            "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    after = committed(run_dir)

    # Nothing committed was lost or changed, in either interruption.
    assert after[: len(before_kill)] == before_kill
    assert after[: len(before_interrupt)] == before_interrupt
    # Nothing trained twice; the end reached; Optuna, the population and the duplicate detector agree.
    assert_search_consistent(run_dir, run_dir, CONFIG["max_steps"])
