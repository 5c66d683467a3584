"""What the search tests share: a tiny search config and readers of committed work (not a test module).

The fault-injection tests (test_faults*.py) all ask the same questions of a run
database, read the way any outside reader would: which evaluations are committed, and was anything
counted twice.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

POSTGRES_URL = os.environ.get("CELLSEARCH_TEST_POSTGRES_URL")
if not POSTGRES_URL and os.environ.get("CI"):
    # CI starts the server in .ci/run; a missing URL there is a broken set-up, not a reason to skip.
    raise RuntimeError("CI is set but CELLSEARCH_TEST_POSTGRES_URL is empty: .ci/postgres.sh failed")
#: Marks a test that needs the PostgreSQL server of .ci/postgres.sh.
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="CELLSEARCH_TEST_POSTGRES_URL is not set (run `export CELLSEARCH_TEST_POSTGRES_URL="
                             "\"$(bash .ci/postgres.sh)\"` to start a local PostgreSQL server)")

#: A search whose units take a fraction of a second: two tasks, two seeds, a few steps (20-60 s on 2 cores).
TINY_SEARCH = {
    "tasks": ["arithmetic", "xml"],
    "budget_profile": "smoke",
    "population_size": 4,
    "settings_per_task": 2,
    "settings_per_unit": 1,
    "memorize_threshold": 0.0,
    "reevaluate_probability": 0.2,
    "seed": 11,
    "max_steps": 10,
    "max_in_flight": 4,
}


def admin_engine() -> sa.Engine:
    """An autocommit connection to the test server as its admin role (creates and drops databases)."""
    from cellsearch.search.storage import normalize_url

    return sa.create_engine(normalize_url(POSTGRES_URL), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new database on the test server (its URL), dropped afterwards; for ``database`` fixtures."""
    from cellsearch.search.storage import normalize_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = admin_engine()
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.engine.make_url(normalize_url(POSTGRES_URL)).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def read_only_engine(database: str | Path) -> sa.Engine:
    """A fresh engine for one read: a run directory's SQLite file read-only, or any URL (no pool: a
    server may have restarted since the last read)."""
    from cellsearch.search.storage import normalize_url, sqlite_url

    if isinstance(database, Path):
        url = sqlite_url(database / "run.db", read_only=True)
    elif database.startswith("sqlite"):
        url = sqlite_url(sa.engine.make_url(database).database, read_only=True)
    else:
        url = normalize_url(database)
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def committed(database: str | Path) -> list[tuple]:
    """Every committed evaluation as a comparable tuple (a run directory or a database URL)."""
    if isinstance(database, Path) and not (database / "run.db").exists():
        return []
    engine = read_only_engine(database)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(
                "SELECT id, unit_id, cell_hash, task, trial_number, params_json, seed, score, status "
                "FROM cs_evaluations ORDER BY id"))]
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # the tables are not created yet
        return []
    finally:
        engine.dispose()


def assert_nothing_twice(rows: list[tuple]) -> None:
    """One row per (cell, task, Optuna trial) and per (cell, task, setting, seed)."""
    trials = [(cell, task, trial) for _, _, cell, task, trial, *_ in rows]
    # a promoted candidate trains its rung settings again at the full budget (the rung run is a prefix), and a confirm
    # step trains a best setting again on fresh seeds: both by design
    settings = [(cell, task, params, seed) for _, _, cell, task, _, params, seed, *rest in rows if rest[-1] != "rung"]
    assert len(set(trials)) == len(trials), "an Optuna trial was counted twice"
    assert len(set(settings)) == len(settings), "a setting of a cell on a task was trained twice"


def database_url(database: str | Path) -> str:
    """The URL a driver would use: a run directory's SQLite file, or the given URL."""
    from cellsearch.search.storage import normalize_url, sqlite_url

    return sqlite_url(database / "run.db") if isinstance(database, Path) else normalize_url(database)


def assert_search_consistent(database: str | Path, run_dir: Path, max_steps: int) -> list[tuple]:
    """The search reached its end, and storage, Optuna, the population and the duplicate detector agree.

    Returns the committed evaluations (for the callers' own before/after comparisons).
    """
    import optuna

    from cellsearch.config import from_mapping, load_yaml
    from cellsearch.dedup import Deduplicator
    from cellsearch.results import load_run
    from cellsearch.search.config import SearchConfig
    from cellsearch.search.driver import SearchDriver
    from cellsearch.search.executors import SerialExecutor
    from cellsearch.search.run import task_loader
    from cellsearch.search.storage import RunStorage

    rows = committed(database)
    assert_nothing_twice(rows)
    results = load_run(run_dir)
    try:
        steps, units, cells = results.steps(), results.units(), results.cells()
        changes = results.population_changes()
        specs = {cell_hash: results.spec(cell_hash) for cell_hash in cells["cell_hash"]}
    finally:
        results.close()
    assert (~steps["kind"].isin(["seed", "confirm"])).sum() == max_steps  # a confirm step is extra
    assert (steps["status"] == "done").all() and (units["status"] == "done").all()

    # Every evaluation is a finished Optuna trial with the same score; no trial is left RUNNING.
    url = database_url(database)
    optuna_storage = optuna.storages.RDBStorage(url)
    try:
        trials = {}
        for summary in optuna.get_all_study_summaries(optuna_storage):
            study = optuna.load_study(study_name=summary.study_name, storage=optuna_storage)
            for trial in study.get_trials(deepcopy=False):
                assert trial.state.is_finished(), (summary.study_name, trial.number, trial.state)
                trials[(summary.study_name, trial.number)] = trial
    finally:
        optuna_storage.engine.dispose()
    # a setting without a usable score (diverged, out of memory, an error) is a FAIL trial, a pruned one PRUNED
    failed = {"error", "diverged", "oom"}
    for _, _, cell, task, number, _, _, score, status in rows:
        trial = trials[(readable_study_name(run_dir, cell, task), number)]
        if status in failed:
            assert trial.state == optuna.trial.TrialState.FAIL, (cell, task, number, status, trial.state)
        elif status in ("pruned", "rung"):
            assert trial.state == optuna.trial.TrialState.PRUNED, (cell, task, number, status, trial.state)
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(score)

    # The population: replaying the recorded enter/leave changes, the cells' status column and a driver
    # rebuilt from storage (what a resume starts from) give the same set, within the configured size.
    replayed: set[str] = set()
    # In commit order: steps finish out of order (asynchronous evolution), so not by step number.
    for change in changes.sort_values("at", kind="stable").itertuples():
        (replayed.add if change.action == "enter" else replayed.discard)(change.cell_hash)
    by_status = set(cells.loc[cells["status"] == "population", "cell_hash"])
    config = from_mapping(SearchConfig, load_yaml(run_dir / "config.yaml"))
    storage = RunStorage(url)
    driver = None
    try:
        driver = SearchDriver(config, storage, SerialExecutor(task_loader(config)), task_loader(config))
        driver._rebuild()
        rebuilt = set(driver._population)
    finally:
        if driver is not None:  # its Optuna connections hold the database file open (a test may unmount its disk)
            driver.optuna_storage.engine.dispose()
        storage.close()
    assert replayed == by_status == rebuilt
    assert 0 < len(by_status) <= config.population_size

    # The duplicate detector: replaying the proposals in order, a cell stored as a duplicate is one, and
    # every other cell was new when it was proposed.
    dedup = Deduplicator()
    for cell in cells.sort_values(["step_created", "cell_hash"]).itertuples():
        check = dedup.check(specs[cell.cell_hash])
        if cell.rejected_by == "duplicate":
            assert not check.is_new and cell.duplicate_of in specs, cell.cell_hash
        else:
            assert check.is_new, (cell.cell_hash, check)
            dedup.add(specs[cell.cell_hash])
    return rows


def readable_study_name(run_dir: Path, cell_hash: str, task: str) -> str:
    """The Optuna study of a cell on a task in the run in ``run_dir``: ``gru/xml`` for an initial cell, the short
    hash for others (checked against the rule written out here, not the driver's function)."""
    from cellsearch import zoo
    from cellsearch.config import load_yaml

    initial = {zoo.get(name).hash: name for name in load_yaml(run_dir / "config.yaml")["initial_cells"]}
    return f"{initial.get(cell_hash, cell_hash[:12])}/{task}"


def serial_search(run_dir: Path, config: dict) -> Path:
    """Run a search with the config ``config`` (a mapping) to its end in this process (serial executor)."""
    from cellsearch.config import from_mapping
    from cellsearch.search.config import SearchConfig
    from cellsearch.search.driver import SearchDriver
    from cellsearch.search.executors import SerialExecutor
    from cellsearch.search.run import create_run, task_loader

    resolved, storage = create_run(from_mapping(SearchConfig, config), run_dir)
    driver = SearchDriver(resolved, storage, SerialExecutor(task_loader(resolved)), task_loader(resolved))
    try:
        driver.run()
    finally:
        storage.close()
    return run_dir
