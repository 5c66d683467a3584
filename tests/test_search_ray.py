"""Ray execution: a unit whose worker dies is retried; a search spreads over a two-node cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cellsearch import zoo
from cellsearch.results import load_run
from cellsearch.search.config import ResourcesConfig
from cellsearch.search.executors import RayExecutor
from cellsearch.search.units import SettingSpec, UnitSpec, run_unit
from cellsearch.tasks import get_task

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


def test_search_on_a_two_node_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        node_ids = {node.node_id for node in cluster.list_all_nodes()}
        assert len(node_ids) == 2
        config = tmp_path / "search.yaml"
        config.write_text(yaml.safe_dump({
            "tasks": ["arithmetic", "xml"], "budget_profile": "smoke", "population_size": 4,
            "settings_per_task": 2, "settings_per_unit": 1, "memorize_threshold": 0.0, "seed": 2,
            "max_steps": 2, "max_in_flight": 4}))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        result = subprocess.run([sys.executable, "-m", "cellsearch.cli", "search", str(config), "--run-dir",
                                 str(tmp_path / "run"), "--address", cluster.address, "--no-progress"],
                                cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        cluster.shutdown()
    results = load_run(tmp_path / "run")
    try:
        evaluations = results.evaluations()
    finally:
        results.close()
    assert set(evaluations["node"]) == node_ids  # both nodes trained units
