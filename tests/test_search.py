"""The search driver in process (serial executor): configs, determinism, resume, selection, storage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from cellsearch.config import ConfigError, from_mapping
from cellsearch.errors import UserError
from cellsearch.results import load_run
from cellsearch.search import seeds
from cellsearch.search.config import SearchConfig, load_search_config, resolve_ptb_dir
from cellsearch.scoring import score_of
from cellsearch.search.driver import SearchDriver, stages_for
from cellsearch.search.executors import SerialExecutor
from cellsearch.search.run import create_run, open_run, task_loader
from cellsearch.search.storage import EVALUATIONS, UNITS
from searchchecks import readable_study_name

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "tasks": ["arithmetic", "xml"],
    "budget_profile": "smoke",
    "population_size": 3,
    "settings_per_task": 2,
    "settings_per_unit": 1,
    "memorize_threshold": 0.0,
    "reevaluate_probability": 0.2,
    "seed": 5,
    "max_steps": 6,
}


def tiny_config(**changes) -> SearchConfig:
    return from_mapping(SearchConfig, {**TINY, **changes})


def run_serial(config: SearchConfig, run_dir: Path, stop_after_units: int | None = None):
    """Create or reopen a run and drive it with the serial executor; optionally abandon after N units."""
    if (run_dir / "run.json").exists():
        config, storage = open_run(run_dir)
    else:
        config, storage = create_run(config, run_dir)
    executor = SerialExecutor(task_loader(config))
    driver = None

    def on_progress(progress):
        if stop_after_units is not None and progress.units_done >= stop_after_units:
            driver.request_stop("abandon")

    driver = SearchDriver(config, storage, executor, task_loader(config), on_progress=on_progress)
    try:
        return driver.run()
    finally:
        storage.close()


def trained(run_dir: Path) -> pd.DataFrame:
    """Every trained setting, in a form comparable across runs."""
    results = load_run(run_dir)
    try:
        table = results.evaluations()
    finally:
        results.close()
    columns = ["step", "cell_hash", "task", "trial_number", "seed", "metric", "status", "init_scale", "learning_rate",
               "max_grad_norm", "num_layers", "parameter_budget", "dropout"]
    return table[columns].sort_values(["step", "cell_hash", "task", "trial_number"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ config


def test_config_rejects_unknown_key_and_bad_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: [arithmetic]\npopulaton_size: 10\n")
    with pytest.raises(ConfigError, match="populaton_size"):
        load_search_config(path)
    with pytest.raises(ConfigError, match="selection"):
        tiny_config(selection="roulette")
    with pytest.raises(ConfigError, match="reevaluate_probability"):
        tiny_config(reevaluate_probability=1.5)
    with pytest.raises(ConfigError, match="resources.num_cpus"):
        tiny_config(resources={"num_cpus": 0})
    with pytest.raises(ConfigError, match="resources.gpus"):
        tiny_config(resources={"gpus": 1})
    with pytest.raises(ConfigError, match="reference_cell"):
        tiny_config(reference_cell="lstm_b")
    with pytest.raises(ConfigError, match="memorize_task"):
        tiny_config(tasks=["memorize", "xml"])
    with pytest.raises(ConfigError, match="unknown task wikitext"):
        tiny_config(tasks=["wikitext"])
    with pytest.raises(ConfigError, match="initial_cells"):
        tiny_config(initial_cells=["gru", "transformer"])
    with pytest.raises(ConfigError, match="mutation.max_node"):
        tiny_config(mutation={"max_node": 3})


def test_shipped_configs_load():
    for name in ("smoke", "small", "medium", "paper"):
        config = load_search_config(REPO / "search_configs" / f"{name}.yaml")
        assert config.tasks == ("arithmetic", "xml", "ptb")
    paper = load_search_config(REPO / "search_configs" / "paper.yaml")
    assert (paper.population_size, paper.settings_per_task, paper.memorize_threshold,
            paper.early_stop_fraction, paper.selection) == (100, 20, 0.95, 0.9, "uniform")


def test_ptb_dir_resolution(monkeypatch, tmp_path, ptb_dir):
    config = tiny_config(tasks=["arithmetic", "ptb"])
    monkeypatch.delenv("CELLSEARCH_PTB_DIR", raising=False)
    with pytest.raises(UserError, match="CELLSEARCH_PTB_DIR"):
        resolve_ptb_dir(config)
    monkeypatch.setenv("CELLSEARCH_PTB_DIR", str(ptb_dir))
    assert resolve_ptb_dir(config) == str(ptb_dir.resolve())
    with pytest.raises(UserError, match="no ptb.train.txt"):
        resolve_ptb_dir(config.with_overrides(ptb_dir=str(tmp_path)))
    assert resolve_ptb_dir(tiny_config()) is None


def test_stages_follow_the_paper():
    config = tiny_config()
    mutate = stages_for("mutate", config)
    assert [(s.tasks, s.settings, s.gate) for s in mutate] == [
        (("memorize",), 1, "memorize"), (("arithmetic",), 2, "ratio"), (("xml",), 2, "ratio")]
    assert [(s.tasks, s.gate) for s in stages_for("reevaluate", config)] == [(("arithmetic", "xml"), "none")]
    assert [s.tasks for s in stages_for("mutate", tiny_config(memorize_task=None))] == [("arithmetic",), ("xml",)]


def test_promotion_adds_a_rung_stage_after_the_filter():
    config = tiny_config(promotion={"enabled": True})
    mutate = stages_for("mutate", config)
    assert [(s.tasks, s.settings, s.gate, s.rung) for s in mutate] == [
        (("memorize",), 1, "memorize", False), (("arithmetic", "xml"), 2, "promote", True),
        (("arithmetic",), 2, "ratio", False), (("xml",), 2, "ratio", False)]
    assert not any(s.rung for s in stages_for("reevaluate", config))
    for bad, key in [({"eta": 1}, "promotion.eta"), ({"fraction": 1.0}, "promotion.fraction"),
                     ({"fraction": 0}, "promotion.fraction"), ({"rungs": 2}, "promotion.rungs")]:
        with pytest.raises(ConfigError, match=key):
            tiny_config(promotion=bad)


def test_filter_promotion_adds_a_rung_stage_before_the_filter():
    config = tiny_config(filter_promotion={"enabled": True}, promotion={"enabled": True})
    assert [(s.tasks, s.gate, s.rung) for s in stages_for("mutate", config)] == [
        (("memorize",), "filter_promote", True), (("memorize",), "memorize", False),
        (("arithmetic", "xml"), "promote", True), (("arithmetic",), "ratio", False), (("xml",), "ratio", False)]
    assert [s.gate for s in stages_for("seed", config)] == ["none"]
    with pytest.raises(ConfigError, match="filter_promotion.enabled: there is no memorisation filter"):
        tiny_config(filter_promotion={"enabled": True}, memorize_task=None)
    for bad, key in [({"eta": 1}, "filter_promotion.eta"), ({"fraction": 1}, "filter_promotion.fraction"),
                     ({"grace": -1}, "filter_promotion.grace"), ({"initial_cells_compete": True},
                                                                 "filter_promotion.initial_cells_compete")]:
        with pytest.raises(ConfigError, match=key):
            tiny_config(filter_promotion=bad)


def test_score_is_min_ratio_to_the_reference():
    best = {("g", "a"): 0.5, ("g", "b"): 0.2, ("c", "a"): 0.6, ("c", "b"): 0.1}
    assert score_of(best, "c", "g", ("a", "b")) == pytest.approx(0.5)
    assert score_of(best, "g", "g", ("a", "b")) == pytest.approx(1.0)
    assert pd.isna(score_of({("c", "a"): 0.6}, "c", "g", ("a", "b")))


def test_random_streams_are_keyed_not_global():
    first = seeds.generator(7, seeds.STEP_STREAM, 3).random(4)
    assert (first == seeds.generator(7, seeds.STEP_STREAM, 3).random(4)).all()
    assert not (first == seeds.generator(7, seeds.STEP_STREAM, 4).random(4)).all()
    assert not (first == seeds.generator(8, seeds.STEP_STREAM, 3).random(4)).all()
    assert seeds.derived_seed(7, seeds.TRAIN_STREAM, 1, 2) == seeds.derived_seed(7, seeds.TRAIN_STREAM, 1, 2)
    assert 0 <= seeds.derived_seed(7, seeds.TRAIN_STREAM, 1, 2) < 2 ** 31


# ------------------------------------------------------------------------------------------------ searches


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted serial search that other tests compare against."""
    run_dir = tmp_path_factory.mktemp("search") / "reference"
    run_serial(tiny_config(), run_dir)
    return run_dir


def test_serial_search_records_everything(reference_run):
    results = load_run(reference_run)
    try:
        cells, evaluations, steps = results.cells(), results.evaluations(), results.steps()
        changes = results.population_changes()
    finally:
        results.close()
    assert (steps["kind"] != "seed").sum() == 6 and (steps["status"] == "done").all()
    # Every trained setting is distinct within its cell and task (Optuna never repeats one).
    settings = evaluations[["cell_hash", "task", "init_scale", "learning_rate", "max_grad_norm", "num_layers",
                            "parameter_budget", "dropout"]]
    assert not settings.duplicated().any()
    assert not evaluations.duplicated(["cell_hash", "task", "trial_number"]).any()
    # Seeds: K settings per task; their ratios to the reference are 1 for the GRU itself.
    gru = cells[cells["name"] == "gru"].iloc[0]
    assert gru["score"] == pytest.approx(1.0)
    assert gru["status"] == "population"
    assert set(cells["status"]) <= {"population", "evaluated", "rejected"}
    rejected = cells[cells["status"] == "rejected"]
    assert set(rejected["rejected_by"]) <= {"duplicate", "memorize", "arithmetic", "xml"}
    # A candidate stopped by a task has no evaluations on the tasks after it.
    for row in rejected[rejected["rejected_by"] == "arithmetic"].itertuples():
        assert pd.isna(row.metric_xml)
    # The population never exceeds its size, and matches the replay of its changes.
    members = set()
    for change in changes.itertuples():
        (members.add if change.action == "enter" else members.discard)(change.cell_hash)
        assert len(members) <= 3
    assert members == set(cells.loc[cells["status"] == "population", "cell_hash"])
    # Scores come from the reference's current best.
    reference = cells.attrs["reference_best"]
    assert reference["arithmetic"] == pytest.approx(gru["metric_arithmetic"])
    scored = cells.dropna(subset=["score"])
    expected = scored[["metric_arithmetic", "metric_xml"]].div(pd.Series(reference)[["arithmetic", "xml"]].values).min(
        axis=1)
    assert scored["score"].to_numpy() == pytest.approx(expected.to_numpy())


def test_optuna_sees_readable_studies_and_trial_states(reference_run):
    """What optuna-dashboard shows, read back through Optuna's own API: each study names its cell, task,
    equations and objective; each trial's state and ``status`` attribute follow the evaluation row."""
    import optuna
    from optuna.trial import TrialState

    results = load_run(reference_run)
    try:
        evaluations, cells = results.evaluations(), results.cells().set_index("cell_hash")
    finally:
        results.close()
    url = f"sqlite:///{reference_run / 'run.db'}"
    expected_state = {"ok": TrialState.COMPLETE, "timeout": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                      "diverged": TrialState.FAIL, "oom": TrialState.FAIL, "error": TrialState.FAIL}
    for (cell, task), rows in evaluations.groupby(["cell_hash", "task"]):
        study = optuna.load_study(study_name=readable_study_name(reference_run, cell, task), storage=url)
        attrs = study.user_attrs
        assert attrs["cell"] == (cells.at[cell, "name"] if isinstance(cells.at[cell, "name"], str) else cell[:12])
        assert attrs["task"] == task and attrs["cell_hash"] == cell and " = " in attrs["equations"]
        assert study.metric_names == ["accuracy (held-out)"]
        trials = {trial.number: trial for trial in study.trials}
        for row in rows.itertuples():
            trial = trials[row.trial_number]
            assert trial.state == expected_state[row.status] and trial.user_attrs["status"] == row.status
            if trial.state == TrialState.COMPLETE:
                assert trial.value == pytest.approx(row.metric)


def test_same_seed_same_search(reference_run, tmp_path):
    run_serial(tiny_config(), tmp_path / "again")
    pd.testing.assert_frame_equal(trained(reference_run), trained(tmp_path / "again"))


def test_resume_after_abandon_continues_the_same_search(reference_run, tmp_path):
    import optuna

    run_dir = tmp_path / "interrupted"
    run_serial(tiny_config(), run_dir, stop_after_units=11)
    engine = sa.create_engine(f"sqlite:///{run_dir / 'run.db'}")
    with engine.connect() as connection:
        committed = connection.execute(sa.select(sa.func.count()).select_from(EVALUATIONS)).scalar_one()
        pending = connection.execute(sa.select(sa.func.count()).select_from(UNITS).where(
            UNITS.c.status == "pending")).scalar_one()
        # as a run made before study names were readable: <64-digit hash>/<task>; the resume renames them, once
        hashes = [row[0] for row in connection.execute(sa.text("SELECT hash FROM cs_cells"))]
        for cell_hash in hashes:
            for task in ("memorize", "arithmetic", "xml"):
                connection.execute(sa.text("UPDATE studies SET study_name = :old WHERE study_name = :new"),
                                   {"old": f"{cell_hash}/{task}", "new": readable_study_name(run_dir, cell_hash, task)})
        connection.commit()
        legacy = {row[0] for row in connection.execute(sa.text("SELECT study_name FROM studies"))}
    engine.dispose()
    assert committed == 11 and pending > 0
    assert legacy and all(len(name.partition("/")[0]) == 64 for name in legacy)
    run_serial(tiny_config(), run_dir)
    pd.testing.assert_frame_equal(trained(reference_run), trained(run_dir))
    names = set(optuna.get_all_study_names(storage=f"sqlite:///{run_dir / 'run.db'}"))
    assert {"gru/arithmetic", "lstm/xml"} <= names and not any(len(name.partition("/")[0]) == 64 for name in names)
    assert names == set(optuna.get_all_study_names(storage=f"sqlite:///{reference_run / 'run.db'}"))


HALVING = {"settings_per_task": 3, "settings_per_unit": 3, "max_steps": 4,
           "fidelity": {"enabled": True, "eta": 3, "min_fraction": 0.5}}


@pytest.mark.slow
def test_successive_halving_prunes_settings_and_tells_optuna(tmp_path):
    """Smoke budget (2 epochs of 5 steps), rungs at 5 and 10 steps: of each unit's 3 settings the best one goes on
    past the first rung. Pruned settings are PRUNED trials with their learning curve as intermediate values, and
    never count toward a cell's best; resuming an interrupted halving search gives the same search."""
    import optuna
    from optuna.trial import TrialState

    config = tiny_config(**HALVING)
    run_serial(config, tmp_path / "halving")
    results = load_run(tmp_path / "halving")
    try:
        evaluations, cells = results.evaluations(), results.cells()
    finally:
        results.close()
    assert set(evaluations["status"]) <= {"ok", "pruned", "diverged", "timeout"}
    scored = evaluations[evaluations["task"] != "memorize"]  # the filter trains one setting: nothing to rank
    per_unit = scored.groupby("unit_id")["status"].agg(list)
    assert len(per_unit) >= 6
    for statuses in per_unit:
        assert len(statuses) == 3
        if "diverged" not in statuses:  # a member that diverges before the rung leaves the ranking
            assert statuses.count("pruned") == 2, statuses
    pruned = evaluations[evaluations["status"] == "pruned"]
    assert len(pruned) and (pruned["train_steps"] == 5).all()
    assert (scored.loc[scored["status"] == "ok", "train_steps"] == 10).all()
    # The best per cell and task ignores pruned settings.
    kept = evaluations[evaluations["status"] != "pruned"]
    best = kept.groupby(["cell_hash", "task"])["metric"].max()
    for row in cells.dropna(subset=["metric_arithmetic"]).itertuples():
        assert row.metric_arithmetic == pytest.approx(best[(row.cell_hash, "arithmetic")])
    # Optuna: one trial per setting, PRUNED or COMPLETE, with the curve's steps as intermediate values.
    url = f"sqlite:///{tmp_path / 'halving' / 'run.db'}"
    for row in evaluations.head(12).itertuples():
        study = optuna.load_study(study_name=readable_study_name(tmp_path / "halving", row.cell_hash, row.task),
                                  storage=url)
        trial = study.trials[row.trial_number]
        expected = {"pruned": TrialState.PRUNED, "diverged": TrialState.FAIL}.get(row.status, TrialState.COMPLETE)
        assert trial.state == expected, (row.status, trial.state)
        if row.status != "diverged":
            assert max(trial.intermediate_values) == row.train_steps
    # Interrupted and resumed: the same search.
    run_serial(config, tmp_path / "interrupted", stop_after_units=7)
    run_serial(config, tmp_path / "interrupted")
    pd.testing.assert_frame_equal(trained(tmp_path / "halving"), trained(tmp_path / "interrupted"))


CONFIRM = {"confirm_seeds": 3, "max_steps": 8, "seed": 3}


@pytest.mark.slow
def test_candidates_above_the_reference_are_confirmed_on_paired_fresh_seeds(tmp_path):
    """Every candidate that finished above 1 gets a confirm step: its best setting and the reference's best setting
    on the same fresh seeds; the tables recompute the driver's decision; confirm steps are not search steps; an
    interrupted search resumes to the same confirmations."""
    from cellsearch.search.confirmation import confirm, pairs_by_task

    config = tiny_config(**CONFIRM)
    progress = run_serial(config, tmp_path / "confirm")
    results = load_run(tmp_path / "confirm")
    try:
        steps, cells, evaluations = results.steps(), results.cells().set_index("cell_hash"), results.evaluations()
    finally:
        results.close()
    assert (steps["kind"].isin(["mutate", "reevaluate"])).sum() == 8  # max_steps counts search steps only
    above = steps[steps["outcome"].fillna("").str.endswith(":confirm")]
    confirms = steps[steps["kind"] == "confirm"]
    assert len(above) >= 1, "this seed was chosen for a candidate above 1 at smoke budgets"
    assert sorted(above["cell_hash"]) == sorted(confirms["cell_hash"])
    assert set(confirms["outcome"]) <= {"confirmed", "not_confirmed"} and (confirms["status"] == "done").all()
    assert progress.beat_reference == len(above)
    assert progress.confirmed == (confirms["outcome"] == "confirmed").sum()
    gru = evaluations.loc[evaluations["step"] < 2, "cell_hash"].iloc[0]  # step 0 is the reference's seed step
    for step in confirms.itertuples():
        rows = evaluations[evaluations["step"] == step.step]
        assert set(rows["cell_hash"]) == {step.cell_hash, gru}
        for task, per_task in rows.groupby("task"):
            # the same seeds for both cells, one setting per cell (its best), three seeds
            seeds_of = per_task.groupby("cell_hash")["seed"].apply(lambda s: tuple(sorted(s)))
            assert seeds_of.nunique() == 1 and len(seeds_of.iloc[0]) == 3
            assert per_task.groupby("cell_hash")["learning_rate"].nunique().eq(1).all()
        expected = confirm(pairs_by_task(rows.to_dict("records"), step.cell_hash, gru), config.tasks)
        assert bool(cells.at[step.cell_hash, "confirmed"]) == expected.confirmed == (step.outcome == "confirmed")
        assert cells.at[step.cell_hash, "confirm_ratio"] == pytest.approx(expected.ratio.estimate)
    assert cells.loc[~cells.index.isin(confirms["cell_hash"]), "confirmed"].isna().all()
    # interrupted after 9 units, resumed: the same search and the same confirmations
    run_serial(config, tmp_path / "interrupted", stop_after_units=9)
    run_serial(config, tmp_path / "interrupted")
    pd.testing.assert_frame_equal(trained(tmp_path / "confirm"), trained(tmp_path / "interrupted"))


PROMOTION = {"promotion": {"enabled": True, "eta": 2, "fraction": 0.5}, "max_steps": 10}


def read_with_curves(run_dir: Path):
    """The run's evaluations, cells (indexed by hash) and steps, and every evaluation's learning curve by (cell, task,
    trial number)."""
    results = load_run(run_dir)
    try:
        evaluations, cells, steps = results.evaluations(), results.cells().set_index("cell_hash"), results.steps()
        curves = results._read(sa.select(EVALUATIONS.c.cell_hash, EVALUATIONS.c.task, EVALUATIONS.c.trial_number,
                                         EVALUATIONS.c.curve_json))
    finally:
        results.close()
    curves = {(row.cell_hash, row.task, row.trial_number): json.loads(row.curve_json or "[]")
              for row in curves.itertuples()}
    return evaluations, cells, steps, curves


def asha_decisions(values: list[float], eta: int) -> list[bool]:
    """ASHA's rule written out (Li et al. 2020, as Optuna's SuccessiveHalvingPruner applies it): a value is promoted
    when it is at least the k-th largest of the values measured so far, itself included, k = max(1, n // eta)."""
    decisions = []
    for n in range(1, len(values) + 1):
        ranked = sorted(values[:n], reverse=True)
        decisions.append(values[n - 1] >= ranked[max(1, n // eta) - 1])
    return decisions


@pytest.mark.slow
@pytest.mark.parametrize("rule", [{"initial_cells_compete": True, "grace": 0}, {"grace": 2}],
                         ids=["initial-cells-compete", "grace"])
def test_promotion_across_candidates(tmp_path, rule):
    """Smoke budget (2 epochs of 5 steps) with the rung at half of it: every candidate past the filter trains its
    settings on every task to 5 steps (status rung, PRUNED trials with their curve, never a cell's best); the
    promotion study's decisions follow ASHA's rule over the rung scores in the order they were measured (the
    initial cells' values first when they compete; the first ``grace`` candidates promoted whatever their value,
    which still competes); a promoted candidate trains the same settings on the same seeds at the full budget, and
    its rung runs are exact prefixes of those; the cells table says where each candidate stopped and why; an
    interrupted search resumes to the same search."""
    import optuna
    from optuna.trial import TrialState

    from cellsearch.search.driver import PROMOTION_STUDY
    from searchchecks import assert_search_consistent

    config = tiny_config(**{**PROMOTION, "promotion": {**PROMOTION["promotion"], **rule}})
    compete = config.promotion.initial_cells_compete
    first = 2 if compete else 0  # the initial cells' trials
    run_serial(config, tmp_path / "promotion")
    assert_search_consistent(tmp_path / "promotion", tmp_path / "promotion", max_steps=10)
    evaluations, cells, steps, curves = read_with_curves(tmp_path / "promotion")
    rung = evaluations[evaluations["status"] == "rung"]
    assert len(rung) >= 8 and (rung["train_steps"] == 5).all()
    assert not evaluations["status"].isin(["pruned"]).any()
    # Optuna: the promotion study holds the initial cells and then one trial per candidate, in the order measured
    url = f"sqlite:///{tmp_path / 'promotion' / 'run.db'}"
    study = optuna.load_study(study_name=PROMOTION_STUDY, storage=url)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.user_attrs["step"] for t in trials[:first]] == list(range(first))
    assert all(t.user_attrs["step"] >= 2 for t in trials[first:])
    candidates = trials[first:]
    measured = [cells.at[t.user_attrs["cell_hash"], "promotion_score"] for t in candidates]
    values = [trial.intermediate_values[1] for trial in trials]
    assert values[first:] == pytest.approx([v if v == v else 0.0 for v in measured])
    grace = config.promotion.grace
    expected = [True] * min(grace, len(candidates)) + asha_decisions(values, eta=2)[first + grace:]
    assert [t.state == TrialState.COMPLETE for t in candidates] == expected
    assert 0 < sum(expected[grace:]) < len(expected[grace:]), "this seed was chosen for both outcomes"
    for trial in candidates:
        cell = trial.user_attrs["cell_hash"]
        row = cells.loc[cell]
        assert bool(row["promoted"]) == (trial.state == TrialState.COMPLETE)
        outcome = steps.loc[steps["step"] == trial.user_attrs["step"], "outcome"].item()
        mine = evaluations[(evaluations["cell_hash"] == cell) & evaluations["task"].isin(config.tasks)]
        at_rung = mine[mine["trial_number"] < 2]  # the rung stage asked each task's first two trials
        full = mine[mine["trial_number"] >= 2]
        if trial.state == TrialState.PRUNED:
            assert outcome == "rejected:promotion" and row["rejected_by"] == "promotion" and row["reached"] == "rung"
            assert "not in the top 1/2" in row["stop_reason"] and full.empty
            continue
        assert outcome != "rejected:promotion" and row["reached"] == "full"
        for task, rung_rows in at_rung.groupby("task"):
            full_rows = full[full["task"] == task].sort_values("trial_number")
            if full_rows.empty:  # an earlier task's early stop ended the candidate
                continue
            # a setting that failed at the rung (diverged, ...) is not trained again: its result stands
            rung_rows = rung_rows[~rung_rows["status"].isin(["diverged", "oom", "error"])]
            assert list(full_rows["seed"]) == list(rung_rows.sort_values("trial_number")["seed"])
            for short, long in zip(rung_rows.sort_values("trial_number").itertuples(), full_rows.itertuples()):
                assert short.learning_rate == long.learning_rate
                prefix = curves[(cell, task, long.trial_number)][:len(curves[(cell, task, short.trial_number)])]
                assert [p["score"] for p in prefix] == [p["score"] for p in curves[(cell, task, short.trial_number)]]
    # the best per cell and task ignores rung evaluations
    kept = evaluations[~evaluations["status"].isin(["rung", "pruned"])]
    best = kept.groupby(["cell_hash", "task"])["metric"].max()
    for cell, row in cells.iterrows():
        assert row["metric_arithmetic"] == pytest.approx(best.get((cell, "arithmetic"), float("nan")), nan_ok=True)
    if compete:
        return  # resume is the same code for both rules: tested once, with the default rule
    # interrupted twice (mid-rung and later), resumed: the same search
    run_serial(config, tmp_path / "interrupted", stop_after_units=12)
    run_serial(config, tmp_path / "interrupted", stop_after_units=30)
    run_serial(config, tmp_path / "interrupted")
    pd.testing.assert_frame_equal(trained(tmp_path / "promotion"), trained(tmp_path / "interrupted"))


@pytest.mark.slow
def test_filter_promotion(tmp_path):
    """The filter's own rung (smoke memorisation budget, rung at half of it): every candidate trains the filter's
    settings to the rung (status rung, PRUNED trials, never its best); the filter-promotion study decides by ASHA's
    rule over the candidates' best rung accuracies in the order measured, the first ``grace`` always; a promoted
    candidate trains the same settings on the same seeds through the whole filter (the rung run a prefix of it) and
    goes on; the others end rejected_by filter_promotion with nothing else trained; a resumed search is the same."""
    import optuna
    from optuna.trial import TrialState

    from cellsearch.search.driver import FILTER_PROMOTION_STUDY
    from searchchecks import assert_search_consistent

    config = tiny_config(filter_promotion={"enabled": True, "eta": 2, "fraction": 0.5, "grace": 1}, max_steps=10)
    run_serial(config, tmp_path / "filter")
    assert_search_consistent(tmp_path / "filter", tmp_path / "filter", max_steps=10)
    evaluations, cells, steps, curves = read_with_curves(tmp_path / "filter")
    memorize = evaluations[evaluations["task"] == "memorize"]
    rung = memorize[memorize["status"] == "rung"]
    assert len(rung) >= 4 and (rung["train_steps"] == 5).all()
    study = optuna.load_study(study_name=FILTER_PROMOTION_STUDY, storage=f"sqlite:///{tmp_path / 'filter' / 'run.db'}")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    values = [trial.intermediate_values[1] for trial in trials]
    for trial, value in zip(trials, values):  # the value is the best accuracy of the cell's rung settings
        cell_rung = memorize[(memorize["cell_hash"] == trial.user_attrs["cell_hash"]) & (memorize["trial_number"] == 0)]
        assert value == pytest.approx(cell_rung["metric"].max())
    expected = [True] + asha_decisions(values, eta=2)[1:]
    assert [t.state == TrialState.COMPLETE for t in trials] == expected
    assert 0 < sum(expected[1:]) < len(expected[1:]), "this seed was chosen for both outcomes"
    for trial in trials:
        cell = trial.user_attrs["cell_hash"]
        mine = evaluations[evaluations["cell_hash"] == cell]
        outcome = steps.loc[steps["step"] == trial.user_attrs["step"], "outcome"].item()
        if trial.state == TrialState.PRUNED:
            assert outcome == "rejected:filter_promotion" and cells.at[cell, "rejected_by"] == "filter_promotion"
            assert cells.at[cell, "reached"] == "filter rung"
            assert "at the filter's rung" in cells.at[cell, "stop_reason"]
            assert set(mine["status"]) <= {"rung", "diverged"} and set(mine["task"]) == {"memorize"}
            continue
        assert outcome != "rejected:filter_promotion"
        short, long = (mine[(mine["task"] == "memorize") & (mine["trial_number"] == n)] for n in (0, 1))
        assert long["seed"].item() == short["seed"].item() and long["status"].item() != "rung"
        full, prefix = curves[(cell, "memorize", 1)], curves[(cell, "memorize", 0)]
        assert [p["score"] for p in full[:len(prefix)]] == [p["score"] for p in prefix]
        assert cells.at[cell, "metric_memorize"] == pytest.approx(long["metric"].item())
    run_serial(config, tmp_path / "interrupted", stop_after_units=7)
    progress = run_serial(config, tmp_path / "interrupted")
    pd.testing.assert_frame_equal(trained(tmp_path / "filter"), trained(tmp_path / "interrupted"))
    # the resumed driver counts the decisions made before the interruption too
    assert (progress.filter_rung_measured, progress.filter_promoted) == (len(trials), sum(expected))


def test_halving_needs_several_settings_per_unit():
    with pytest.raises(ConfigError, match="fidelity.enabled"):
        tiny_config(fidelity={"enabled": True}, settings_per_unit=1)
    with pytest.raises(ConfigError, match="fidelity.eta"):
        tiny_config(fidelity={"enabled": True, "eta": 1}, settings_per_unit=3)


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["tournament", "aging"])
def test_other_selections_run(tmp_path, selection):
    run_serial(tiny_config(selection=selection, tournament_size=2, max_steps=4, seed_from_parent=1), tmp_path / "r")
    results = load_run(tmp_path / "r")
    try:
        assert (results.steps()["status"] == "done").all()
        assert len(results.population()) <= 3
    finally:
        results.close()


@pytest.mark.slow
def test_a_moved_or_copied_run_directory_resumes_and_loads_with_its_own_database(reference_run, tmp_path):
    """run.json names the default database by absolute path; a moved or copied directory uses its own run.db."""
    import shutil

    first = tmp_path / "first"
    run_serial(tiny_config(), first, stop_after_units=3)
    interrupted = trained(first)
    copied = tmp_path / "copy"
    shutil.copytree(first, copied)
    run_serial(tiny_config(), copied)  # the original is still there: the copy must not write into its database
    pd.testing.assert_frame_equal(trained(copied), trained(reference_run))
    pd.testing.assert_frame_equal(trained(first), interrupted)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    run_serial(tiny_config(), moved)
    pd.testing.assert_frame_equal(trained(moved), trained(reference_run))


def test_new_search_refuses_a_used_run_dir_or_database(reference_run, tmp_path):
    with pytest.raises(UserError, match="resume"):
        create_run(tiny_config(), reference_run)
    url = json.loads((reference_run / "run.json").read_text())["storage"]
    with pytest.raises(UserError, match="already holds run"):
        create_run(tiny_config(storage=url), tmp_path / "other")


def test_a_failing_unit_is_recorded_and_the_search_goes_on(tmp_path):
    """A unit that raises (a bug or a cell the trainer cannot handle) scores 0 as 'error'; Optuna marks it FAIL."""
    from cellsearch.search.units import run_unit

    def fail_on_xml(unit, task):
        if unit.task == "xml":
            raise RuntimeError("xml is broken today")
        return run_unit(unit, task)

    config, storage = create_run(tiny_config(max_steps=2), tmp_path / "r")
    driver = SearchDriver(config, storage, SerialExecutor(task_loader(config), fail_on_xml), task_loader(config))
    driver.run()
    storage.close()
    results = load_run(tmp_path / "r")
    try:
        evaluations, steps = results.evaluations(), results.steps()
    finally:
        results.close()
    xml = evaluations[evaluations["task"] == "xml"]
    assert len(xml) > 0 and (xml["status"] == "error").all() and (xml["metric"] == 0).all()
    assert (evaluations.loc[evaluations["task"] != "xml", "status"] != "error").all()
    assert (steps["status"] == "done").all()
    import optuna

    study = optuna.load_study(study_name=readable_study_name(tmp_path / "r", xml["cell_hash"].iloc[0], "xml"),
                              storage=f"sqlite:///{tmp_path / 'r' / 'run.db'}")
    assert {t.state for t in study.get_trials()} == {optuna.trial.TrialState.FAIL}


def test_children_start_from_their_parents_best_settings(tmp_path):
    run_serial(tiny_config(seed_from_parent=1, reevaluate_probability=0.0, max_steps=4), tmp_path / "r")
    results = load_run(tmp_path / "r")
    try:
        evaluations, steps = results.evaluations(), results.steps()
    finally:
        results.close()
    names = ["init_scale", "learning_rate", "max_grad_norm", "num_layers", "parameter_budget", "dropout"]
    checked = 0
    for step in steps[steps["kind"] == "mutate"].itertuples():
        child = evaluations[(evaluations["cell_hash"] == step.cell_hash) & (evaluations["task"] == "arithmetic")]
        if child.empty:
            continue  # stopped by the memorisation filter or a duplicate
        parent = evaluations[(evaluations["cell_hash"] == step.parent_hash) & (evaluations["task"] == "arithmetic")
                             & (evaluations["step"] < step.step)]
        best = parent.sort_values(["metric", "trial_number"], ascending=[False, True]).iloc[0]
        first = child.sort_values("trial_number").iloc[0]
        assert first[names].tolist() == best[names].tolist()
        checked += 1
    assert checked > 0


def test_a_driver_keeping_one_cell_in_memory_runs_the_same_search(reference_run, tmp_path, monkeypatch):
    """The driver's working set (cellsearch.search.working_set) is a cache over the run database: with room for
    a single cell description, every other read goes to the database, and the search is the same. The best scores
    it holds at the end are those of the cells in use only (population, reference), not of every cell."""
    from cellsearch.search import driver as driver_module

    monkeypatch.setattr(driver_module, "working_set_capacity", lambda config: 1)
    config, storage = create_run(tiny_config(), tmp_path / "small-memory")
    driver = SearchDriver(config, storage, SerialExecutor(task_loader(config)), task_loader(config))
    try:
        driver.run()
        assert len(driver._cells) == 1 and driver._cells.misses > 0
        cells = storage.cells()
        assert driver.cell_count == len(cells) > len(driver._population) + 1
        assert driver._best.cells() <= {*driver._population, driver.reference_hash}
        assert driver._best.loads > len(driver._best.cells())  # cells were dropped and read back
    finally:
        storage.close()
    pd.testing.assert_frame_equal(trained(reference_run), trained(tmp_path / "small-memory"))


@pytest.mark.slow
def test_the_promotion_rung_scores_are_a_working_set_too(tmp_path, monkeypatch):
    """With promotion on, the driver's rung scores (``CellScores`` read off a cell's learning curves) are kept for
    the cells in use only, and agree with the database at the end; a driver with room for one cell description
    runs the same promotion search."""
    from cellsearch.search import driver as driver_module

    def run(run_dir):
        config, storage = create_run(tiny_config(**PROMOTION), run_dir)
        driver = SearchDriver(config, storage, SerialExecutor(task_loader(config)), task_loader(config))
        driver.run()
        return driver, storage

    run(tmp_path / "plain")[1].close()
    monkeypatch.setattr(driver_module, "working_set_capacity", lambda config: 1)
    driver, storage = run(tmp_path / "one-cell")
    try:
        decisions = storage.promotions()
        assert len(decisions) >= 3  # candidates reached the rung
        held = driver._rung_best.cells()
        assert held <= {*driver._population, driver.reference_hash}
        assert driver._rung_best.loads > len(held)  # cells were dropped (and the reference read back)
        for cell in held:  # the cache holds what the database says
            fresh = driver._read_rung_scores(cell)
            assert {key: driver._rung_best[key] for key in fresh} == fresh
        # every candidate's rung score, read back from the database now (most were dropped), is the one it was
        # decided on: the reference was not re-evaluated in between on this seed
        candidates = [d for d in decisions.values() if d["step"] >= 2]
        assert candidates
        for decision in candidates:
            assert driver._rung_score(decision["cell_hash"]) == pytest.approx(decision["score"], nan_ok=True)
    finally:
        storage.close()
    pd.testing.assert_frame_equal(trained(tmp_path / "plain"), trained(tmp_path / "one-cell"))
