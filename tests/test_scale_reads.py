"""The synthetic-run generator of ``benchmarks/scale_reads.py`` (the million-evaluation benchmark) still writes
what the readers read: a small run, generated through the real storage API, read back by ``load_run``, the
driver's storage reads and ``cellsearch top``."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys

import pytest

from conftest import REPO_ROOT


def _benchmark():
    spec = importlib.util.spec_from_file_location("scale_reads", REPO_ROOT / "benchmarks" / "scale_reads.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_reads"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, ptb_dir):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("CELLSEARCH_PTB_DIR", str(ptb_dir))
    run_dir = tmp_path_factory.mktemp("scale") / "run"
    summary = _benchmark().generate(run_dir, evaluations=1500, cells=60, seed=3, log=lambda message: None)
    monkeypatch.undo()
    return run_dir, summary


def _database(run_dir):
    connection = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    return connection


def test_readers_agree_with_what_was_written(synthetic):
    from cellsearch.results import load_run

    run_dir, summary = synthetic
    database = _database(run_dir)
    evaluations = database.execute("SELECT count(*) FROM cs_evaluations").fetchone()[0]
    cells = database.execute("SELECT count(*) FROM cs_cells").fetchone()[0]
    assert evaluations == summary["evaluations"] >= 1500
    assert cells == summary["cells"] >= 40
    # a population of the config's size, some candidates rejected at each filter, the last steps still active
    statuses = dict(database.execute("SELECT status, count(*) FROM cs_cells GROUP BY status").fetchall())
    assert 0 < statuses["population"] <= 20 and statuses["rejected"] > 0 and statuses["evaluating"] == 3
    assert database.execute("SELECT count(*) FROM cs_units WHERE status = 'pending'").fetchone()[0] > 0
    # one cell's best score, by hand from the rows written
    best = database.execute("SELECT cell_hash, task, max(score) AS best FROM cs_evaluations WHERE task = 'xml' "
                            "AND status NOT IN ('pruned', 'rung') GROUP BY cell_hash, task ORDER BY cell_hash "
                            "LIMIT 1").fetchone()
    run = load_run(run_dir)
    try:
        table = run.cells().set_index("cell_hash")
        assert len(table) == cells
        assert table.at[best["cell_hash"], "metric_xml"] == pytest.approx(best["best"])
        assert int(table["evaluations"].sum()) == evaluations
        assert len(run.evaluations()) == evaluations == run.evaluation_count()
        mine = run.evaluations(cell_hash=best["cell_hash"])
        assert len(mine) == table.at[best["cell_hash"], "evaluations"]
        assert set(table.loc[table["status"] == "population"].index) <= set(table.index)
        top = run.top(5)
        assert len(top) == 5 and top["score"].is_monotonic_decreasing
    finally:
        run.close()
    database.close()


def test_the_driver_rebuilds_from_it(synthetic):
    from cellsearch.search.driver import SearchDriver
    from cellsearch.search.run import open_run

    run_dir, summary = synthetic
    config, storage = open_run(run_dir, log=lambda message: None)
    try:
        driver = SearchDriver(config, storage, executor=None, load_task=lambda name: None)
        driver._rebuild()
        assert driver.cell_count == summary["cells"]
        assert driver.progress.evaluations == summary["evaluations"]
        assert len(driver._active) == 3
        assert len(driver._population) == sum(row["status"] == "population" for row in storage.cells())
        # the active steps' Optuna trials are the ones their pending units name: none is closed as unrecorded
        names = driver._optuna.get_all_study_names(driver.optuna_storage)
        assert len(names) >= summary["cells"] * len(config.all_tasks) - 3
        settings = [s for active in driver._active.values() for unit in active.units.values()
                    for s in unit["settings"]]
        assert settings and all("trial_number" in s for s in settings)
    finally:
        storage.close()


def test_top_reads_it(synthetic, capsys):
    from cellsearch.commands.search import print_top

    run_dir, _ = synthetic
    print_top(run_dir, 3)
    out = capsys.readouterr().out
    assert out.count("\n") >= 4 and "score" in out
    assert json.loads((run_dir / "run.json").read_text())["run_id"]


def test_optuna_holds_a_finished_trial_per_evaluation(synthetic):
    """Each evaluation has its finished trial in its (cell, task) study, as the driver's tell leaves it: read back
    through Optuna's own API (parameters, value, state, curve, attributes)."""
    import optuna
    from optuna.trial import TrialState

    from cellsearch.search.driver import study_name

    run_dir, summary = synthetic
    assert summary["trials_added"] == summary["evaluations"]
    database = _database(run_dir)
    states = dict(database.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall())
    assert states["RUNNING"] == 3 * 2  # the active steps' filter trials
    assert states["COMPLETE"] + states.get("FAIL", 0) + states.get("PRUNED", 0) == summary["evaluations"]
    row = database.execute("SELECT cell_hash, task, trial_number, score, status, params_json, curve_json "
                           "FROM cs_evaluations WHERE task = 'xml' AND status = 'ok' ORDER BY id DESC LIMIT 1"
                           ).fetchone()
    database.close()
    storage = optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'run.db'}")
    study = optuna.load_study(study_name=study_name(row["cell_hash"], row["task"]), storage=storage)
    trial = study.trials[row["trial_number"]]
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(row["score"])
    setting = json.loads(row["params_json"])
    assert trial.params and all(trial.params[name] == setting[name] for name in trial.params)
    curve = {int(p["step"]): p["score"] for p in json.loads(row["curve_json"]) if "score" in p}
    assert trial.intermediate_values == pytest.approx(curve)
    assert trial.user_attrs["status"] == "ok"
    storage.engine.dispose()
