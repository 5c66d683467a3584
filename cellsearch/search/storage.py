"""The run database: cells, steps, units, evaluations and population changes.

One database per run (SQLite in the run directory by default, any SQLAlchemy
URL otherwise). Hyperparameter trials also live there as Optuna studies, one per
cell and task (named ``<cell hash>/<task>``), so ``optuna-dashboard <url>``
browses them; the tables below (prefix ``cs_``) are this package's own.

Only the driver writes. Every state change the search depends on is one
transaction: a unit's evaluations, its ``done`` mark and the step's
bookkeeping commit together, so after a crash a unit either counts fully or
not at all (and is then re-run with the same settings).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import sqlalchemy as sa

#: The width at which ``params_per_width`` is measured.
PARAMETER_WIDTH = 128

__all__ = ["PARAMETER_WIDTH", "RunStorage", "metadata", "sqlite_url", "normalize_url", "make_engine", "tune_sqlite",
           "CELLS", "STEPS", "UNITS", "EVALUATIONS", "POPULATION", "STATE", "RUN"]

metadata = sa.MetaData()

#: One row per run: identity, resolved config and package versions.
RUN = sa.Table(
    "cs_run", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("config_yaml", sa.Text, nullable=False),
    sa.Column("versions_json", sa.Text, nullable=False),
)

#: Driver counters (``next_step``) as integer key/value pairs.
STATE = sa.Table(
    "cs_driver_state", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

#: Every cell the search has proposed. status: evaluating | population | evaluated | rejected.
#: params_per_width: parameter_count(H) / H**2 at H = PARAMETER_WIDTH (about the number of H x H matrices).
CELLS = sa.Table(
    "cs_cells", metadata,
    sa.Column("hash", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128)),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("parent_hash", sa.String(64)),
    sa.Column("mutation_json", sa.Text),
    sa.Column("step_created", sa.Integer, nullable=False),
    sa.Column("node_count", sa.Integer, nullable=False),
    sa.Column("params_per_width", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("rejected_by", sa.String(64)),
    sa.Column("duplicate_of", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
)

#: One row per step. kind: seed | reevaluate | mutate; status: active | done.
STEPS = sa.Table(
    "cs_steps", metadata,
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("parent_hash", sa.String(64)),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(64)),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
)

#: One row per unit of work (cell x task x group of settings). status: pending | done.
UNITS = sa.Table(
    "cs_units", metadata,
    sa.Column("unit_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("settings_json", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("told", sa.Boolean, nullable=False, default=False),
    sa.Column("submissions", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("step", "stage", "task", "slot", name="uq_cs_units_slot"),
)

#: One row per trained setting; (cell, task, trial) is unique, so no setting counts twice.
EVALUATIONS = sa.Table(
    "cs_evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("unit_id", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("duration_s", sa.Float),
    sa.Column("train_steps", sa.Integer),
    sa.Column("epochs", sa.Float),
    sa.Column("metrics_json", sa.Text),
    sa.Column("curve_json", sa.Text),
    sa.Column("node_id", sa.String(64)),
    sa.Column("worker_pid", sa.Integer),
    sa.Column("hostname", sa.String(255)),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.UniqueConstraint("cell_hash", "task", "trial_number", name="uq_cs_evaluations_trial"),
)
sa.Index("ix_cs_evaluations_cell_task", EVALUATIONS.c.cell_hash, EVALUATIONS.c.task)

#: Population changes: action enter | leave, with the score that decided it.
POPULATION = sa.Table(
    "cs_population", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("action", sa.String(8), nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("at", sa.Float, nullable=False),
)


def sqlite_url(path: str | Path, read_only: bool = False) -> str:
    """SQLAlchemy URL of a SQLite file (read-only through SQLite's URI mode)."""
    path = Path(path).resolve()
    if read_only:
        return f"sqlite:///file:{path}?mode=ro&uri=true"
    return f"sqlite:///{path}"


def normalize_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a plain ``postgresql://`` to psycopg 3; where only psycopg2
    is installed (the ``postgres`` extra), the URL names it explicitly, so that the
    driver, Optuna and ``load_run`` all connect the same way.
    """
    import importlib.util

    parsed = sa.engine.make_url(url)
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def tune_sqlite(engine: sa.Engine, read_only: bool = False) -> sa.Engine:
    """WAL journal (readers never block the driver), synchronous=NORMAL and a busy timeout on SQLite.

    NORMAL still survives a killed process (kill -9 loses nothing committed); only an OS crash
    or power cut can lose the last transactions. It makes each commit several times cheaper,
    and Optuna commits several times per trial.
    """
    if engine.dialect.name != "sqlite":
        return engine

    @sa.event.listens_for(engine, "connect")
    def _pragmas(connection, _record):
        cursor = connection.cursor()
        if not read_only:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    engine.dispose()  # connections opened before the listener existed would miss the pragmas
    return engine


def make_engine(url: str) -> sa.Engine:
    """An engine for the run database (SQLite tuned by :func:`tune_sqlite`)."""
    return tune_sqlite(sa.create_engine(url), read_only="mode=ro" in url)


class RunStorage:
    """The driver's access to its own tables; all writes go through here."""

    def __init__(self, url: str, create: bool = False):
        self.url = url
        self.engine = make_engine(url)
        if create:
            metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- run identity -------------------------------------------------------------------------------------------

    def run_row(self) -> Mapping[str, Any] | None:
        try:
            with self.engine.connect() as connection:
                return connection.execute(sa.select(RUN)).mappings().first()
        except sa.exc.OperationalError:
            return None
        except sa.exc.ProgrammingError:
            return None

    def create_run(self, run_id: str, config_yaml: str, versions: Mapping[str, str]) -> None:
        with self.engine.begin() as connection:
            connection.execute(RUN.insert().values(run_id=run_id, created_at=time.time(), config_yaml=config_yaml,
                                                   versions_json=json.dumps(dict(versions))))
            connection.execute(STATE.insert().values(key="next_step", value=0))

    def update_config(self, config_yaml: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(RUN.update().values(config_yaml=config_yaml))

    # -- counters -----------------------------------------------------------------------------------------------

    def counter(self, key: str) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(STATE.c.value).where(STATE.c.key == key)).scalar_one())

    # -- reads used to rebuild the driver's state ---------------------------------------------------------------

    def cells(self, statuses: Iterable[str] | None = None) -> list[Mapping[str, Any]]:
        query = sa.select(CELLS).order_by(CELLS.c.step_created, CELLS.c.hash)
        if statuses is not None:
            query = query.where(CELLS.c.status.in_(list(statuses)))
        with self.engine.connect() as connection:
            return list(connection.execute(query).mappings())

    def best_scores(self) -> dict[tuple[str, str], float]:
        """(cell hash, task) -> best score over every committed evaluation."""
        query = sa.select(EVALUATIONS.c.cell_hash, EVALUATIONS.c.task, sa.func.max(EVALUATIONS.c.score)).group_by(
            EVALUATIONS.c.cell_hash, EVALUATIONS.c.task)
        with self.engine.connect() as connection:
            return {(cell, task): float(best) for cell, task, best in connection.execute(query)}

    def population_entries(self) -> dict[str, int]:
        """Cell hash -> step at which it last entered the population (for aging)."""
        query = sa.select(POPULATION.c.cell_hash, sa.func.max(POPULATION.c.step)).where(
            POPULATION.c.action == "enter").group_by(POPULATION.c.cell_hash)
        with self.engine.connect() as connection:
            return {cell: int(step) for cell, step in connection.execute(query)}

    def active_steps(self) -> list[Mapping[str, Any]]:
        with self.engine.connect() as connection:
            return list(connection.execute(
                sa.select(STEPS).where(STEPS.c.status == "active").order_by(STEPS.c.step)).mappings())

    def units_of_step(self, step: int) -> list[Mapping[str, Any]]:
        with self.engine.connect() as connection:
            return list(connection.execute(
                sa.select(UNITS).where(UNITS.c.step == step).order_by(UNITS.c.unit_id)).mappings())

    def untold_units(self) -> list[Mapping[str, Any]]:
        with self.engine.connect() as connection:
            return list(connection.execute(
                sa.select(UNITS).where(UNITS.c.status == "done", UNITS.c.told.is_(False))).mappings())

    def evaluations_of_unit(self, unit_id: int) -> list[Mapping[str, Any]]:
        with self.engine.connect() as connection:
            return list(connection.execute(
                sa.select(EVALUATIONS).where(EVALUATIONS.c.unit_id == unit_id)).mappings())

    def counts(self) -> dict[str, int]:
        """Totals for the progress bar: search steps (started, done), units done, evaluations, cells evaluated."""
        with self.engine.connect() as connection:
            scalar = lambda q: int(connection.execute(q).scalar_one() or 0)  # noqa: E731
            return {
                "search_steps": scalar(sa.select(sa.func.count()).select_from(STEPS).where(STEPS.c.kind != "seed")),
                "search_steps_done": scalar(sa.select(sa.func.count()).select_from(STEPS).where(
                    STEPS.c.kind != "seed", STEPS.c.status == "done")),
                "units_done": scalar(sa.select(sa.func.count()).select_from(UNITS).where(UNITS.c.status == "done")),
                "evaluations": scalar(sa.select(sa.func.count()).select_from(EVALUATIONS)),
                # Cells whose evaluation ended (passed or stopped by a filter), duplicates excluded.
                "cells_evaluated": scalar(sa.select(sa.func.count()).select_from(CELLS).where(
                    CELLS.c.status != "evaluating", sa.or_(CELLS.c.rejected_by.is_(None),
                                                          CELLS.c.rejected_by != "duplicate"))),
            }

    # -- writes -------------------------------------------------------------------------------------------------

    def start_step(self, step: int, kind: str, cell_hash: str, parent_hash: str | None,
                   new_cell: Mapping[str, Any] | None, finished_outcome: str | None = None) -> None:
        """Record a new step (and the cell it proposes) and advance ``next_step``, atomically.

        ``finished_outcome`` records a step that ends at once (a duplicate candidate).
        """
        now = time.time()
        with self.engine.begin() as connection:
            if new_cell is not None:
                connection.execute(CELLS.insert().values(created_at=now, **new_cell))
            connection.execute(STEPS.insert().values(
                step=step, kind=kind, cell_hash=cell_hash, parent_hash=parent_hash, stage=0,
                status="done" if finished_outcome else "active", outcome=finished_outcome, started_at=now,
                finished_at=now if finished_outcome else None))
            connection.execute(STATE.update().where(STATE.c.key == "next_step").values(value=step + 1))

    def add_units(self, rows: list[Mapping[str, Any]]) -> list[int]:
        """Insert planned units (status pending) in one transaction; returns their ids in order."""
        now = time.time()
        ids = []
        with self.engine.begin() as connection:
            for row in rows:
                result = connection.execute(UNITS.insert().values(status="pending", told=False, submissions=0,
                                                                  created_at=now, **row))
                ids.append(int(result.inserted_primary_key[0]))
        return ids

    def commit_unit(self, unit_id: int, step: int, cell_hash: str, task: str,
                    evaluations: list[Mapping[str, Any]]) -> None:
        """A finished unit: its evaluations and its ``done`` mark, in one transaction."""
        now = time.time()
        with self.engine.begin() as connection:
            updated = connection.execute(UNITS.update().where(UNITS.c.unit_id == unit_id,
                                                              UNITS.c.status == "pending").values(
                status="done", finished_at=now))
            if updated.rowcount != 1:
                raise RuntimeError(f"unit {unit_id} is not pending; refusing to count it twice")
            for row in evaluations:
                connection.execute(EVALUATIONS.insert().values(unit_id=unit_id, step=step, cell_hash=cell_hash,
                                                               task=task, finished_at=now, **row))

    def mark_told(self, unit_id: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(UNITS.update().where(UNITS.c.unit_id == unit_id).values(told=True))

    def note_submission(self, unit_id: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(UNITS.update().where(UNITS.c.unit_id == unit_id).values(
                submissions=UNITS.c.submissions + 1))

    def set_stage(self, step: int, stage: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(STEPS.update().where(STEPS.c.step == step).values(stage=stage))

    def finish_step(self, step: int, outcome: str, cell_updates: Mapping[str, Mapping[str, Any]],
                    population_changes: list[tuple[str, str, float | None]]) -> None:
        """End a step: its outcome, cell status changes and population changes, in one transaction."""
        now = time.time()
        with self.engine.begin() as connection:
            connection.execute(STEPS.update().where(STEPS.c.step == step).values(
                status="done", outcome=outcome, finished_at=now))
            for cell_hash, values in cell_updates.items():
                connection.execute(CELLS.update().where(CELLS.c.hash == cell_hash).values(**values))
            for cell_hash, action, score in population_changes:
                connection.execute(POPULATION.insert().values(step=step, cell_hash=cell_hash, action=action,
                                                              score=score, at=now))
