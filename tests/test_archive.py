"""`cellsearch archive`: a small read-only copy of a run that every reader accepts, and the committed reference run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from cellsearch.results import load_run
from searchchecks import serial_search

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "small-cal" / "archive"

TINY = {"tasks": ["arithmetic", "xml"], "budget_profile": "smoke", "population_size": 3, "settings_per_task": 2,
        "settings_per_unit": 1, "memorize_threshold": 0.0, "seed": 4, "max_steps": 3,
        "promotion": {"enabled": True, "eta": 2, "fraction": 0.5}}


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    results = load_run(run_dir)
    try:
        return {"cells": results.cells(), "evaluations": results.evaluations(), "steps": results.steps(),
                "units": results.units(), "promotions": results.promotions(),
                "population": results.population_changes()}
    finally:
        results.close()


@pytest.mark.slow
def test_an_archive_reads_like_its_run_anywhere_and_cannot_be_resumed(tmp_path):
    run_dir = serial_search(tmp_path / "run", TINY)
    done = cli("archive", str(run_dir), str(tmp_path / "archive"))
    assert done.returncode == 0, done.stderr
    assert "evaluations" in done.stdout
    # moved elsewhere (as a clone puts it): the same tables, the run's config and versions beside them
    moved = tmp_path / "elsewhere" / "archive"
    moved.parent.mkdir()
    shutil.move(tmp_path / "archive", moved)
    original, copy = tables(run_dir), tables(moved)
    for name in original:
        pd.testing.assert_frame_equal(original[name], copy[name], check_dtype=False)
    assert (moved / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    engine = sa.create_engine(f"sqlite:///{moved / 'run.db'}")
    with engine.connect() as connection:
        names = set(sa.inspect(connection).get_table_names())
    engine.dispose()
    assert "cs_evaluations" in names and "studies" not in names  # no Optuna tables: small, and not resumable
    top = cli("top", str(moved))
    assert top.returncode == 0 and "gru" in top.stdout
    # resume refuses in one line and writes nothing into the archive
    resumed = cli("resume", str(moved), "--executor", "serial")
    assert resumed.returncode == 2 and "archive" in resumed.stderr.strip().splitlines()[-1]
    engine = sa.create_engine(f"sqlite:///{moved / 'run.db'}")
    with engine.connect() as connection:
        assert set(sa.inspect(connection).get_table_names()) == names
    engine.dispose()
    # an existing directory of other files is not overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = cli("archive", str(run_dir), str(other))
    assert refused.returncode == 2 and (other / "notes.txt").read_text() == "mine"


def test_the_committed_reference_run_is_readable_from_a_clone():
    """results/small-cal/archive is what the one-hour reference run's tables and report come from."""
    results = load_run(COMMITTED)
    try:
        cells, evaluations = results.cells(), results.evaluations()
    finally:
        results.close()
    committed = pd.read_csv(REPO / "results" / "small-cal" / "evaluations.csv")
    assert len(evaluations) == len(committed) == 474 and len(cells) == 309
    assert cells.loc[cells["name"] == "gru", "score"].item() == pytest.approx(1.0)


@pytest.mark.slow
def test_the_committed_reference_run_can_be_re_reported(tmp_path):
    done = cli("report", str(COMMITTED), "--out", str(tmp_path / "report"), "--no-progress")
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "gru" in page and (tmp_path / "report" / "leaderboard.csv").is_file()


def test_filter_rung_replay_of_the_committed_run():
    """benchmarks/filter_rung.py on the committed one-hour run: the replay's bookkeeping holds (a rung at the whole
    filter loses nothing and, continuing, costs exactly the run's filter time; ASHA with eta 3 lets through about a
    third), and it reproduces the committed table."""
    import sys

    import pandas as pd

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from filter_rung import asha, replay
    finally:
        sys.path.pop(0)
    assert asha([0.1, 0.5, 0.2, 0.9, 0.05, 0.3], eta=3, grace=1) == [True, True, False, True, False, False]
    table, summary = replay(str(COMMITTED), [0.25, 1.0], [3], grace=3)
    whole = table[table["fraction"] == 1.0].iloc[0]
    assert whole["passers_lost"] == 0 and whole["cost_continue"] == pytest.approx(1.0)
    assert summary["filter_runs"] == 305 and whole["passed"] == 43
    committed = pd.read_csv(REPO / "results" / "multifidelity" / "filter_rung.csv")
    ours = committed[(committed["fraction"] == 0.25) & (committed["eta"] == 3)].iloc[0]
    mine = table[table["fraction"] == 0.25].iloc[0]
    assert (mine["promoted"], mine["passers_lost"], mine["cost_restart"]) == \
        (ours["promoted"], ours["passers_lost"], ours["cost_restart"])


def test_multifidelity_agreement_of_the_committed_runs():
    """benchmarks/multifidelity.py's scoring on the committed re-evaluations: the rescored cells, the top-10 Kendall tau
    of the two hour-long runs and its bootstrap interval come out as committed in results/multifidelity/new-rule, and
    the top 10 it scored are the archives' own top 10."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from multifidelity import reevaluated_scores, tau_interval
    finally:
        sys.path.pop(0)
    from cellsearch import zoo
    from cellsearch.stats import kendall_tau

    folder = REPO / "results" / "multifidelity" / "new-rule"
    table = pd.read_csv(folder / "reeval.csv").rename(columns={"hash": "cell_hash"})
    rescored = reevaluated_scores(table, zoo.get("gru").hash, ["arithmetic", "xml", "ptb"])
    assert rescored == pytest.approx(json.loads((folder / "rescored.json").read_text()))
    assert rescored[zoo.get("gru").hash] == 1.0
    for row in pd.read_csv(folder / "archives.csv").itertuples():
        results = load_run(REPO / row.run)
        try:
            top = results.top(10)
        finally:
            results.close()
        assert " ".join(h[:12] for h in top["cell_hash"]) == row.top_hashes
        searched = [float(x) for x in top["score"]]
        again = [rescored[h] for h in top["cell_hash"]]
        assert kendall_tau(searched, again) == pytest.approx(row.top_tau)
        assert tau_interval(searched, again) == pytest.approx((row.top_tau_low, row.top_tau_high))
