"""Reading a search's results as pandas tables: :func:`load_run`.

Works on a finished, stopped or running search: it opens the run database
read-only (SQLite in ``mode=ro``; other databases are only ever queried) and
each call reads the current state.

Scores are relative: a cell's ratio on a task is its best score there divided
by the reference cell's (GRU's) best score there *now*; its score is the
minimum ratio over the search's tasks. The reference's best rises as it is
re-evaluated, so earlier ratios can shrink between two calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from cellsearch.config import from_mapping
from cellsearch.errors import UserError
from cellsearch.search.storage import PARAMETER_WIDTH

__all__ = ["SearchRun", "load_run", "PARAMETER_WIDTH"]


def load_run(path: str | Path) -> "SearchRun":
    """Open the search in run directory ``path`` for reading."""
    return SearchRun(path)


class SearchRun:
    """A search's tables as DataFrames; see the module docstring for how scores are defined."""

    def __init__(self, path: str | Path):
        from cellsearch.search.config import SearchConfig
        from cellsearch.search.run import read_run_info
        from cellsearch.search.storage import connect_url, make_engine, sqlite_path, sqlite_url
        from cellsearch import zoo

        self.path = Path(path)
        info = read_run_info(self.path)
        self.run_id: str = info["run_id"]
        database = sqlite_path(info["storage"])
        if database is not None:
            if not database.is_file():
                raise UserError(f"the database of {self.path} is missing ({database})")
            self.engine = make_engine(sqlite_url(database, read_only=True))
        else:
            # The stored URL has no password: connect_url adds $CELLSEARCH_STORAGE_URL's (or libpq finds one).
            self.engine = make_engine(connect_url(info["storage"]))
        with self.engine.connect() as connection:
            row = connection.execute(sa.text("SELECT config_yaml, versions_json FROM cs_run")).first()
        import yaml

        self.config: SearchConfig = from_mapping(SearchConfig, yaml.safe_load(row[0]))
        self.versions: dict[str, str] = json.loads(row[1])
        self.tasks: tuple[str, ...] = self.config.tasks
        self.reference_hash: str = zoo.get(self.config.reference_cell).hash

    def close(self) -> None:
        self.engine.dispose()

    def _read(self, query: str, **params: Any) -> pd.DataFrame:
        with self.engine.connect() as connection:
            return pd.read_sql(sa.text(query), connection, params=params)

    def best_scores(self) -> pd.DataFrame:
        """Best score per cell (rows) and task (columns), over every committed evaluation."""
        evaluations = self._read("SELECT cell_hash, task, score FROM cs_evaluations")
        table = evaluations.pivot_table(index="cell_hash", columns="task", values="score", aggfunc="max")
        return table.reindex(columns=list(self.config.all_tasks))

    def reference_best(self) -> pd.Series:
        """The reference cell's current best score per task (the denominators of every ratio)."""
        best = self.best_scores()
        if self.reference_hash in best.index:
            return best.loc[self.reference_hash, list(self.tasks)]
        return pd.Series(float("nan"), index=list(self.tasks))

    def cells(self) -> pd.DataFrame:
        """One row per proposed cell.

        Columns: ``hash``, ``short_hash``, ``name``, ``parent``, ``step_created``, ``nodes``,
        ``params_per_width`` (parameter_count(H)/H^2 at H = :data:`PARAMETER_WIDTH` = 128: about the number
        of H x H matrices of one layer), ``status``
        (evaluating | population | evaluated | rejected), ``rejected_by`` (duplicate, memorize or the
        task that stopped it), ``best_<task>`` and ``ratio_<task>`` per task, ``score`` (min ratio; NaN
        unless evaluated on every task), ``evaluations``. Sorted by score, best first. ``attrs`` holds
        the reference cell's current best per task.
        """
        cells = self._read("SELECT hash, name, parent_hash AS parent, step_created, node_count AS nodes, "
                           "params_per_width, status, rejected_by, duplicate_of, mutation_json FROM cs_cells")
        cells["short_hash"] = cells["hash"].str[:12]
        best = self.best_scores()
        reference = self.reference_best()
        tasks = list(self.tasks)
        ratios = best[tasks].div(reference, axis="columns") if len(best) else best[tasks]
        per_task = pd.concat([best.add_prefix("best_"), ratios.add_prefix("ratio_")], axis="columns")
        counts = self._read("SELECT cell_hash, COUNT(*) AS evaluations FROM cs_evaluations GROUP BY cell_hash")
        table = (cells
                 .merge(per_task, left_on="hash", right_index=True, how="left")
                 .merge(counts, left_on="hash", right_on="cell_hash", how="left").drop(columns=["cell_hash"]))
        table["score"] = table[[f"ratio_{task}" for task in tasks]].min(axis="columns", skipna=False)
        table["evaluations"] = table["evaluations"].fillna(0).astype(int)
        order = ["hash", "short_hash", "name", "parent", "step_created", "nodes", "params_per_width", "status",
                 "rejected_by", "duplicate_of", *[f"best_{t}" for t in self.config.all_tasks],
                 *[f"ratio_{t}" for t in tasks], "score", "evaluations", "mutation_json"]
        table = table[order].sort_values(["score", "step_created"], ascending=[False, True], na_position="last")
        table = table.reset_index(drop=True)
        table.attrs["reference_cell"] = self.config.reference_cell
        table.attrs["reference_best"] = reference.to_dict()
        table.attrs["note"] = f"ratios are relative to the current best of the reference cell ({self.config.reference_cell})"
        return table

    def population(self) -> pd.DataFrame:
        """The current population, best first."""
        cells = self.cells()
        return cells[cells["status"] == "population"].reset_index(drop=True)

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` best cells that passed every filter (in the population now or not)."""
        cells = self.cells()
        passed = cells["status"].isin(["population", "evaluated"]) & cells["score"].notna()
        return cells[passed].head(n).reset_index(drop=True)

    def evaluations(self) -> pd.DataFrame:
        """One row per trained setting: cell, task, every hyperparameter, score, status, duration, node, ..."""
        rows = self._read("SELECT id, unit_id, step, cell_hash AS cell, task, trial_number, params_json, seed, score, "
                          "status, duration_s, train_steps, epochs, node_id AS node, worker_pid, hostname, "
                          "finished_at, metrics_json FROM cs_evaluations ORDER BY id")
        params = pd.json_normalize([json.loads(text) for text in rows["params_json"]])
        params.index = rows.index
        metrics = pd.json_normalize([json.loads(text) if text else {} for text in rows["metrics_json"]])
        metrics.index = rows.index
        table = pd.concat([rows.drop(columns=["params_json", "metrics_json"]), params,
                           metrics.add_prefix("metric_")], axis="columns")
        table["finished_at"] = pd.to_datetime(table["finished_at"], unit="s", utc=True)
        return table

    def steps(self) -> pd.DataFrame:
        """One row per step: kind, cell, parent, outcome, timing."""
        table = self._read("SELECT * FROM cs_steps ORDER BY step")
        for column in ("started_at", "finished_at"):
            table[column] = pd.to_datetime(table[column], unit="s", utc=True)
        return table

    def population_changes(self) -> pd.DataFrame:
        """Population entries and departures, in order."""
        table = self._read("SELECT step, cell_hash, action, score, at FROM cs_population ORDER BY id")
        table["at"] = pd.to_datetime(table["at"], unit="s", utc=True)
        return table

    def units(self) -> pd.DataFrame:
        """One row per unit of work (pending units are planned but not committed)."""
        table = self._read("SELECT unit_id, step, stage, cell_hash, task, slot, status, submissions, created_at, "
                           "finished_at FROM cs_units ORDER BY unit_id")
        for column in ("created_at", "finished_at"):
            table[column] = pd.to_datetime(table[column], unit="s", utc=True)
        return table

    def spec(self, cell_hash: str):
        """The :class:`CellSpec` of a cell given its hash or a unique prefix of it."""
        from cellsearch.spec import CellSpec

        return CellSpec.from_dict(json.loads(self._cell_row(cell_hash)["spec_json"]))

    def resolve_hash(self, prefix: str) -> str:
        """The full hash of the one cell whose hash starts with ``prefix``."""
        return self._cell_row(prefix)["hash"]

    def _cell_row(self, prefix: str) -> dict[str, Any]:
        prefix = prefix.strip().lower()
        if not prefix or any(ch not in "0123456789abcdef" for ch in prefix):
            raise UserError(f"{prefix!r} is not a cell hash (hex digits)")
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT * FROM cs_cells WHERE hash LIKE :p"),
                                      {"p": prefix + "%"}).mappings().all()
        if not rows:
            raise UserError(f"no cell with hash {prefix} in {self.path}")
        if len(rows) > 1:
            raise UserError(f"hash prefix {prefix} is ambiguous ({len(rows)} cells); give more digits")
        return dict(rows[0])

    def lineage(self, cell_hash: str) -> pd.DataFrame:
        """The cell and its ancestors, newest first, with the mutation that made each."""
        cells = self.cells().set_index("hash")
        chain = []
        current: str | None = self.resolve_hash(cell_hash)
        while current is not None and current in cells.index and current not in chain:
            chain.append(current)
            parent = cells.at[current, "parent"]
            current = parent if isinstance(parent, str) else None
        return cells.loc[chain].reset_index()
