"""The run database: one transaction per unit, no double counting, read-only readers, URLs."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from cellsearch.search.storage import EVALUATIONS, RunStorage, normalize_url, sqlite_url


def evaluation(trial: int, score: float = 0.5) -> dict:
    return {"trial_number": trial, "params_json": "{}", "seed": 1, "score": score, "status": "ok",
            "duration_s": 0.1, "train_steps": 1, "epochs": 1, "metrics_json": "{}", "curve_json": "[]",
            "node_id": "n", "worker_pid": 1, "hostname": "h"}


@pytest.fixture
def storage(tmp_path):
    storage = RunStorage(sqlite_url(tmp_path / "run.db"), create=True)
    storage.create_run("r1", "seed: 0\n", {"python": "3"})
    yield storage
    storage.close()


def unit(storage: RunStorage, slot: int = 0) -> int:
    (unit_id,) = storage.add_units([{"step": 0, "stage": 0, "cell_hash": "c", "task": "t", "slot": slot,
                                     "settings_json": "[]"}])
    return unit_id


def test_a_unit_counts_once(storage):
    unit_id = unit(storage)
    storage.commit_unit(unit_id, 0, "c", "t", [evaluation(0), evaluation(1)])
    with pytest.raises(RuntimeError, match="not pending"):
        storage.commit_unit(unit_id, 0, "c", "t", [evaluation(2)])
    assert storage.best_scores() == {("c", "t"): 0.5}
    assert storage.counts()["evaluations"] == 2


def test_a_failed_commit_leaves_nothing(storage):
    first, second = unit(storage, 0), unit(storage, 1)
    storage.commit_unit(first, 0, "c", "t", [evaluation(0)])
    # The second unit repeats trial 0 of the same cell and task: the whole unit is refused, atomically.
    with pytest.raises(sa.exc.IntegrityError):
        storage.commit_unit(second, 0, "c", "t", [evaluation(5, 0.9), evaluation(0)])
    assert storage.counts() == {"search_steps": 0, "search_steps_done": 0, "units_done": 1, "evaluations": 1,
                                "cells_evaluated": 0}
    assert [u["unit_id"] for u in storage.untold_units()] == [first]


def test_slots_are_unique(storage):
    unit(storage, 0)
    with pytest.raises(sa.exc.IntegrityError):
        unit(storage, 0)


def test_read_only_reader_cannot_write(storage, tmp_path):
    reader = sa.create_engine(sqlite_url(tmp_path / "run.db", read_only=True))
    with reader.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(EVALUATIONS)).scalar_one() == 0
        with pytest.raises(sa.exc.OperationalError, match="readonly"):
            connection.execute(sa.text("DELETE FROM cs_evaluations"))
    reader.dispose()


def test_postgres_urls_name_an_installed_driver():
    url = normalize_url("postgresql://u:p@localhost/db")
    assert url.startswith("postgresql") and url.endswith("u:p@localhost/db")
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    assert normalize_url("postgresql+psycopg2://u@h/d") == "postgresql+psycopg2://u@h/d"
