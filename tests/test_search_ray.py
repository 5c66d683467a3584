"""Ray execution: a unit whose worker dies is retried (a search over a two-node cluster: tests/test_faults.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from cellsearch import zoo
from cellsearch.search.config import ResourcesConfig
from cellsearch.search.executors import RayExecutor
from cellsearch.search.units import SettingSpec, UnitSpec, run_unit
from cellsearch.tasks import get_task

# end-to-end: subprocesses, Ray, whole searches (the fast tier, `-m "not slow and not faults"`, skips them)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def memorize_unit(unit_id: int = 1) -> UnitSpec:
    task = get_task("memorize")
    settings = tuple(SettingSpec(i, task.default_hparams("smoke").to_dict(), 100 + i) for i in range(2))
    return UnitSpec(unit_id=unit_id, cell=zoo.get("gru").to_dict(), task="memorize", budget_profile="smoke",
                    settings=settings)


def test_unit_is_retried_when_its_worker_dies(tmp_path, ray_address):
    pid_file = tmp_path / "pids"

    # Defined here so that cloudpickle ships it by value to the worker.
    def record_pid_then_train(unit, task):
        with open(pid_file, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        if len(pid_file.read_text().split()) == 1:
            time.sleep(120)  # the first attempt waits to be killed
        return run_unit(unit, task)

    executor = RayExecutor(lambda name: get_task(name), ResourcesConfig(num_cpus=1, max_retries=2),
                           address=ray_address, unit_function=record_pid_then_train)
    try:
        executor.submit(memorize_unit())
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the unit never started"
            time.sleep(0.1)
        first_pid = int(pid_file.read_text().split()[0])
        os.kill(first_pid, signal.SIGKILL)
        completions = []
        deadline = time.monotonic() + 120
        while not completions:
            assert time.monotonic() < deadline, "the unit was not retried"
            completions = executor.wait(timeout=1.0)
    finally:
        executor.close()
    (completion,) = completions
    assert completion.error is None and completion.unit_id == 1
    assert [r["status"] for r in completion.results] == ["ok", "ok"]
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2 and pids[0] != pids[1] and completion.worker["worker_pid"] == pids[1]
    # The retry trained the same settings with the same seeds: same results as running the unit here.
    local = run_unit(memorize_unit(), get_task("memorize"))
    assert [r["score"] for r in completion.results] == pytest.approx([r.score for r in local])
