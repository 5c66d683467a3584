"""End to end through the real CLI: the smoke config on an embedded local Ray, then top/show/export."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cellsearch.results import load_run
from cellsearch.spec import CellSpec

# end-to-end: subprocesses, Ray, whole searches (the fast tier, `-m "not slow and not faults"`, skips them)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def cellsearch(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, ptb_dir):
    """The shipped smoke config (all three tasks, ptb included), cut to 2 steps, with --workers 2."""
    run_dir = tmp_path_factory.mktemp("cli") / "smoke"
    env = {**os.environ, "CELLSEARCH_PTB_DIR": str(ptb_dir)}
    env.pop("RAY_ADDRESS", None)
    result = cellsearch("search", "search_configs/smoke.yaml", "--run-dir", str(run_dir), "--workers", "2",
                        "--max-steps", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_smoke_search_end_to_end(smoke_run):
    run_dir, result = smoke_run
    assert "top " in result.stdout and "gru" in result.stdout
    assert "units" in result.stderr  # the progress bar
    assert (run_dir / "config.yaml").is_file()
    versions = json.loads((run_dir / "versions.json").read_text())
    assert {"python", "torch", "ray", "optuna", "pandas", "numpy", "networkx"} <= set(versions)
    results = load_run(run_dir)
    try:
        cells, evaluations, steps = results.cells(), results.evaluations(), results.steps()
    finally:
        results.close()
    assert (steps["kind"] != "seed").sum() == 2 and (steps["status"] == "done").all()
    seeds = evaluations[evaluations["step"] < 2]
    # K = 3 settings per task for each seed cell, on every task including ptb.
    assert seeds.groupby(["cell_hash", "task"]).size().to_dict() == {
        (cell, task): 3 for cell in seeds["cell_hash"].unique() for task in ("arithmetic", "xml", "ptb")}
    assert (evaluations["node"] != "local").all()  # ran on Ray workers
    assert not evaluations.duplicated(["cell_hash", "task", "trial_number"]).any()
    # one vocabulary: the raw task value is `metric` (PTB's perplexity beside it), the ratio only in cells()
    ptb = evaluations[(evaluations["task"] == "ptb") & (evaluations["metric"] > 0)]
    assert len(ptb) and ptb["perplexity"].to_numpy() == pytest.approx((1 / ptb["metric"]).to_numpy())
    assert evaluations.loc[evaluations["task"] != "ptb", "perplexity"].isna().all()
    assert cells.loc[cells["name"] == "gru", "score"].item() == pytest.approx(1.0)
    assert {"metric_ptb", "perplexity_ptb", "ratio_ptb", "params_per_width", "nodes", "parent_hash", "mutation",
            "mutation_detail", "step_created"} <= set(cells.columns)
    assert not {"hash", "parent", "mutation_json", "best_ptb"} & set(cells.columns)
    mutated = cells[cells["parent_hash"].notna() & (cells["rejected_by"] != "duplicate")]
    assert len(mutated) and mutated["mutation"].str.len().gt(0).all()


def test_top_show_export(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    top_csv = cellsearch("top", str(run_dir), "-n", "2", "--csv")
    assert top_csv.returncode == 0, top_csv.stderr
    table = pd.read_csv(io.StringIO(top_csv.stdout))
    assert 1 <= len(table) <= 2 and table["score"].is_monotonic_decreasing
    top_json = cellsearch("top", str(run_dir), "--json")
    assert json.loads(top_json.stdout)[0]["cell_hash"] == table["cell_hash"][0]

    shown = cellsearch("show", str(run_dir), table["cell_hash"][0][:10], "--png", str(tmp_path / "cell.png"))
    assert shown.returncode == 0, shown.stderr
    for part in ("lineage", "results", "arithmetic", "ptb", "h' ="):
        assert part in shown.stdout
    assert (tmp_path / "cell.png").stat().st_size > 0

    exported = cellsearch("export", str(run_dir), "--top", "2", str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr
    files = sorted((tmp_path / "out").glob("*.json"))
    assert len(files) == len(table)
    assert CellSpec.load(files[0]).hash == table["cell_hash"][0]


def test_cli_rejects_bad_input(tmp_path, smoke_run):
    run_dir, _ = smoke_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [arithmetic]\nsettings_per_task: 0\n")
    result = cellsearch("search", str(bad), "--run-dir", str(tmp_path / "r"), "--executor", "serial")
    assert result.returncode == 2 and "settings_per_task" in result.stderr and "Traceback" not in result.stderr
    result = cellsearch("show", str(run_dir), "ffffffffff")
    assert result.returncode == 2 and "no cell with hash" in result.stderr
    result = cellsearch("resume", str(tmp_path))
    assert result.returncode == 2 and "not a search run directory" in result.stderr
    result = cellsearch("show", "gru")
    assert result.returncode == 0 and "hash:" in result.stdout
