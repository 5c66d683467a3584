"""Planning, storing and running a fidelity study.

A study trains every cell under every budget with the same settings and seeds, and records one row
per trained member (cell x run group x setting x seed) in ``study.db`` (SQLite) inside the study's
directory. The rows of one unit of work commit in one transaction, so a study killed at any moment
(Ctrl-C, ``kill -9``, a lost worker) restarts with the same command, skips what is recorded and
re-runs only units that had not committed: no evaluation is lost or repeated.

**Shared runs.** Budgets that differ only in where they stop (``max_steps`` / ``max_epochs``, at a
whole number of epochs of the same length) and agree on everything else (profile, schedule,
setting) are one *run group*: training is deterministic and ``max_steps`` only stops it, so the
shorter budget's run is exactly the first part of the longer one. Each group trains once, at its
longest budget, and the shorter budgets are read from its learning curve
(:func:`truncate_result`; ``tests/test_calibration.py`` checks the equality against separate runs).
The CPU time of a read-off budget is the run's, pro-rated by steps.

Size: planning, the study database and running belong together here (the plan's rows are the
database's keys, resume compares them); the statistics are in :mod:`cellsearch.calibration.analysis`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import sqlalchemy as sa

from cellsearch.calibration.config import StudyConfig
from cellsearch.config import ConfigError, load_yaml
from cellsearch.errors import UserError
from cellsearch.hparams import HyperParameterSpace, HyperParams, setting_key
from cellsearch.search import seeds
from cellsearch.spec import CellSpec

__all__ = ["StudyCell", "ResolvedBudget", "RunGroup", "StudyPlan", "plan_study", "StudyStore", "run_study",
           "truncate_result", "StudyOutcome", "STUDY_DB", "study_cells", "pending_units", "resolve_budgets"]

STUDY_DB = "study.db"
#: Random streams of a study (under the study seed), apart from the search's streams.
_CELLS_STREAM, _SETTINGS_STREAM, _TRAIN_STREAM = 11, 12, 13
_STOP_KEYS = ("max_steps", "max_epochs", "max_seconds")


# ------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class StudyCell:
    """A cell of the study and where it came from."""

    spec: CellSpec
    name: str
    origin: str  # zoo | file | mutated
    parent: str = ""
    mutations: str = ""

    @property
    def hash(self) -> str:
        return self.spec.hash


def study_cells(config: StudyConfig) -> list[StudyCell]:
    """The zoo cells, the cell files and ``mutated_cells`` mutated cells, each distinct (hash and function).

    Mutated cells are drawn from the study seed alone: the same config gives the same cells. Each is
    1..``max_mutations`` successive mutations of a parent from ``mutation_parents``; a child that
    computes the same function as a cell already chosen (:func:`cellsearch.dedup.fingerprint`) is
    drawn again.
    """
    from cellsearch import zoo
    from cellsearch.dedup import fingerprint
    from cellsearch.mutation import MutationError, mutate

    cells: list[StudyCell] = []
    seen_hashes: set[str] = set()
    seen_functions: set[str] = set()

    def add(cell: StudyCell) -> bool:
        function = fingerprint(cell.spec)
        if cell.hash in seen_hashes or function in seen_functions:
            return False
        seen_hashes.add(cell.hash)
        seen_functions.add(function)
        cells.append(cell)
        return True

    for name in config.zoo_cells if config.zoo_cells is not None else zoo.PAPER_CELLS:
        add(StudyCell(zoo.get(name), name, "zoo"))
    for path in config.cell_files:
        try:
            spec = CellSpec.load(path)
        except OSError as error:
            raise UserError(f"cannot read the cell file {path}: {error.strerror or error}") from None
        if not add(StudyCell(spec, spec.name or Path(path).stem, "file")):
            raise UserError(f"the cell file {path} computes the same function as a cell already in the study")
    rng = seeds.generator(config.seed, _CELLS_STREAM)
    wanted = len(cells) + config.mutated_cells
    attempts = 0
    while len(cells) < wanted:
        attempts += 1
        if attempts > 50 * config.mutated_cells + 100:
            raise UserError(f"could only draw {len(cells) - wanted + config.mutated_cells} distinct mutated cells "
                            f"of the {config.mutated_cells} asked for")
        parent_name = config.mutation_parents[int(rng.integers(len(config.mutation_parents)))]
        spec = zoo.get(parent_name)
        steps = []
        try:
            for _ in range(1 + int(rng.integers(config.max_mutations))):
                mutation = mutate(spec, rng)
                spec = mutation.child
                steps.append("; ".join(op.describe() for op in mutation.operations))
        except MutationError:
            continue
        add(StudyCell(spec, f"m{len(cells) - wanted + config.mutated_cells + 1:02d}-{spec.hash[:8]}", "mutated",
                      parent_name, " | ".join(steps)))
    return cells


# ----------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class ResolvedBudget:
    """A budget with the task's profile applied: the Budget, the default setting, the space, where it stops."""

    name: str
    profile: str
    budget: Any  # cellsearch.tasks.base.Budget
    defaults: HyperParams
    space: HyperParameterSpace
    group: str

    @property
    def step_limit(self) -> int | None:
        """The most optimiser steps it may take (None: one pass per epoch, length unknown here)."""
        if self.budget.steps_per_epoch is None:
            return self.budget.max_steps
        limit = self.budget.max_epochs * self.budget.steps_per_epoch
        return limit if self.budget.max_steps is None else min(limit, self.budget.max_steps)


@dataclass(frozen=True)
class RunGroup:
    """Budgets trained as one run (the longest of them); see the module docstring."""

    name: str
    budget: Any  # the Budget the group's runs train with
    settings: tuple[HyperParams, ...]
    members: tuple[str, ...]  # budget names, shortest first


def _shares_runs(resolved: ResolvedBudget) -> bool:
    budget = resolved.budget
    limit = resolved.step_limit
    return budget.steps_per_epoch is not None and limit is not None and limit % budget.steps_per_epoch == 0


def _group_key(resolved: ResolvedBudget) -> str:
    budget = {k: v for k, v in resolved.budget.to_dict().items() if k not in _STOP_KEYS}
    return json.dumps({"profile": resolved.profile, "budget": budget, "defaults": resolved.defaults.to_dict(),
                       "space": resolved.space.to_dict()}, sort_keys=True)


def _settings(config: StudyConfig, resolved: ResolvedBudget, group_label: str) -> tuple[HyperParams, ...]:
    settings: list[HyperParams] = [resolved.defaults] if config.default_setting else []
    seen = {setting_key(s) for s in settings}
    key = int(hashlib.sha256(group_label.encode()).hexdigest()[:15], 16)
    rng = seeds.generator(config.seed, _SETTINGS_STREAM, key)
    wanted = len(settings) + min(config.random_settings, resolved.space.size - len(seen))
    while len(settings) < wanted:
        setting = resolved.space.sample(rng)
        if setting_key(setting) not in seen:
            seen.add(setting_key(setting))
            settings.append(setting)
    return tuple(settings)


@dataclass(frozen=True)
class StudyPlan:
    """Everything a study trains."""

    config: StudyConfig
    cells: tuple[StudyCell, ...]
    budgets: tuple[ResolvedBudget, ...]
    groups: tuple[RunGroup, ...]
    reference_budget: str

    def unit_key(self, group: str, cell_hash: str) -> str:
        return f"{group}/{cell_hash}"

    def members(self, group: RunGroup) -> list[tuple[int, int, HyperParams, int]]:
        """(setting index, seed index, setting, training seed) of every member of a group's units."""
        return [(s, k, setting, seeds.derived_seed(self.config.seed, _TRAIN_STREAM, s, k))
                for s, setting in enumerate(group.settings) for k in range(self.config.seeds)]

    def budget(self, name: str) -> ResolvedBudget:
        return next(b for b in self.budgets if b.name == name)

    def group(self, name: str) -> RunGroup:
        return next(g for g in self.groups if g.name == name)


def resolve_budgets(config: StudyConfig, task) -> dict[str, dict[str, Any]]:
    """Each budget with the task's profile applied, as plain data (what a study stores and keeps)."""
    resolved = {}
    for spec in config.budgets:
        try:
            budget = task.budget(spec.profile)
            if spec.budget:
                budget = budget.replace(**dict(spec.budget))
            defaults = task.default_hparams(spec.profile).replace(**dict(spec.hparams))
            space = task.space_for(spec.profile).override(dict(spec.space))
        except ConfigError as error:
            raise ConfigError(f"budget {spec.name}: {error}") from None
        resolved[spec.name] = {"profile": spec.profile, "budget": budget.to_dict(), "defaults": defaults.to_dict(),
                               "space": space.to_dict()}
    return resolved


def plan_study(config: StudyConfig, task, resolved: Mapping[str, Mapping[str, Any]] | None = None,
               cells: Sequence[StudyCell] | None = None) -> StudyPlan:
    """Group the budgets into shared runs and draw the cells.

    ``resolved`` (from :func:`resolve_budgets`) and ``cells`` are what a study stored when it began:
    a study keeps its budgets and cells even when a task file's profiles or the mutation engine
    change later. Without them the budgets are resolved against ``task`` and the cells drawn now.
    """
    from cellsearch.tasks.base import Budget

    resolved = resolved or resolve_budgets(config, task)
    items = []
    for spec in config.budgets:
        data = resolved[spec.name]
        items.append(ResolvedBudget(spec.name, data["profile"], Budget.from_dict(data["budget"]),
                                    HyperParams.from_dict(data["defaults"]),
                                    HyperParameterSpace.from_dict(data["space"]), group=""))
    groups: dict[str, list[ResolvedBudget]] = {}
    for item in items:
        key = _group_key(item) if _shares_runs(item) else f"alone:{item.name}"
        groups.setdefault(key, []).append(item)
    run_groups, final = [], {}
    for members in groups.values():
        members.sort(key=lambda b: (b.step_limit or math.inf, b.name))
        longest = members[-1]
        label = longest.name
        run_groups.append(RunGroup(label, longest.budget, _settings(config, longest, label),
                                   tuple(b.name for b in members)))
        for item in members:
            final[item.name] = ResolvedBudget(item.name, item.profile, item.budget, item.defaults, item.space, label)
    budgets = tuple(final[spec.name] for spec in config.budgets)
    reference = config.reference_budget or max(budgets, key=lambda b: (b.step_limit or math.inf)).name
    return StudyPlan(config, tuple(cells) if cells else tuple(study_cells(config)), budgets, tuple(run_groups),
                     reference)


def truncate_result(result: Mapping[str, Any], limit: int | None, run_limit: int | None) -> dict[str, Any]:
    """The result a run would have had with ``max_steps = limit``, read from the longer run ``result``.

    Exact for a deterministic run when ``limit`` is a whole number of epochs (see the module
    docstring): the score is the best held-out score at evaluations up to ``limit``; a divergence
    or timeout after ``limit`` did not happen in the shorter run.
    """
    result = dict(result)
    if limit is None or (run_limit is not None and limit >= run_limit):
        return result
    status, steps = result["status"], int(result["steps"])
    if status == "diverged":
        # a training step diverged at step steps+1; a held-out evaluation after step `steps`
        held_out = str(result.get("message", "")).startswith("held-out")
        failed_within = steps <= limit if held_out else steps < limit
        status = "diverged" if failed_within else "ok"
    elif status == "timeout":
        status = "timeout" if steps < limit else "ok"
    elif status in ("error", "oom"):
        return result
    points = [p for p in result.get("curve", ()) if p["step"] <= limit]
    short_steps = min(steps, limit)
    score = 0.0 if status == "diverged" else max((p["score"] for p in points), default=0.0)
    fraction = short_steps / steps if steps else 1.0
    result.update(status=status, score=score, steps=short_steps, curve=points,
                  epochs=points[-1]["epoch"] if points else 0,
                  cpu_s=result.get("cpu_s", 0.0) * fraction, duration_s=result.get("duration_s", 0.0) * fraction,
                  message="" if status == "ok" else result.get("message", ""))
    return result


# ----------------------------------------------------------------------------------------- storage
_METADATA = sa.MetaData()
_META = sa.Table("study", _METADATA, sa.Column("key", sa.String, primary_key=True), sa.Column("value", sa.Text))
_CELLS = sa.Table(
    "cells", _METADATA,
    sa.Column("cell_hash", sa.String, primary_key=True), sa.Column("position", sa.Integer),
    sa.Column("name", sa.String), sa.Column("origin", sa.String),
    sa.Column("parent", sa.String), sa.Column("mutations", sa.Text), sa.Column("spec_json", sa.Text))
_EVALUATIONS = sa.Table(
    "evaluations", _METADATA,
    sa.Column("run_group", sa.String, primary_key=True), sa.Column("cell_hash", sa.String, primary_key=True),
    sa.Column("setting_index", sa.Integer, primary_key=True), sa.Column("seed_index", sa.Integer, primary_key=True),
    sa.Column("seed", sa.Integer), sa.Column("hparams_json", sa.Text), sa.Column("status", sa.String),
    sa.Column("score", sa.Float), sa.Column("steps", sa.Integer), sa.Column("epochs", sa.Integer),
    sa.Column("duration_s", sa.Float), sa.Column("cpu_s", sa.Float), sa.Column("hidden_size", sa.Integer),
    sa.Column("parameter_count", sa.Integer), sa.Column("message", sa.Text), sa.Column("curve_json", sa.Text),
    sa.Column("hostname", sa.String), sa.Column("worker_pid", sa.Integer), sa.Column("finished_at", sa.Float))


class StudyStore:
    """``study.db`` of a study directory: the config, the cells and one row per trained member."""

    def __init__(self, directory: str | Path, config: StudyConfig | None = None):
        self.directory = Path(directory)
        path = self.directory / STUDY_DB
        if config is None and not path.is_file():
            raise UserError(f"{directory} holds no fidelity study (no {STUDY_DB})")
        if config is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(f"cannot create {directory}: {error.strerror or error}") from None
        self.engine = sa.create_engine(sa.engine.URL.create("sqlite", database=str(path)))
        try:
            _METADATA.create_all(self.engine)
            stored = self._meta("config")
        except sa.exc.DatabaseError as error:
            raise UserError(f"{path} is not a study database this cellsearch can read ({error.orig})") from None
        if config is None:
            self.config = StudyConfig.from_dict(json.loads(stored))
        elif stored is None:
            self.config = config
            with self.engine.begin() as connection:
                connection.execute(_META.insert(), [{"key": "config", "value": config.to_json()},
                                                    {"key": "created", "value": str(time.time())}])
        elif json.loads(stored) != json.loads(config.to_json()):
            before, after = json.loads(stored), json.loads(config.to_json())
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            raise UserError(f"{directory} holds a study with another design (differs in {', '.join(changed)}); "
                            f"give another --out, or run `cellsearch calibrate --resume {directory}`")
        else:
            self.config = config

    def resolved_budgets(self) -> dict[str, Any] | None:
        """The budgets as resolved when the study began (None for a study from before they were stored)."""
        stored = self._meta("resolved_budgets")
        return None if stored is None else json.loads(stored)

    def save_resolved_budgets(self, resolved: Mapping[str, Any]) -> None:
        with self.engine.begin() as connection:
            connection.execute(_META.insert(), [{"key": "resolved_budgets", "value": json.dumps(resolved)}])

    def stored_cells(self) -> list[StudyCell]:
        """The cells recorded when the study began, in the order they were drawn."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(_CELLS).order_by(_CELLS.c.position)).mappings().all()
        return [StudyCell(CellSpec.from_dict(json.loads(r["spec_json"])), r["name"], r["origin"], r["parent"] or "",
                          r["mutations"] or "") for r in rows]

    def _meta(self, key: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(_META.c.value).where(_META.c.key == key)).scalar()

    def record_cells(self, cells: Sequence[StudyCell]) -> None:
        with self.engine.begin() as connection:
            known = set(connection.execute(sa.select(_CELLS.c.cell_hash)).scalars())
            rows = [{"cell_hash": c.hash, "position": i, "name": c.name, "origin": c.origin, "parent": c.parent,
                     "mutations": c.mutations, "spec_json": json.dumps(c.spec.to_dict())}
                    for i, c in enumerate(cells) if c.hash not in known]
            if rows:
                connection.execute(_CELLS.insert(), rows)

    def done_units(self) -> set[tuple[str, str]]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(_EVALUATIONS.c.run_group, _EVALUATIONS.c.cell_hash).distinct())
            return {(group, cell) for group, cell in rows}

    def record_unit(self, group: str, cell_hash: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Every member of one unit, in one transaction (all or nothing)."""
        with self.engine.begin() as connection:
            connection.execute(_EVALUATIONS.insert(),
                               [{"run_group": group, "cell_hash": cell_hash, **row} for row in rows])

    def evaluations(self):
        import pandas as pd

        with self.engine.connect() as connection:
            return pd.read_sql(sa.select(_EVALUATIONS), connection)

    def cells(self):
        import pandas as pd

        with self.engine.connect() as connection:
            return pd.read_sql(sa.select(_CELLS), connection)

    def close(self) -> None:
        self.engine.dispose()


# ------------------------------------------------------------------------------------------ running
def calibration_unit(unit, task) -> list[dict[str, Any]]:
    """A search unit (:func:`cellsearch.search.units.run_unit`) with its CPU time measured, per member."""
    from cellsearch.search.units import run_unit

    started = time.process_time()
    results = [result.to_dict() for result in run_unit(unit, task)]
    cpu = (time.process_time() - started) / max(len(results), 1)
    return [{**result, "cpu_s": cpu} for result in results]


@dataclass
class StudyOutcome:
    """What one invocation of :func:`run_study` did."""

    units_total: int
    units_done_before: int
    units_run: int = 0
    unit_errors: int = 0
    system_failures: int = 0
    stopped: bool = False


def _row(member: tuple[int, int, HyperParams, int], result: Mapping[str, Any] | None, worker: Mapping[str, Any],
         error: str | None) -> dict[str, Any]:
    setting_index, seed_index, setting, seed = member
    result = result or {}
    return {
        "setting_index": setting_index, "seed_index": seed_index, "seed": seed,
        "hparams_json": json.dumps(setting.to_dict(), sort_keys=True),
        "status": "error" if error else result.get("status"), "score": 0.0 if error else result.get("score"),
        "steps": result.get("steps", 0), "epochs": result.get("epochs", 0),
        "duration_s": result.get("duration_s", 0.0), "cpu_s": result.get("cpu_s", 0.0),
        "hidden_size": result.get("hidden_size"), "parameter_count": result.get("parameter_count"),
        "message": (error.strip().splitlines()[-1][:500] if error else result.get("message", "")),
        "curve_json": json.dumps(list(result.get("curve", ()))),
        "hostname": worker.get("hostname"), "worker_pid": worker.get("worker_pid"), "finished_at": time.time(),
    }


def pending_units(plan: StudyPlan, store: StudyStore) -> int:
    """Units of ``plan`` not yet recorded in ``store``."""
    done = store.done_units()
    return sum(1 for group in plan.groups for cell in plan.cells if (group.name, cell.hash) not in done)


def run_study(plan: StudyPlan, store: StudyStore, executor, progress: Callable[[int, int], None] | None = None,
              log: Callable[[str], None] | None = None,
              on_unit: Callable[[str, int, int], None] | None = None) -> StudyOutcome:
    """Train every unit of ``plan`` not yet in ``store`` on ``executor``; each unit commits as one transaction.

    Contract: a unit whose code raised (a bug, a cell that cannot be built) is recorded with status
    ``error`` for all its members and never retried; a unit whose worker or node was lost after Ray's
    retries is not recorded and runs again on the next start (``StudyOutcome.system_failures``).
    Divergence and out of memory are results (status ``diverged`` / ``oom``, score 0), as in a search.
    ``progress(done, total)`` is called at the start and after each recorded unit; ``on_unit(what, done,
    total)`` after each recorded unit too, ``what`` naming it and its members' outcomes (``"b6/gru: 4 ok"``).
    """
    from cellsearch.search.units import SettingSpec, UnitSpec

    log = log or (lambda message: print(message, file=sys.stderr))
    store.record_cells(plan.cells)
    done = store.done_units()
    config = plan.config
    pending = []
    unit_id = 0
    for group in plan.groups:
        members = plan.members(group)
        for cell in plan.cells:
            unit_id += 1
            if (group.name, cell.hash) in done:
                continue
            pending.append((unit_id, group, cell, members))
    total = len(plan.groups) * len(plan.cells)
    outcome = StudyOutcome(total, total - len(pending))
    if progress is not None:
        progress(outcome.units_done_before, total)
    if not pending:
        if executor is not None:
            executor.close()
        return outcome
    by_id: dict[int, tuple] = {}
    queue = list(pending)
    limit = max(1, 2 * executor.slots)
    try:
        executor.prepare([config.task])
        while queue or by_id:
            while queue and len(by_id) < limit:
                item = queue.pop(0)
                uid, group, cell, members = item
                executor.submit(UnitSpec(
                    unit_id=uid, cell=cell.spec.to_dict(), task=config.task, budget_profile="small",
                    settings=tuple(SettingSpec(i, setting.to_dict(), seed) for i, (_, _, setting, seed)
                                   in enumerate(members)),
                    device=config.device, num_threads=max(1, int(config.resources.num_cpus)),
                    batching=config.batching.to_dict(), budget=group.budget.to_dict()))
                by_id[uid] = item
            for completion in executor.wait(timeout=1.0):
                uid, group, cell, members = by_id.pop(completion.unit_id)
                if completion.results is None and completion.system_failure:
                    outcome.system_failures += 1
                    log(f"unit {group.name}/{cell.name}: the worker was lost ({completion.error}); it runs again on "
                        f"the next start")
                    continue
                if completion.results is None:
                    outcome.unit_errors += 1
                    log(f"unit {group.name}/{cell.name} failed: {(completion.error or '').strip().splitlines()[-1:]}")
                    rows = [_row(member, None, completion.worker, completion.error or "error") for member in members]
                else:
                    rows = [_row(member, result, completion.worker, None)
                            for member, result in zip(members, completion.results)]
                store.record_unit(group.name, cell.hash, rows)
                outcome.units_run += 1
                if progress is not None:
                    progress(outcome.units_done_before + outcome.units_run, total)
                if on_unit is not None:
                    statuses = Counter(str(row["status"]) for row in rows)
                    on_unit(f"{group.name}/{cell.name}: "
                            + ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())),
                            outcome.units_done_before + outcome.units_run, total)
    except KeyboardInterrupt:
        outcome.stopped = True
        raise
    finally:
        executor.close()
    return outcome


def load_config_file(path: str | Path) -> StudyConfig:
    """A study config from a YAML/JSON file (unknown keys rejected with the key named)."""
    data = load_yaml(path)
    try:
        return StudyConfig.from_dict(data if isinstance(data, Mapping) else {})
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
