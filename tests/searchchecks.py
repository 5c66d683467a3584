"""What the search tests share: a tiny search config and readers of committed work (not a test module).

The fault-injection tests (test_faults*.py, test_search_resume.py) all ask the same questions of a run
database, read the way any outside reader would: which evaluations are committed, and was anything
counted twice.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

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
    """One row per (cell, task, Optuna trial) and per (cell, task, setting)."""
    trials = [(cell, task, trial) for _, _, cell, task, trial, *_ in rows]
    settings = [(cell, task, params) for _, _, cell, task, _, params, *_ in rows]
    assert len(set(trials)) == len(trials), "an Optuna trial was counted twice"
    assert len(set(settings)) == len(settings), "a setting of a cell on a task was trained twice"
