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
from cellsearch.scoring import PARTIAL_STATUSES, cell_score, task_ratio
from cellsearch.search.confirmation import confirm, pairs_by_task
from cellsearch.search.storage import ARCHIVE_KEY, CELLS, EVALUATIONS, PARAMETER_WIDTH, POPULATION, PROMOTIONS, RUN, \
    STATE, STEPS, UNITS

__all__ = ["SearchRun", "load_run", "PARAMETER_WIDTH", "CONFIRMATION_COLUMNS", "PROMOTION_COLUMNS"]

#: How far a cell got through the budgets and why it stopped (:meth:`SearchRun.cells`).
PROMOTION_COLUMNS = ["reached", "promotion_score", "promoted", "stop_reason"]

#: The columns :meth:`SearchRun.confirmations` adds to :meth:`SearchRun.cells`.
CONFIRMATION_COLUMNS = ["confirmed", "confirm_ratio", "confirm_low", "confirm_high", "confirm_task", "confirm_pairs",
                        "score_mean", "score_spread"]


def describe_mutation(mutation_json: Any) -> tuple[str, str]:
    """``(operators, detail)`` of a stored mutation record: ``("", "seed cell")`` for a cell without one."""
    if not isinstance(mutation_json, str):
        return "", "seed cell"
    record = json.loads(mutation_json)
    try:
        from cellsearch.mutation import Mutation

        # the operations only: rebuilding 50,000 child cells was most of the time of cells() on a large run
        operations = Mutation.operations_from_dict(record)
        return ("+".join(operation.kind for operation in operations),
                "; ".join(f"{operation.kind}: {operation.describe()}" for operation in operations))
    except Exception:  # noqa: BLE001 - an older or foreign record: show its operations as stored
        stored = record.get("operations", ())
        return ("+".join(str(op.get("kind", "?")) if isinstance(op, dict) else "?" for op in stored),
                "; ".join(str(operation) for operation in stored))


def _json_columns(texts: pd.Series) -> pd.DataFrame:
    """The JSON objects in ``texts`` (None or empty: no keys) as columns, as ``pd.json_normalize`` makes them.

    Flat objects (every value a scalar or a list: hyperparameters, metrics) are built straight from the records,
    which gives the same table as ``json_normalize`` at a fraction of its time and memory on a million rows; a
    nested object anywhere falls back to ``json_normalize`` (its ``a.b`` column names)."""
    loads = json.loads
    records = [loads(text) if text else {} for text in texts]
    if not any(records) or any(isinstance(value, dict) for record in records for value in record.values()):
        return pd.json_normalize(records)
    return pd.DataFrame.from_records(records)


def _describe_mutations(cells: pd.DataFrame) -> None:
    """Fill ``mutation`` and ``mutation_detail`` from ``mutation_json`` (:func:`describe_mutation`), in place."""
    described = [describe_mutation(text) for text in cells["mutation_json"]]
    cells["mutation"] = [operators for operators, _ in described]
    cells["mutation_detail"] = [detail for _, detail in described]


def load_run(path: str | Path) -> "SearchRun":
    """Open the search in run directory ``path`` for reading."""
    return SearchRun(path)


class SearchRun:
    """A search's tables as DataFrames; see the module docstring for how scores are defined."""

    def __init__(self, path: str | Path):
        from cellsearch.search.config import SearchConfig
        from cellsearch.search.run import read_run_info
        from cellsearch.search.storage import connect_url, make_engine, one_line_errors, sqlite_path, sqlite_url
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
        # a damaged database (random bytes, truncated, 0 bytes, a dropped table) is one line, here and in every read
        one_line_errors(self.engine, f"the run database of {self.path}")
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(RUN.c.config_yaml, RUN.c.versions_json)).first()
        if row is None:
            raise UserError(f"the run database of {self.path} holds no run (its first start was interrupted); "
                            f"`cellsearch resume {self.path}` finishes creating it")
        import yaml

        self.config: SearchConfig = from_mapping(SearchConfig, yaml.safe_load(row[0]))
        self.versions: dict[str, str] = json.loads(row[1])
        self.tasks: tuple[str, ...] = self.config.tasks
        self.reference_hash: str = zoo.get(self.config.reference_cell).hash

    def close(self) -> None:
        self.engine.dispose()

    def archive(self, target: str | Path, force: bool = False) -> Path:
        """Write a small, read-only copy of the run to directory ``target``: a run directory whose ``run.db`` is a
        SQLite file holding the search's own tables (cells, steps, units, evaluations with their learning curves,
        population, promotions), without Optuna's tables.

        Everything that reads a run works on it (:func:`load_run`, ``cellsearch top``, ``show``, ``export``,
        ``report``), wherever it is moved or cloned, from SQLite or PostgreSQL runs alike; a search cannot be
        resumed from it (its driver refuses: the Optuna studies are not there). ``target`` must be missing,
        empty or an earlier archive (``force`` replaces anything else). This is what a results directory commits
        so that a reference run can be re-reported from a fresh clone.
        """
        import shutil

        from cellsearch.outputs import replaced_directory
        from cellsearch.search.storage import metadata, sqlite_url

        target = Path(target)
        present = [table for table in metadata.sorted_tables if sa.inspect(self.engine).has_table(table.name)]
        with replaced_directory(target, "cellsearch archive", "archive directory", force=force) as staging:
            engine = sa.create_engine(sqlite_url(staging / "run.db"))
            try:
                metadata.create_all(engine, tables=present)
                with self.engine.connect() as source, engine.begin() as copy:
                    for table in present:
                        rows = source.execute(sa.select(table)).mappings()
                        while chunk := [dict(row) for row in rows.fetchmany(5000)]:
                            copy.execute(table.insert(), chunk)
                    copy.execute(STATE.insert().values(key=ARCHIVE_KEY, value=1))
                with engine.connect() as connection:
                    connection.exec_driver_sql("VACUUM")
            finally:
                engine.dispose()
            for name in ("config.yaml", "versions.json"):
                if (self.path / name).is_file():
                    shutil.copyfile(self.path / name, staging / name)
            # the path is the archive's own run.db where it is written; a moved or cloned copy reads the run.db
            # beside its run.json (cellsearch.search.run.read_run_info)
            (staging / "run.json").write_text(json.dumps(
                {"run_id": self.run_id, "storage": sqlite_url(target.resolve() / "run.db"), "archive": True},
                indent=2) + "\n")
        return target

    def _read(self, query: sa.Select) -> pd.DataFrame:
        with self.engine.connect() as connection:
            return pd.read_sql(query, connection)

    def best_scores(self) -> pd.DataFrame:
        """Best score per cell (rows) and task (columns), over every committed evaluation except partial ones
        (settings pruned by successive halving or trained only to the promotion rung: see
        :meth:`cellsearch.search.storage.RunStorage.best_scores`)."""
        e = EVALUATIONS.c
        # the maximum is taken by the database (one row per cell and task, not one per evaluation)
        evaluations = self._read(sa.select(e.cell_hash, e.task, sa.func.max(e.score).label("score"))
                                 .where(e.status.notin_(PARTIAL_STATUSES)).group_by(e.cell_hash, e.task))
        table = evaluations.pivot_table(index="cell_hash", columns="task", values="score", aggfunc="max")
        return table.reindex(columns=list(self.config.all_tasks))

    def reference_best(self) -> pd.Series:
        """The reference cell's current best score per task (the denominators of every ratio)."""
        best = self.best_scores()
        if self.reference_hash in best.index:
            return best.loc[self.reference_hash, list(self.tasks)]
        return pd.Series(float("nan"), index=list(self.tasks))

    def cells(self) -> pd.DataFrame:
        """One row per proposed cell, best score first; the columns are listed in the README's data dictionary.

        Identity and lineage: ``cell_hash``, ``short_hash``, ``name``, ``parent_hash``, ``mutation`` (the
        operators that made it from its parent, e.g. ``swap_activation``), ``mutation_detail`` (what they
        changed), ``step_created``, ``nodes``, ``params_per_width`` (parameter_count(H)/H^2 at H =
        :data:`PARAMETER_WIDTH` = 128: about the number of H x H matrices of one layer). Outcome: ``status``
        (evaluating | population | evaluated | rejected), ``rejected_by`` (duplicate, the filter task,
        ``promotion`` or the task whose early stop ended it). Results: ``metric_<task>`` (the best held-out
        metric over its settings: accuracy, 1/perplexity for ptb), ``perplexity_ptb`` (when ptb is a task),
        ``ratio_<task>`` (metric / the reference cell's current best metric), ``score`` (min ratio; NaN unless
        evaluated on every task), ``evaluations`` (settings trained). ``attrs`` holds the reference cell's
        current best metric per task.

        How far each candidate got and why it stopped: ``reached`` (``filter``: stopped by the memorisation
        filter; ``rung``: trained only to the promotion rung; ``full``: trained at the full budget on at least
        one task; empty for a duplicate or a cell not yet trained), ``promotion_score`` and ``promoted`` (the
        rung score and the decision, with ``promotion`` on) and ``stop_reason`` (one sentence). Confirmation
        (``confirm_seeds``): see :meth:`confirmations`.
        """
        return self._cells()

    def _cells(self, describe: bool = True) -> pd.DataFrame:
        """:meth:`cells`; without ``describe`` the mutation columns are left empty and ``mutation_json`` is kept, so
        that a caller needing a few rows describes only those (:meth:`top`: describing is most of the time of
        reading 50,000 cells)."""
        c = CELLS.c
        cells = self._read(sa.select(c.hash.label("cell_hash"), c.name, c.parent_hash, c.step_created,
                                     c.node_count.label("nodes"), c.params_per_width, c.status, c.rejected_by,
                                     c.duplicate_of, c.mutation_json))
        cells["short_hash"] = cells["cell_hash"].str[:12]
        if describe:
            _describe_mutations(cells)
        else:
            cells["mutation"] = cells["mutation_detail"] = None
        best = self.best_scores()
        reference = self.reference_best()
        tasks = list(self.tasks)
        # one definition of the ratio and the score (cellsearch.scoring), cell by cell
        ratios = pd.DataFrame({task: [task_ratio(value, reference.get(task)) for value in best[task]]
                               for task in tasks}, index=best.index, dtype=float)
        per_task = pd.concat([best.add_prefix("metric_"), ratios.add_prefix("ratio_")], axis="columns")
        counts = self._read(sa.select(EVALUATIONS.c.cell_hash, sa.func.count().label("evaluations"))
                            .group_by(EVALUATIONS.c.cell_hash))
        table = (cells
                 .merge(per_task, left_on="cell_hash", right_index=True, how="left")
                 .merge(counts, on="cell_hash", how="left"))
        if "ptb" in self.config.all_tasks:
            table["perplexity_ptb"] = [1.0 / value if value > 0 else float("nan") for value in table["metric_ptb"]]
        table["score"] = [cell_score(row) for row in table[[f"ratio_{task}" for task in tasks]].itertuples(index=False)]
        table["score"] = table["score"].astype(float)
        table["evaluations"] = table["evaluations"].fillna(0).astype(int)
        table = table.merge(self.confirmations(), left_on="cell_hash", right_index=True, how="left")
        table = table.merge(self._progress_through_budgets(table), left_on="cell_hash", right_index=True, how="left")
        order = ["cell_hash", "short_hash", "name", "parent_hash", "mutation", "mutation_detail", "step_created",
                 "nodes", "params_per_width", "status", "rejected_by", "duplicate_of",
                 *[f"metric_{t}" for t in self.config.all_tasks],
                 *(["perplexity_ptb"] if "ptb" in self.config.all_tasks else []),
                 *[f"ratio_{t}" for t in tasks], "score", "evaluations", *PROMOTION_COLUMNS, *CONFIRMATION_COLUMNS,
                 *([] if describe else ["mutation_json"])]
        table = table[order].sort_values(["score", "step_created"], ascending=[False, True], na_position="last")
        table = table.reset_index(drop=True)
        table.attrs["reference_cell"] = self.config.reference_cell
        table.attrs["reference_best"] = reference.to_dict()
        table.attrs["note"] = ("ratios are relative to the current best of the reference cell "
                               f"({self.config.reference_cell})")
        return table

    def promotions(self) -> pd.DataFrame:
        """One row per promotion decision (``promotion`` config), indexed by cell hash: ``step``, ``promotion_score``
        (the rung score: min over tasks of the ratio to the reference at the rung, as it stood then) and
        ``promoted``. Empty for a search without promotion (or a database from before it existed)."""
        columns = ["cell_hash", "step", "promotion_score", "promoted"]
        if not sa.inspect(self.engine).has_table(PROMOTIONS.name):
            return pd.DataFrame(columns=columns).set_index("cell_hash")
        p = PROMOTIONS.c
        table = self._read(sa.select(p.cell_hash, p.step, p.score.label("promotion_score"), p.promoted)
                           .order_by(p.step))
        table["promoted"] = table["promoted"].astype("boolean")
        return table.drop_duplicates("cell_hash", keep="last").set_index("cell_hash")

    def _progress_through_budgets(self, cells: pd.DataFrame) -> pd.DataFrame:
        """``reached``, ``promotion_score``, ``promoted`` and ``stop_reason`` per cell (see :meth:`cells`)."""
        e = EVALUATIONS.c
        trained = self._read(sa.select(e.cell_hash, e.task, e.status).distinct())
        full = set(trained.loc[~trained["status"].isin(PARTIAL_STATUSES) & trained["task"].isin(self.tasks),
                               "cell_hash"])
        at_rung = set(trained.loc[(trained["status"] == "rung") & trained["task"].isin(self.tasks), "cell_hash"])
        filtered = set(trained.loc[trained["task"] == self.config.memorize_task, "cell_hash"]) \
            if self.config.memorize_task else set()
        promotions = self.promotions()
        config = self.config
        rows = []
        for row in cells.itertuples(index=False):
            cell = row.cell_hash
            score = promotions.at[cell, "promotion_score"] if cell in promotions.index else float("nan")
            promoted = promotions.at[cell, "promoted"] if cell in promotions.index else pd.NA
            # a rung setting that diverged keeps its status (diverged), so the decision says where a cell stopped
            stopped_at_rung = cell in promotions.index and not bool(promoted)
            rejected_by = row.rejected_by if isinstance(row.rejected_by, str) else None
            reached = ("filter rung" if rejected_by == "filter_promotion"
                       else "rung" if stopped_at_rung or (cell in at_rung and cell not in full)
                       else "full" if cell in full else "filter" if cell in filtered else "")
            if row.status == "evaluating":
                reason = "being evaluated"
            elif rejected_by is None:
                reason = "seed cell, trained on every task" if not isinstance(row.parent_hash, str) \
                    else "passed every task"
            elif rejected_by == "duplicate":
                reason = f"duplicate of {str(row.duplicate_of)[:12]}, not trained"
            elif rejected_by == config.memorize_task:
                best = getattr(row, f"metric_{rejected_by}", float("nan"))
                reason = (f"{rejected_by} best {best:.3f} below the memorisation threshold "
                          f"{config.memorize_threshold:g}")
            elif rejected_by == "filter_promotion":
                reason = (f"{config.memorize_task} accuracy at the filter's rung not in the top "
                          f"1/{config.filter_promotion.eta} of the candidates measured there then")
            elif rejected_by == "promotion":
                reason = (f"rung score {score:.3f} not in the top 1/{config.promotion.eta} of the candidates "
                          f"measured at the rung then")
            elif rejected_by in self.tasks:
                reason = (f"{rejected_by} best below {config.early_stop_fraction:g} x the reference's best then "
                          f"(ratio now {getattr(row, f'ratio_{rejected_by}'):.3f})")
            else:
                reason = f"stopped by {rejected_by}"
            rows.append({"cell_hash": cell, "reached": reached, "promotion_score": score, "promoted": promoted,
                         "stop_reason": reason})
        table = pd.DataFrame(rows, columns=["cell_hash", *PROMOTION_COLUMNS]).set_index("cell_hash")
        table["promoted"] = table["promoted"].astype("boolean")
        table["promotion_score"] = table["promotion_score"].astype(float)
        return table

    def confirmations(self) -> pd.DataFrame:
        """One row per candidate that went through a confirm step (``confirm_seeds``), indexed by cell hash.

        Columns: ``confirmed`` (True when every task's paired ratio interval lies above 1; NA for a confirm step
        still running), ``confirm_ratio`` / ``confirm_low`` / ``confirm_high`` (the worst task's paired ratio of
        means and its 95% Fieller interval), ``confirm_task`` (that task), ``confirm_pairs`` (its seeds trained by
        both cells), ``score_mean`` / ``score_spread`` (mean and standard deviation over those seeds of the
        per-seed ratio, candidate / reference, on that task). See :mod:`cellsearch.search.confirmation`.
        """
        steps = self._read(sa.select(STEPS.c.step, STEPS.c.cell_hash, STEPS.c.status).where(STEPS.c.kind == "confirm"))
        rows = []
        for step in steps.itertuples(index=False):
            e = EVALUATIONS.c
            evaluations = self._read(sa.select(e.cell_hash, e.task, e.seed, e.score).where(e.step == step.step))
            pairs = pairs_by_task(evaluations.to_dict("records"), step.cell_hash, self.reference_hash)
            outcome = confirm(pairs, self.tasks)
            ratio, task = outcome.ratio, outcome.worst_task
            candidate, reference = pairs.get(task, ([], []))
            per_seed = [c / r for c, r in zip(candidate, reference) if r > 0]
            rows.append({"cell_hash": step.cell_hash,
                         "confirmed": outcome.confirmed if step.status == "done" else pd.NA,
                         "confirm_ratio": ratio.estimate, "confirm_low": ratio.low, "confirm_high": ratio.high,
                         "confirm_task": task, "confirm_pairs": len(candidate),
                         "score_mean": float(pd.Series(per_seed).mean()) if per_seed else float("nan"),
                         "score_spread": float(pd.Series(per_seed).std()) if len(per_seed) > 1 else float("nan")})
        table = pd.DataFrame(rows, columns=["cell_hash", *CONFIRMATION_COLUMNS]).set_index("cell_hash")
        table["confirmed"] = table["confirmed"].astype("boolean")
        return table

    def population(self) -> pd.DataFrame:
        """The current population, best first."""
        cells = self.cells()
        return cells[cells["status"] == "population"].reset_index(drop=True)

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` best cells that passed every filter (in the population now or not)."""
        cells = self._cells(describe=False)
        passed = cells["status"].isin(["population", "evaluated"]) & cells["score"].notna()
        top = cells[passed].head(n).reset_index(drop=True)
        _describe_mutations(top)
        top = top.drop(columns="mutation_json")
        top.attrs = cells.attrs
        return top

    def evaluation_count(self) -> int:
        """How many settings were trained (the number of rows of :meth:`evaluations`), counted by the database."""
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(EVALUATIONS)).scalar_one())

    def evaluation_scores(self) -> pd.DataFrame:
        """``cell_hash``, ``task``, ``status`` and ``metric`` of every trained setting, in commit order: the columns
        of :meth:`evaluations` a best-score curve needs, without reading the rest."""
        e = EVALUATIONS.c
        return self._read(sa.select(e.cell_hash, e.task, e.status, e.score.label("metric")).order_by(e.id))

    def evaluations(self, cell_hash: str | None = None) -> pd.DataFrame:
        """One row per trained setting: ``cell_hash``, ``task``, ``trial_number``, ``seed``, ``metric`` (its best
        held-out metric: accuracy, 1/perplexity for ptb; 0 for a setting that diverged or failed), ``perplexity``
        (ptb rows), ``status``, every hyperparameter, timing, where it ran, and the held-out details
        (``best_epoch``, ``valid_loss``, ``valid_accuracy`` or ``valid_perplexity``, ``test_*`` when asked for).
        The README's data dictionary lists every column. ``cell_hash``: only that cell's rows (read by the
        database through its index, not filtered afterwards)."""
        e = EVALUATIONS.c
        query = sa.select(e.id, e.unit_id, e.step, e.cell_hash, e.task, e.trial_number,
                          e.params_json, e.seed, e.score.label("metric"), e.status, e.duration_s,
                          e.train_steps, e.epochs,
                          e.node_id.label("node"), e.worker_pid, e.hostname, e.finished_at, e.metrics_json)
        if cell_hash is not None:
            query = query.where(e.cell_hash == cell_hash)
        rows = self._read(query.order_by(e.id))
        params = _json_columns(rows["params_json"])
        params.index = rows.index
        metrics = _json_columns(rows["metrics_json"])
        metrics.index = rows.index
        metrics = metrics.drop(columns=[c for c in metrics.columns if c in rows.columns or c in params.columns])
        table = pd.concat([rows.drop(columns=["params_json", "metrics_json"]), params, metrics], axis="columns")
        table.insert(table.columns.get_loc("metric") + 1, "perplexity",
                     [1.0 / m if task == "ptb" and m > 0 else float("nan")
                      for task, m in zip(table["task"], table["metric"])])
        table["finished_at"] = pd.to_datetime(table["finished_at"], unit="s", utc=True)
        return table

    def steps(self) -> pd.DataFrame:
        """One row per step: kind, cell, parent, outcome, timing."""
        table = self._read(sa.select(STEPS).order_by(STEPS.c.step))
        for column in ("started_at", "finished_at"):
            table[column] = pd.to_datetime(table[column], unit="s", utc=True)
        return table

    def population_changes(self) -> pd.DataFrame:
        """Population entries and departures, in order."""
        p = POPULATION.c
        table = self._read(sa.select(p.step, p.cell_hash, p.action, p.score, p.at).order_by(p.id))
        table["at"] = pd.to_datetime(table["at"], unit="s", utc=True)
        return table

    def units(self) -> pd.DataFrame:
        """One row per unit of work (pending units are planned but not committed)."""
        u = UNITS.c
        table = self._read(sa.select(u.unit_id, u.step, u.stage, u.cell_hash, u.task, u.slot, u.status, u.submissions,
                                     u.created_at, u.finished_at).order_by(u.unit_id))
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
            rows = connection.execute(sa.select(CELLS).where(CELLS.c.hash.startswith(prefix))).mappings().all()
        if not rows:
            raise UserError(f"no cell with hash {prefix} in {self.path}")
        if len(rows) > 1:
            raise UserError(f"hash prefix {prefix} is ambiguous ({len(rows)} cells); give more digits")
        return dict(rows[0])

    def lineage(self, cell_hash: str, cells: pd.DataFrame | None = None) -> pd.DataFrame:
        """The cell and its ancestors, newest first, with the mutation that made each. ``cells``: a table
        :meth:`cells` returned just before, to read the ancestors from (instead of reading every cell again)."""
        cells = (self.cells() if cells is None else cells).set_index("cell_hash")
        chain = []
        current: str | None = self.resolve_hash(cell_hash)
        while current is not None and current in cells.index and current not in chain:
            chain.append(current)
            parent = cells.at[current, "parent_hash"]
            current = parent if isinstance(parent, str) else None
        return cells.loc[chain].reset_index()
