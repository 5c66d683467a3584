"""From laptop to cluster: a real multi-node Ray cluster started with `ray start`, as README.md
("Searches on a cluster") tells a user to start one, with Ray 2.60's token authentication on.

One head node (1 CPU, dashboard on 127.0.0.1 for `ray job submit`) serves the whole module; the tests
add worker nodes that are broken the way real nodes are: one whose workers cannot import cellsearch
(a ``PYTHONPATH`` entry hides the package, as on a machine where it was never installed), one whose
``--out`` directory is its own (a mount namespace with a private tmpfs, as on a node without the
shared file system). The tests without Ray (fast tier) check how command-line paths are
resolved. Every check is the user-visible outcome: exit status, the one line, what was
(not) created or recorded. All Ray processes run under a temporary directory of this module's own
and are stopped by their process groups, never by `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: The smallest search that ends: the GRU seed and one mutation, one setting each, on one task.
TINY = {"tasks": ["arithmetic"], "initial_cells": ["gru"], "memorize_task": None, "budget_profile": "smoke",
        "population_size": 2, "settings_per_task": 1, "settings_per_unit": 1, "reevaluate_probability": 0.0,
        "seed": 3, "max_steps": 1, "max_in_flight": 2}

#: Run by a driver whose units can only land on the broken node (the head's CPU is held): it stands for a node
#: that joined after the search checked its nodes, so the executor is made without that check.
MID_SEARCH = '''
import argparse, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

address, config_path, run_dir, marker = sys.argv[1:5]
ray.init(address=address, log_to_driver=False, configure_logging=False)


@ray.remote(num_cpus=1)
class Hold:
    def ready(self):
        return True


good = [n for n in ray.nodes() if n["Alive"] and not n["Resources"].get(marker)]
holds = [Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
         for n in good for _ in range(int(n["Resources"].get("CPU", 0)))]
ray.get([h.ready.remote() for h in holds])

from cellsearch.commands.search import run_search
from cellsearch.search.config import load_search_config
from cellsearch.search.executors import RayExecutor
from cellsearch.search.run import create_run, task_loader

config, storage = create_run(load_search_config(config_path), run_dir)
executor = RayExecutor(task_loader(config), config.resources, address=address, check_nodes=False)
args = argparse.Namespace(command="search", no_progress=True, executor="ray", workers=None, address=address)
sys.exit(run_search(config, storage, run_dir, args, executor=executor))
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayCluster:
    """`ray start --head` and `ray start --address` processes under one private temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        # short: Ray's socket paths under it must fit AF_UNIX's 107 bytes (a pytest tmp_path does not)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="csray-", dir="/tmp"))
        self.token_file = root / "auth_token"
        self.token_file.write_text(uuid.uuid4().hex)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def env(self, authenticated: bool = True, **extra: str) -> dict[str, str]:
        """A process environment: the token on (RAY_AUTH_MODE=token, this cluster's token file) or off."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `cellsearch`, `ray`
        if authenticated:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        env.update(extra)
        return env

    def start(self, *args: str, env: dict[str, str] | None = None, wrap: list[str] | None = None,
              resources: dict[str, float] | None = None) -> subprocess.Popen:
        """One node (`ray start --block`, in a process group of its own); returns once the cluster counts it."""
        head = not self.nodes
        command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus", "1",
                   "--temp-dir", str(self.temp_dir),
                   "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
                   *(["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                      str(self.dashboard_port), "--ray-client-server-port", str(free_port())] if head
                     else ["--address", self.address]),
                   *(["--resources", json.dumps(resources)] if resources else []), *args]
        log = self.root / f"node-{len(self.nodes)}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen([*(wrap or []), *command], env=env or self.env(), stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        self.nodes.append(process)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):  # printed once the node is registered
            if process.poll() is not None:
                pytest.fail(f"ray start exited {process.returncode}: {log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"ray start did not start a node: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        while not head and self.alive_nodes() != len(self.nodes):  # a driver's node check must see it
            assert time.monotonic() < deadline, "the cluster does not count the new node"
            time.sleep(0.2)
        return process

    def alive_nodes(self) -> int:
        probe = subprocess.run([sys.executable, "-c", "import ray, sys\nray.init(address=sys.argv[1], "
                                "log_to_driver=False)\nprint(sum(n['Alive'] for n in ray.nodes()))", self.address],
                               env=self.env(), capture_output=True, text=True, timeout=120, cwd=self.root)
        return int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else -1

    def stop(self, process: subprocess.Popen) -> None:
        """Stop one node: its process group gets SIGTERM, then SIGKILL (Ray's servers may linger on SIGTERM); returns
        once the cluster no longer counts it (a driver would otherwise wait for the dead node's check task)."""
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the raylet unregisters: the cluster counts the node dead at once
        except ProcessLookupError:
            pass
        self.nodes.remove(process)
        deadline = time.monotonic() + 90
        while self.nodes and self.alive_nodes() != len(self.nodes):
            assert time.monotonic() < deadline, f"the cluster never came back to {len(self.nodes)} live nodes"
            time.sleep(0.2)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def shutdown(self) -> None:
        for process in list(self.nodes):
            for sent in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sent)
                    process.wait(timeout=3)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        # servers started by `ray start` that left its process group: named by this cluster's temporary directory
        time.sleep(1)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if str(self.temp_dir) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                        os.kill(int(entry.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("no `ray` command beside this Python")
    started = RayCluster(tmp_path_factory.mktemp("cluster"))
    try:
        started.start()
        yield started
    finally:
        started.shutdown()


def cellsearch(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # cwd outside the checkout: Ray gives workers the driver's sys.path, which would otherwise hold the checkout
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return result.stderr.strip().splitlines()[-1]


def write_config(directory: Path, **changes) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def table(run_dir: Path, query: str) -> list[tuple]:
    with sqlite3.connect(run_dir / "run.db") as connection:
        return connection.execute(query).fetchall()


@pytest.mark.slow
def test_attach_without_the_token_says_authentication_and_creates_nothing(cluster, tmp_path):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    result = cellsearch(["search", str(config), "--run-dir", str(run_dir), "--address", cluster.address,
                         "--no-progress"], cluster.env(authenticated=False), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("cellsearch search: error: cannot attach to the Ray cluster at")
    assert "token authentication" in line and "RAY_AUTH_MODE=token" in line, line
    assert not run_dir.exists()


@pytest.mark.slow
def test_node_without_cellsearch_is_refused_then_never_a_result(cluster, tmp_path):
    """A node whose workers cannot import cellsearch: refused before the run directory exists (so the same command
    runs unchanged once the node is fixed); met mid-search (a node that joined later), its failures stop the search
    (exit 69) and nothing is recorded as the cell's result: the unit stays pending, for `resume` (whose re-running
    of pending units tests/test_faults.py checks)."""
    shadow = tmp_path / "shadow" / "cellsearch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'cellsearch'\", "
                                        "name='cellsearch')\n")
    broken = cluster.start(env=cluster.env(PYTHONPATH=str(shadow.parent)), resources={"broken_node": 1})
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    search = ["search", str(config), "--run-dir", str(run_dir), "--address", cluster.address, "--no-progress"]
    try:
        refused = cellsearch(search, cluster.env(), tmp_path)
        assert refused.returncode == 2, refused.stderr[-3000:]
        line = last_line(refused)
        assert "1 of 2 Ray nodes cannot run units" in line and "cannot import cellsearch" in line, line
        assert not run_dir.exists()

        mid = tmp_path / "mid"
        (tmp_path / "mid_search.py").write_text(MID_SEARCH)
        stopped = subprocess.run([sys.executable, str(tmp_path / "mid_search.py"), cluster.address, str(config),
                                  str(mid), "broken_node"], env=cluster.env(), cwd=tmp_path, capture_output=True,
                                 text=True, timeout=300)
        assert stopped.returncode == 69, stopped.stderr[-4000:]
        line = last_line(stopped)
        assert "stopped: 3 units could not run because of their node's environment" in line, line
        assert "No module named 'cellsearch'" in line and f"cellsearch resume {mid}" in line, line
        # nothing recorded as a result of the cell: no evaluation, no rejection; the unit waits for resume (nothing
        # is lost: it has not run anywhere)
        assert table(mid, "select count(*) from cs_evaluations") == [(0,)]
        assert table(mid, "select status from cs_units") == [("pending",)]
        assert table(mid, "select count(*) from cs_cells where status = 'rejected'") == [(0,)]
    finally:
        cluster.stop(broken)


@pytest.mark.slow
def test_retrain_refuses_an_out_directory_a_node_does_not_share(cluster, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a node with a private mount")
    shared = tmp_path / "shared"
    shared.mkdir()
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "none",
                            str(shared)], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mounting is not permitted here ({probe.stderr.decode(errors='replace').strip()[:100]})")
    # the node sees its own empty tmpfs at the path of --out's parent: as a node without the shared file system
    private = cluster.start(wrap=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  f"mount -t tmpfs none {shared} && exec \"$@\"", "sh"])
    out = shared / "out"
    try:
        result = cellsearch(["retrain", "gru", "--task", "memorize", "--preset", "tiny", "--seeds", "1",
                             "--baselines", "", "--out", str(out), "--address", cluster.address, "--no-progress"],
                            cluster.env(), tmp_path)
    finally:
        cluster.stop(private)
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result)
    assert f"does not see {out}" in line and "every node mounts at the same path" in line, line
    assert not list(out.glob("runs/*/*/*")), "nothing may train before the check"


@pytest.mark.slow
def test_ray_job_submit_with_an_absolute_run_directory(cluster, tmp_path):
    """README: `ray job submit --working-dir DIR --runtime-env-json '{"env_vars": ...}' -- cellsearch search CONFIG
    --run-dir /ABSOLUTE --address auto` (the data directory through the job's environment, as the README says)."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_config(job_dir)
    run_dir = tmp_path / "job-run"
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
         f"http://127.0.0.1:{cluster.dashboard_port}", "--working-dir", str(job_dir), "--runtime-env-json",
         json.dumps({"env_vars": {"CELLSEARCH_PTB_DIR": os.environ.get("CELLSEARCH_PTB_DIR", "/nonexistent")}}), "--",
         "cellsearch", "search", "tiny.yaml", "--run-dir", str(run_dir), "--address", "auto", "--no-progress"],
        env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    assert "succeeded" in submit.stdout, submit.stdout[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["storage"].startswith("sqlite:///")
    assert table(run_dir, "select distinct status from cs_evaluations") == [("ok",)]


@pytest.mark.slow
def test_multifidelity_search_on_a_cluster(cluster, tmp_path):
    """Every multi-fidelity rule at once through `--address` on a token-authenticated `ray start` cluster: the
    filter's rung, successive halving within units, promotion across candidates and the confirm step; the search
    ends (exit 0) and storage, Optuna and the population agree."""
    from searchchecks import assert_search_consistent

    max_steps = 6
    config = write_config(
        tmp_path, tasks=["arithmetic"], initial_cells=["gru", "lstm"], memorize_task="memorize",
        memorize_threshold=0.0, settings_per_task=2, settings_per_unit=2, max_steps=max_steps, seed=4,
        fidelity={"enabled": True, "eta": 2, "min_fraction": 0.5},
        promotion={"enabled": True, "eta": 2, "fraction": 0.5, "grace": 1},
        filter_promotion={"enabled": True, "eta": 2, "fraction": 0.5, "grace": 1}, confirm_seeds=2)
    run_dir = tmp_path / "run"
    result = cellsearch(["search", str(config), "--run-dir", str(run_dir), "--address", cluster.address,
                         "--no-progress"], cluster.env(), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "candidates measured at the filter's rung" in result.stdout
    assert "candidates measured at the promotion rung" in result.stdout
    assert_search_consistent(run_dir, run_dir, max_steps)
    statuses = {row[0] for row in table(run_dir, "select distinct status from cs_evaluations")}
    assert {"rung", "pruned"} <= statuses, statuses
    names = {row[0] for row in table(run_dir, "select study_name from studies")}
    assert {"promotion", "filter-promotion"} <= names, names


# -- paths given on the command line (no Ray) -------------------------------------------------------------------

def test_relative_paths_are_resolved_against_the_directory_the_command_ran_in(tmp_path, monkeypatch):
    from cellsearch.commands._common import RAY_JOB_ENV, user_path
    from cellsearch.errors import UserError

    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert user_path("runs/x", "--run-dir") == tmp_path / "runs" / "x"
    assert user_path(tmp_path / "abs", "--run-dir") == tmp_path / "abs"
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert user_path(tmp_path / "abs", "--out") == tmp_path / "abs"
    with pytest.raises(UserError, match="--out out is relative, and this command runs as a Ray job"):
        user_path("out", "--out")


def test_a_search_inside_a_ray_job_needs_an_absolute_run_directory(tmp_path):
    """`ray job submit -- cellsearch search CONFIG`: the default runs/... would land in Ray's temporary copy of the
    working directory (deleted with the job): one line, exit 2, nothing created, before Ray is touched."""
    config = write_config(tmp_path)
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})}
    for extra in ([], ["--run-dir", "relative/run"]):
        result = cellsearch(["search", str(config), "--executor", "serial", *extra], env, tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "absolute" in last_line(result) and "Ray job" in last_line(result), result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.yaml"]


def test_example_cluster_yaml_is_a_ray_up_config_with_the_token_on():
    """search_configs/cluster/ray-up.yaml passes the checks `ray up` makes first (Ray's schema, after its defaults are
    filled in), and every node starts Ray with RAY_AUTH_MODE=token, the dashboard on the head's 127.0.0.1."""
    pytest.importorskip("ray.autoscaler")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "search_configs" / "cluster" / "ray-up.yaml").read_text())
    validate_config(prepare_config(config))
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if " start " in c]
    assert len(starts) == 2 and all(command.startswith("RAY_AUTH_MODE=token ") for command in starts)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    assert "~/.ray/auth_token" in config["file_mounts"]


# -- what a finished search reports (serial executor, in process) ------------------------------------------------

def test_a_reference_cell_without_a_score_is_not_a_successful_search(tmp_path, capsys):
    """Every evaluation of the reference cell failed (here: marked so in the database of a finished search): its
    ratios mean nothing, so the search says so and exits 70; the summary counts the errors."""
    from cellsearch import zoo
    from cellsearch.cli import main

    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--executor", "serial", "--no-progress"]) == 0
    capsys.readouterr()
    with sqlite3.connect(run_dir / "run.db") as connection:
        connection.execute("update cs_evaluations set status = 'error', score = 0 where cell_hash = ?",
                           (zoo.get("gru").hash,))
    assert main(["resume", str(run_dir), "--executor", "serial", "--no-progress"]) == 70
    out, err = capsys.readouterr()
    assert "evaluations 2 (1 failed with an error, scored 0)" in out, out
    assert err.strip().splitlines()[-1].startswith("cellsearch resume: failed: the reference cell gru has no score "
                                                   "on arithmetic"), err
