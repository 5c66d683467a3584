"""The run database's contract, on every backend from one fixture (as optuna's storage tests do).

Every test that takes ``storage`` runs on SQLite and on PostgreSQL (the server of ``.ci/postgres.sh``;
skipped where ``CELLSEARCH_TEST_POSTGRES_URL`` is unset, required in CI). The contract
(:class:`cellsearch.search.storage.RunStorage`): each write is one transaction, idempotent under retry
after a lost acknowledgement; a unit counts once; a failed commit leaves nothing; readers see only
committed work.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from cellsearch.search.storage import EVALUATIONS, RunStorage, normalize_url, sqlite_url
from searchchecks import POSTGRES_URL, fresh_postgres_database

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not POSTGRES_URL, reason="CELLSEARCH_TEST_POSTGRES_URL is not set (see .ci/postgres.sh)"))]


def evaluation(trial: int, score: float = 0.5) -> dict:
    return {"trial_number": trial, "params_json": "{}", "seed": 1, "score": score, "status": "ok",
            "duration_s": 0.1, "train_steps": 1, "epochs": 1, "metrics_json": "{}", "curve_json": "[]",
            "node_id": "n", "worker_pid": 1, "hostname": "h"}


def cell_row(cell_hash: str, step: int = 0) -> dict:
    return {"hash": cell_hash, "name": None, "spec_json": "{}", "parent_hash": None, "mutation_json": None,
            "step_created": step, "node_count": 1, "params_per_width": 3.0, "status": "evaluating"}


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "run.db")
    else:
        with fresh_postgres_database("cellsearch_contract") as url:
            yield url


@pytest.fixture
def storage(database_url):
    storage = RunStorage(normalize_url(database_url), create=True, log=lambda message: None)
    storage.create_run("r1", "seed: 0\n", {"python": "3"})
    yield storage
    storage.close()


def unit(storage: RunStorage, slot: int = 0, step: int = 0, task: str = "t") -> int:
    (unit_id,) = storage.add_units([{"step": step, "stage": 0, "cell_hash": "c", "task": task, "slot": slot,
                                     "settings_json": "[]"}])
    return unit_id


def lose_next_acknowledgement(storage: RunStorage) -> None:
    """The next commit reaches the database, then its acknowledgement is lost: the driver's own transient
    error (SQLite: a locked file; PostgreSQL: a closed connection) is raised after the real commit."""
    dialect = storage.engine.dialect
    commit = dialect.do_commit
    message = "database is locked" if dialect.name == "sqlite" else "server closed the connection unexpectedly"

    def commit_then_fail(dbapi_connection):
        commit(dbapi_connection)
        dialect.do_commit = commit
        raise dialect.loaded_dbapi.OperationalError(message)

    dialect.do_commit = commit_then_fail


def test_the_run_row_and_counters(storage):
    assert storage.run_row()["run_id"] == "r1"
    assert storage.counter("next_step") == 0
    storage.update_config("seed: 1\n")
    assert storage.run_row()["config_yaml"] == "seed: 1\n"


def test_a_unit_counts_once(storage):
    unit_id = unit(storage)
    storage.commit_unit(unit_id, 0, "c", "t", [evaluation(0), evaluation(1)])
    with pytest.raises(RuntimeError, match="not pending"):
        storage.commit_unit(unit_id, 0, "c", "t", [evaluation(2)])
    assert storage.best_scores() == {("c", "t"): 0.5}
    assert storage.counts()["evaluations"] == 2
    assert [row["trial_number"] for row in storage.evaluations_of_unit(unit_id)] == [0, 1]


def test_a_failed_commit_leaves_nothing(storage):
    first, second = unit(storage, 0), unit(storage, 1)
    storage.commit_unit(first, 0, "c", "t", [evaluation(0)])
    # The second unit repeats trial 0 of the same cell and task: the whole unit is refused, atomically.
    with pytest.raises(sa.exc.IntegrityError):
        storage.commit_unit(second, 0, "c", "t", [evaluation(5, 0.9), evaluation(0)])
    assert storage.counts() == {"search_steps": 0, "search_steps_done": 0, "units_done": 1, "evaluations": 1,
                                "cells_evaluated": 0}
    assert [u["unit_id"] for u in storage.untold_units()] == [first]
    assert [u["status"] for u in storage.units_of_step(0)] == ["done", "pending"]


def test_slots_are_unique(storage):
    unit(storage, 0)
    with pytest.raises(sa.exc.IntegrityError):
        unit(storage, 0)


def test_a_step_from_start_to_population(storage):
    storage.start_step(0, "seed", "c", None, cell_row("c"))
    storage.start_step(1, "mutate", "d", "c", cell_row("d", 1))
    assert storage.counter("next_step") == 2
    assert [row["step"] for row in storage.active_steps()] == [0, 1]
    storage.set_stage(1, 2)
    assert storage.active_steps()[1]["stage"] == 2
    first = unit(storage, 0, step=0)
    storage.commit_unit(first, 0, "c", "t", [evaluation(0, 0.7)])
    storage.mark_told(first)
    assert storage.untold_units() == []
    storage.note_submission(first)
    assert storage.units_of_step(0)[0]["submissions"] == 1
    storage.finish_step(0, "seeded", {"c": {"status": "population"}}, [("c", "enter", 1.0)])
    storage.finish_step(1, "entered", {"d": {"status": "population"}, "c": {"status": "evaluated"}},
                        [("d", "enter", 1.1), ("c", "leave", 1.0)])
    assert storage.active_steps() == []
    assert {row["hash"]: row["status"] for row in storage.cells()} == {"c": "evaluated", "d": "population"}
    assert [row["hash"] for row in storage.cells(["population"])] == ["d"]
    assert storage.population_entries() == {"c": 0, "d": 1}
    counts = storage.counts()
    assert counts["search_steps"] == 1 and counts["search_steps_done"] == 1 and counts["cells_evaluated"] == 2


def test_best_scores_are_the_maximum_per_cell_and_task(storage):
    storage.commit_unit(unit(storage, 0), 0, "c", "t", [evaluation(0, 0.2), evaluation(1, 0.6)])
    storage.commit_unit(unit(storage, 1, task="u"), 0, "c", "u", [evaluation(0, 0.1)])
    assert storage.best_scores() == {("c", "t"): 0.6, ("c", "u"): 0.1}


def test_one_cells_reads(storage):
    storage.start_step(0, "seed", "c", None, cell_row("c"))
    storage.start_step(1, "mutate", "d", "c", {**cell_row("d", 1), "parent_hash": "c", "spec_json": '{"d": 1}'})
    assert dict(storage.cell_description("d")) == {"spec_json": '{"d": 1}', "parent_hash": "c"}
    assert storage.cell_description("e") is None
    storage.commit_unit(unit(storage, 0), 0, "c", "t", [evaluation(0, 0.2), evaluation(1, 0.6)])
    storage.commit_unit(unit(storage, 1, step=1), 1, "d", "t", [evaluation(0, 0.3)])
    assert storage.best_scores(cell_hash="d") == {("d", "t"): 0.3}
    assert storage.best_scores(cell_hash="e") == {}


def test_the_drivers_working_set_reads_through_to_the_database(storage):
    """``CellCache`` and ``BestScores`` (cellsearch.search.working_set): bounded caches that answer as the
    database does, whatever they evicted."""
    from cellsearch.search.working_set import BestScores, CellCache

    for step, cell in enumerate("abcd"):
        storage.start_step(step, "mutate", cell, None, {**cell_row(cell, step), "spec_json": f'"{cell}"',
                                                        "parent_hash": "a" if step else None})
    cache = CellCache(storage, capacity=2)
    cache.put("d", '"d"', "a")
    assert [cache.spec_json(cell) for cell in "abcd"] == ['"a"', '"b"', '"c"', '"d"']
    assert len(cache) == 2 and cache.misses == 4  # d was evicted by the reads of a, b and c
    assert cache.parent("b") == "a" and cache.parent("a") is None
    assert cache.known("c") and not cache.known("z")
    with pytest.raises(KeyError):
        cache.spec_json("z")
    with pytest.raises(ValueError, match="capacity"):
        CellCache(storage, capacity=0)

    storage.commit_unit(unit(storage, 0), 0, "a", "t", [evaluation(0, 0.2), evaluation(1, 0.6)])
    storage.commit_unit(unit(storage, 1), 0, "b", "t", [evaluation(0, 0.4)])
    best = BestScores(storage)
    assert best.get(("a", "t")) == 0.6 and best[("b", "t")] == 0.4 and best.get(("c", "t"), 0.0) == 0.0
    assert ("a", "u") not in best and best.cells() == {"a", "b", "c"}
    storage.commit_unit(unit(storage, 2), 0, "a", "t", [evaluation(2, 0.9)])
    best.record("a", "t", 0.9)
    best.retain({"a"})
    assert best.cells() == {"a"} and len(best) == 1
    assert best.get(("b", "t")) == 0.4 and best.loads == 4  # b was dropped, and read back
    assert best.get(("a", "t")) == 0.9 == storage.best_scores(cell_hash="a")[("a", "t")]


def test_every_write_survives_a_lost_acknowledgement(database_url):
    """A transaction that committed but whose acknowledgement was lost is retried and recognised as done:
    nothing is applied twice (the run row, a step, units, a unit's evaluations, a population change); a
    real second commit of a unit (not a retry) is still refused."""
    logged: list[str] = []
    storage = RunStorage(normalize_url(database_url), create=True, log=logged.append)
    lose_next_acknowledgement(storage)
    storage.create_run("r1", "seed: 0\n", {"python": "3"})
    lose_next_acknowledgement(storage)
    storage.start_step(0, "seed", "c", None, cell_row("c"))
    lose_next_acknowledgement(storage)
    (unit_id,) = storage.add_units([{"step": 0, "stage": 0, "cell_hash": "c", "task": "t", "slot": 0,
                                     "settings_json": "[]"}])
    lose_next_acknowledgement(storage)
    storage.commit_unit(unit_id, 0, "c", "t", [evaluation(0), evaluation(1)])
    lose_next_acknowledgement(storage)
    storage.finish_step(0, "seeded", {}, [("c", "enter", 1.0)])
    try:
        assert len(logged) == 5 and all("retry 1 in" in line for line in logged), logged
        assert storage.run_row()["run_id"] == "r1"
        assert storage.counter("next_step") == 1 and len(storage.units_of_step(0)) == 1
        assert storage.counts()["evaluations"] == 2 and storage.population_entries() == {"c": 0}
        with pytest.raises(RuntimeError, match="not pending"):
            storage.commit_unit(unit_id, 0, "c", "t", [evaluation(0), evaluation(1)])
    finally:
        storage.close()


def test_read_only_reader_cannot_write(tmp_path):
    storage = RunStorage(sqlite_url(tmp_path / "run.db"), create=True)
    storage.create_run("r1", "seed: 0\n", {"python": "3"})
    storage.close()
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
