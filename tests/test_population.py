"""The score (cellsearch.scoring) and the population policy (cellsearch.search.population), without Ray or a search.

The score has one definition; these tests pin its edge cases and check that the driver's mapping form,
the results tables and the report's running best agree on a stored run, including a reference cell whose
every setting diverged on one task (best 0), where the old driver and tables disagreed.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from cellsearch import zoo
from cellsearch.config import from_mapping
from cellsearch.report import best_vs_evaluations
from cellsearch.results import load_run
from cellsearch.scoring import cell_score, score_of, task_ratio
from cellsearch.search.config import SearchConfig
from cellsearch.search.population import Admission, PopulationPolicy, best_first
from cellsearch.search.run import create_run


# -- the score -----------------------------------------------------------------------------------------------------

def test_ratio_and_score_edge_cases():
    assert task_ratio(0.3, 0.6) == pytest.approx(0.5)
    assert task_ratio(0.0, 0.6) == 0.0
    for reference in (0.0, -1.0, math.nan, math.inf, None):
        assert math.isnan(task_ratio(0.5, reference)), reference
    assert math.isnan(task_ratio(None, 0.5)) and math.isnan(task_ratio(pd.NA, 0.5))
    assert cell_score([1.2, 0.9, 1.0]) == pytest.approx(0.9)
    assert math.isnan(cell_score([])) and math.isnan(cell_score([1.0, math.nan]))


def test_score_is_the_worst_ratio_over_tasks():
    best = {("g", "a"): 0.5, ("g", "b"): 0.2, ("c", "a"): 0.6, ("c", "b"): 0.1}
    assert score_of(best, "c", "g", ("a", "b")) == pytest.approx(0.5)
    assert score_of(best, "g", "g", ("a", "b")) == pytest.approx(1.0)
    assert math.isnan(score_of({("c", "a"): 0.6, ("g", "a"): 0.5}, "c", "g", ("a", "b")))  # no result on b yet
    assert math.isnan(score_of({("c", "a"): 0.6, ("g", "a"): 0.0}, "c", "g", ("a",)))  # reference diverged


def test_driver_tables_and_report_agree_on_a_stored_run(tmp_path):
    config = from_mapping(SearchConfig, {"tasks": ["arithmetic", "xml"], "budget_profile": "smoke",
                                         "memorize_task": None, "population_size": 4, "seed": 3})
    config, storage = create_run(config, tmp_path / "run", log=lambda message: None)
    gru = zoo.get("gru").hash
    cells = {gru: {"arithmetic": [0.5, 0.4], "xml": [0.0, 0.0]},  # every xml setting of the reference diverged
             "a" * 64: {"arithmetic": [0.6], "xml": [0.3]},
             "b" * 64: {"arithmetic": [0.2, 0.45], "xml": [0.0]},
             "c" * 64: {"arithmetic": [0.7]}}  # not evaluated on xml yet
    try:
        for step, (cell_hash, per_task) in enumerate(cells.items()):
            storage.start_step(step, "seed", cell_hash, None, {
                "hash": cell_hash, "name": None, "spec_json": "{}", "parent_hash": None, "mutation_json": None,
                "step_created": step, "node_count": 1, "params_per_width": 3.0, "status": "population"})
            for slot, (task, scores) in enumerate(per_task.items()):
                (unit_id,) = storage.add_units([{"step": step, "stage": 0, "cell_hash": cell_hash, "task": task,
                                                 "slot": slot, "settings_json": "[]"}])
                storage.commit_unit(unit_id, step, cell_hash, task, [
                    {"trial_number": number, "params_json": "{}", "seed": 1, "score": score, "status": "ok",
                     "duration_s": 0.1, "train_steps": 1, "epochs": 1, "metrics_json": "{}", "curve_json": "[]",
                     "node_id": "n", "worker_pid": 1, "hostname": "h"} for number, score in enumerate(scores)])
        best = storage.best_scores()
    finally:
        storage.close()
    run = load_run(tmp_path / "run")
    try:
        table = run.cells().set_index("cell_hash")
        for cell_hash in cells:
            expected = score_of(best, cell_hash, gru, config.tasks)
            got = table.at[cell_hash, "score"]
            assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected), cell_hash
        # With the reference at 0 on xml, no cell has a score: NaN everywhere, never a huge ratio.
        assert table["score"].isna().all()
        assert table.at["a" * 64, "ratio_arithmetic"] == pytest.approx(0.6 / 0.5)
        assert math.isnan(table.at["a" * 64, "ratio_xml"])
        curve = best_vs_evaluations(run, run.cells())
        assert curve["best_score"].isna().all()
    finally:
        run.close()


# -- the population policy ----------------------------------------------------------------------------------------

SCORES = {"a": 0.9, "b": 1.1, "c": math.nan, "d": 1.0, "e": 1.1}


def score(cell_hash: str) -> float:
    return SCORES[cell_hash]


def test_best_first_puts_nan_last_and_breaks_ties_by_hash():
    assert best_first(SCORES) == ["e", "b", "d", "a", "c"]


def test_uniform_selection_draws_every_member_equally_often():
    policy = PopulationPolicy("uniform", population_size=5)
    rng = np.random.default_rng(0)
    counts = Counter(policy.select(sorted(SCORES), score, rng) for _ in range(5000))
    assert set(counts) == set(SCORES)
    assert all(abs(count - 1000) < 150 for count in counts.values()), counts


def test_tournament_selection_favours_the_best_and_never_picks_a_nan_over_a_number():
    policy = PopulationPolicy("tournament", population_size=5, tournament_size=2)
    rng = np.random.default_rng(1)
    counts = Counter(policy.select(sorted(SCORES), score, rng) for _ in range(5000))
    # Pairs drawn without replacement: "c" (NaN) wins no pair, "e" (best, tie with b broken by hash) wins all 4.
    assert "c" not in counts
    assert counts["e"] > counts["b"] > counts["a"]
    assert counts["e"] == pytest.approx(5000 * 4 / 10, rel=0.1)
    full = PopulationPolicy("tournament", population_size=5, tournament_size=10)
    assert {full.select(sorted(SCORES), score, rng) for _ in range(20)} == {"e"}


def test_selection_is_reproducible_from_the_generator():
    policy = PopulationPolicy("tournament", population_size=5, tournament_size=3)
    first = [policy.select(sorted(SCORES), score, np.random.default_rng(7)) for _ in range(3)]
    assert first == [policy.select(sorted(SCORES), score, np.random.default_rng(7)) for _ in range(3)]
    with pytest.raises(ValueError, match="empty"):
        policy.select([], score, np.random.default_rng(0))


def test_admission_replaces_the_worst_member_only_when_better():
    members = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    policy = PopulationPolicy("uniform", population_size=5)
    # The worst member is "c" (NaN ranks below every number): any scored candidate replaces it.
    assert policy.admit(0.1, members, score) == Admission(True, "c")
    without_nan = {h: s for h, s in members.items() if h != "c"}
    assert PopulationPolicy("uniform", population_size=4).admit(0.95, without_nan, score) == Admission(True, "a")
    assert PopulationPolicy("uniform", population_size=4).admit(0.9, without_nan, score) == Admission(False)
    assert PopulationPolicy("uniform", population_size=4).admit(math.nan, without_nan, score) == Admission(False)
    # Not full: everyone enters, nobody leaves.
    assert PopulationPolicy("tournament", population_size=10).admit(0.0, members, score) == Admission(True)


def test_aging_admits_every_candidate_and_the_oldest_leaves():
    members = {"a": 5, "b": 1, "c": 2, "d": 3, "e": 4}
    policy = PopulationPolicy("aging", population_size=5, tournament_size=2)
    assert policy.admit(0.0, members, score) == Admission(True, "b")
    assert policy.admit(math.nan, members, score) == Admission(True, "b")


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="unknown selection"):
        PopulationPolicy("roulette")
    with pytest.raises(ValueError, match="at least 1"):
        PopulationPolicy("uniform", population_size=0)
