"""``cellsearch report`` on a tiny real search run (serial executor), with a retrain of its best cell."""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from cellsearch.errors import UserError
from cellsearch.report import _table_html
from cellsearch.results import load_run
from cellsearch.retrain import RetrainOptions, resolve_source, retrain
from searchchecks import serial_search

# end-to-end: subprocesses, Ray, whole searches (the fast tier, `-m "not slow and not faults"`, skips them)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: Two scored tasks on smoke budgets; no early stop, so candidates pass every task and have lineages to show.
TINY = {
    "tasks": ["arithmetic", "xml"], "budget_profile": "smoke", "population_size": 3, "settings_per_task": 2,
    "settings_per_unit": 1, "memorize_threshold": 0.03, "early_stop_fraction": 0.0, "reevaluate_probability": 0.2,
    "seed": 11, "max_steps": 8,
}
LISTED = ["index.html", "leaderboard.csv", "best_vs_evaluations.csv", "best_vs_evaluations.png", "ratios.csv",
          "ratios.png", "filters.csv", "lineage.csv", "retrain_summary.csv", "retrain_results.csv",
          "retrain_curves.csv", "retrain_curves.png"]


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    return serial_search(tmp_path_factory.mktemp("search") / "run", TINY)


@pytest.fixture(scope="module")
def retrain_dir(search_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrain")
    retrain(resolve_source(str(search_run), top=1), "memorize", "tiny", out,
            RetrainOptions(seeds=1, baselines=("lstm_b",), in_process=True))
    return out


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.references: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.references += [value for name, value in attrs if name in ("src", "href") and value]


def test_report_has_every_artefact_and_only_local_links(search_run, retrain_dir, tmp_path):
    out = tmp_path / "report"
    completed = subprocess.run(
        [sys.executable, "-m", "cellsearch.cli", "report", str(search_run), "--retrain", str(retrain_dir),
         "--out", str(out), "--drawn", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    assert "report written to" in completed.stdout
    for name in LISTED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    drawings = sorted(path.name for path in (out / "cells").glob("*.png"))
    assert len(drawings) == 3 and len(list((out / "cells").glob("*.txt"))) == 3

    page = (out / "index.html").read_text(encoding="utf-8")
    parser = _References()
    parser.feed(page)
    assert parser.scripts == 0
    assert set(parser.references) >= {"best_vs_evaluations.png", "ratios.png", "retrain_curves.png",
                                      "leaderboard.csv", "lineage.csv", "filters.csv"}
    for reference in parser.references:
        assert "://" not in reference and not reference.startswith("/"), reference
        assert (out / reference).is_file(), reference
    for heading in ("Leaderboard", "Best score against evaluations spent", "Per-task ratios", "Filters",
                    "Top cells", "Lineage of the best cells", "Retraining"):
        assert heading in page

    run = load_run(search_run)
    try:
        cells = run.cells()
        evaluations = len(run.evaluations())
    finally:
        run.close()
    leaderboard = pd.read_csv(out / "leaderboard.csv")
    assert leaderboard.loc[leaderboard["name"] == "gru", ["ratio_arithmetic", "ratio_xml"]].values.tolist() == [[1, 1]]
    passed = cells["status"].isin(["population", "evaluated"]) & cells["score"].notna()
    assert len(leaderboard) == passed.sum() and leaderboard["score"].is_monotonic_decreasing
    curve = pd.read_csv(out / "best_vs_evaluations.csv")
    assert len(curve) == evaluations and curve["best_score"].dropna().is_monotonic_increasing
    filters = pd.read_csv(out / "filters.csv").set_index("filter")["cells"]
    candidates = filters["candidates proposed by mutation"]
    assert candidates == cells["parent_hash"].notna().sum() > 0
    assert candidates == (filters["duplicates (skipped)"] + filters["failed memorisation (memorize)"]
                          + filters["stopped at arithmetic"] + filters["stopped at xml"]
                          + filters["still being evaluated"] + filters["passed every task"])
    lineage = pd.read_csv(out / "lineage.csv")
    assert not lineage.empty
    for _, chain in lineage.groupby("rank"):
        chain = chain.sort_values("depth")
        assert chain["ancestor"].iloc[0] in ("gru", "lstm") and chain["mutation"].iloc[0] == "seed cell"
        assert chain["mutation"].iloc[1:].str.len().gt(0).all()
    retrained = pd.read_csv(out / "retrain_summary.csv")
    assert list(retrained["role"]) == ["candidate", "baseline"]


def test_retrain_sources_from_a_run(search_run):
    run = load_run(search_run)
    try:
        top = run.top(2)
    finally:
        run.close()
    best = resolve_source(f"{search_run}:{top['cell_hash'].iloc[0][:10]}")
    assert [cell.spec.hash for cell in best] == [top["cell_hash"].iloc[0]]
    two = resolve_source(str(search_run), top=2)
    assert [cell.spec.hash for cell in two] == list(top["cell_hash"])
    assert two[0].label.startswith("top01-")
    with pytest.raises(UserError, match="--top N"):
        resolve_source(str(search_run))
    with pytest.raises(UserError, match="no cell with hash"):
        resolve_source(f"{search_run}:abcdef0123")


def test_report_text_is_escaped():
    table = pd.DataFrame({"cell": ["<script>alert(1)</script>"], "note": ['a & "b"']})
    rendered = _table_html(table)
    assert "<script>" not in rendered and "&lt;script&gt;" in rendered and "a &amp; &quot;b&quot;" in rendered
