"""The search driver: the paper's evolutionary loop as an asynchronous state machine.

A *step* (one row of ``cs_steps``) is one of

``seed``
    an initial cell (GRU, LSTM) trained with K settings on every task; the
    population starts when every seed step is done;
``reevaluate``
    a random population member trained with K more settings on every task;
``mutate``
    a child of a selected member: skipped when the deduplicator has seen it,
    then memorisation (``memorize_settings`` settings, must reach
    ``memorize_threshold``), then each task in order with K settings, stopping
    as soon as its best on a task is below ``early_stop_fraction`` x the
    reference cell's best; a child that passes every task enters the
    population when its score beats the worst member (``aging``: always, the
    oldest member leaves). With ``promotion`` on, a *rung* stage comes between
    the filter and the tasks: K settings on every task, trained only to the
    promotion rung; the child goes on to the tasks (the same settings and
    seeds, from the start, at the full budget) only when Optuna's
    ``SuccessiveHalvingPruner`` on the study ``promotion`` (one trial per
    candidate, plus one per initial cell) promotes its rung score, which is
    the score above computed at the rung (the reference's rung values are
    read off its full runs' learning curves); otherwise it ends
    ``rejected_by = "promotion"``.

A step advances through *stages*; a stage trains some tasks with some
settings, split into units of at most ``settings_per_unit`` settings. Many
steps are active at once: the driver keeps up to ``max_in_flight`` units
running, starts a new step whenever there is room and reacts to each finished
unit as it arrives. There is no generation barrier.

Score: min over tasks of (cell's best on the task / reference cell's best on
the task), always against the reference cell's *current* best, which rises as
it is re-evaluated (one definition: :mod:`cellsearch.scoring`). Selection and
admission: :mod:`cellsearch.search.population`.

Everything the driver knows is rebuilt from the database at start, so a
fresh search and a resumed one run the same code: units planned but not
committed are re-run with the same settings, Optuna trials that were asked but
never recorded in a unit are closed as FAIL, and trials of committed units
that Optuna did not hear about are told.

Storage faults (see :mod:`cellsearch.search.storage`): every database call,
Optuna's included, is retried through a dropped connection; an ask retried
after a failure first closes the trials the failed attempt left RUNNING (the
same reconciliation as on resume), and tells pass ``skip_if_finished``. With
SQLite, free space on the database's disk is checked every loop iteration:
below ``min_free_space_mb`` the driver starts nothing new, lets the running
units commit and raises :class:`~cellsearch.search.storage.StorageFull`; a
write that fails (full disk, I/O error) or a database unreachable past
``storage_retry_s`` stops it at once. Committed work is intact either way.

Size: the driver is one state machine (steps, stages, units, Optuna trials, resume reconciliation)
whose transitions share its in-memory state; the pure parts live elsewhere (the score in
:mod:`cellsearch.scoring`, the population policy in :mod:`cellsearch.search.population`, seeds in
:mod:`cellsearch.search.seeds`, units in :mod:`cellsearch.search.units`).

Memory: the run database is the record; the driver holds only a working set of it (the descriptions, best
scores and promotion-rung scores of the cells in use, :mod:`cellsearch.search.working_set`), no
per-evaluation objects, and one per-cell structure, the duplicate index (results/scale/dispatch.md).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from cellsearch import zoo
from cellsearch.search import seeds
from cellsearch.search.config import SearchConfig
from cellsearch.fidelity import best_until
from cellsearch.scoring import PARTIAL_STATUSES, score_of
from cellsearch.search.confirmation import Confirmation, confirm, pairs_by_task
from cellsearch.search.executors import Completion
from cellsearch.search.population import PopulationPolicy
from cellsearch.search.storage import PARAMETER_WIDTH, RunStorage, StorageError, StorageFull, engine_options, \
    tune_sqlite
from cellsearch.search.units import SettingSpec, UnitSpec
from cellsearch.search.working_set import BestScores, CellCache, CellScores
from cellsearch.errors import UserError
from cellsearch.spec import CellSpec, CellSpecError

__all__ = ["SearchDriver", "Stage", "stages_for", "study_name", "Progress"]

#: A unit lost to system failures (worker or node death after Ray's own retries) is resubmitted this often.
_RESUBMISSIONS = 2


@dataclass(frozen=True)
class Stage:
    """Part of a step: train ``tasks`` with ``settings`` settings each, then apply ``gate``."""

    tasks: tuple[str, ...]
    settings: int
    gate: str  # none | filter_promote | memorize | promote | ratio
    #: Trained only to the promotion rung (``promotion`` config); its evaluations have status ``rung``.
    rung: bool = False


def stages_for(kind: str, config: SearchConfig) -> list[Stage]:
    """The stages of a step of ``kind`` (seed, reevaluate, mutate)."""
    if kind in ("seed", "reevaluate"):
        return [Stage(config.tasks, config.settings_per_task, "none")]
    if kind == "confirm":
        return [Stage(config.tasks, config.confirm_seeds, "none")]
    memorize = [Stage((config.memorize_task,), config.memorize_settings, "memorize")] if config.memorize_task else []
    if memorize and config.filter_promotion.enabled:
        memorize.insert(0, Stage((config.memorize_task,), config.memorize_settings, "filter_promote", rung=True))
    rung = [Stage(config.tasks, config.settings_per_task, "promote", rung=True)] if config.promotion.enabled else []
    return memorize + rung + [Stage((task,), config.settings_per_task, "ratio") for task in config.tasks]


def study_name(cell_hash: str, task: str, name: str | None = None) -> str:
    """The Optuna study holding a cell's trials on a task: ``<name>/<task>`` for a named initial cell of the run
    (``gru/arithmetic``), ``<first 12 hex digits of the hash>/<task>`` for every other cell, so that
    optuna-dashboard lists names a person can read. (Twelve hex digits are 48 bits: two cells of one run share
    them with probability about n^2 / 2^49, below 1e-5 for 50,000 cells.) The study's user attributes hold the
    full hash."""
    return f"{name or cell_hash[:12]}/{task}"


#: A study name of runs made before the names were readable: the full 64-digit hash, then the task.
_LEGACY_STUDY_NAME = re.compile(r"^([0-9a-f]{64})/(.+)$")


@dataclass
class Progress:
    """What the progress bar shows."""

    steps_done: int = 0
    units_done: int = 0
    in_flight: int = 0
    evaluations: int = 0
    cells_evaluated: int = 0
    best_score: float = math.nan
    best_cell: str | None = None
    #: Seconds this session's driver loop spent on its own work (planning, committing, Optuna), not
    #: waiting for units; start-up (reading tasks, rebuilding state) is not included.
    driver_seconds: float = 0.0
    #: Units committed in this session.
    session_units: int = 0
    #: Candidates that scored above 1 when their evaluation ended (with ``confirm_seeds``: those sent to a confirm
    #: step), and candidates whose confirm step confirmed them.
    beat_reference: int = 0
    confirmed: int = 0
    #: With ``promotion``: candidates measured at the rung, and those promoted to the full budget.
    rung_measured: int = 0
    promoted: int = 0
    #: With ``filter_promotion``: candidates measured at the filter's rung, and those that trained the whole filter.
    filter_rung_measured: int = 0
    filter_promoted: int = 0


@dataclass
class _ActiveStep:
    step: int
    kind: str
    cell_hash: str
    parent_hash: str | None
    stage: int
    units: dict[int, dict[str, Any]] = field(default_factory=dict)  # unit id -> {stage, task, status, settings}


def working_set_capacity(config: SearchConfig) -> int:
    """How many cells' descriptions the driver keeps (``CellCache``): a few populations, so that parents and the
    active steps' cells are nearly always in memory, and no more."""
    return max(1024, 4 * config.population_size)


class SearchDriver:
    """Runs (or continues) the search stored in ``storage`` on ``executor``; see the module docstring."""

    def __init__(self, config: SearchConfig, storage: RunStorage, executor, load_task: Callable[[str], Any],
                 on_progress: Callable[[Progress], None] | None = None, log: Callable[[str], None] | None = None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if storage.is_archive():
            # before Optuna's storage is opened: it would create its tables in the archive
            raise UserError(f"the run database {storage.display_url} is an archive of a run (cellsearch archive): "
                            f"top, show, export, report and load_run read it; a search cannot continue from it")
        self.config = config
        self.storage = storage
        self.executor = executor
        self._load_task = load_task
        self._tasks: dict[str, Any] = {}
        self._on_progress = on_progress or (lambda progress: None)
        self._log = log or (lambda message: None)
        self._optuna = optuna
        # pool_pre_ping and the other engine options: Optuna's own pool outlives a server restart too.
        self.optuna_storage = storage.retry(lambda: optuna.storages.RDBStorage(
            storage.url, engine_kwargs=engine_options(storage.url)), "open the Optuna storage")
        tune_sqlite(self.optuna_storage.engine)
        self._studies: dict[str, Any] = {}
        #: Names of the studies in ``_studies`` known to be described (their user attributes set).
        self._described: set[str] = set()
        #: Units committed and told to Optuna whose ``told`` mark is written once per round of completions.
        self._told_pending: list[int] = []
        self.reference_hash = zoo.get(config.reference_cell).hash
        self.policy = PopulationPolicy(config.selection, config.population_size, config.tournament_size)
        self.stop_mode: str | None = None
        # a second Ctrl-C or SIGTERM during a database outage stops at once, not after storage_retry_s
        storage.give_up = lambda: self.stop_mode == "abandon"
        #: Set when low free space stopped the search; raised once the running units have committed.
        self._storage_stop: StorageError | None = None
        self._ready: deque[int] = deque()
        self._in_flight: set[int] = set()
        self._unit_step: dict[int, int] = {}
        self._unit_specs: dict[int, UnitSpec] = {}
        self._unit_submissions: dict[int, int] = {}
        self._rung_steps: dict[str, int] = {}
        #: Hash -> name of the run's initial cells (their studies are named after them: see study_name).
        self._initial_names = {zoo.get(name).hash: name for name in config.initial_cells}
        self.progress = Progress()

    # -- public -------------------------------------------------------------------------------------------------

    def request_stop(self, mode: str) -> None:
        """``drain``: start nothing new, let running units finish; ``abandon``: stop now (units re-run on resume)."""
        if mode == "abandon" or self.stop_mode is None:
            self.stop_mode = mode

    def run(self) -> Progress:
        """Drive the search until its length is reached or a stop is requested.

        Raises :class:`~cellsearch.search.storage.StorageError` when the database stopped it (low free
        space after draining, a failed write or an unreachable database at once); committed work is intact.
        """
        try:
            progress = self._run()
        except StorageError:
            self.stop_mode = "abandon"
            raise
        if self._storage_stop is not None:
            raise self._storage_stop
        return progress

    def _run(self) -> Progress:
        self._started = time.monotonic()
        # Read every task (and put its data in the object store) before the loop, not mid-search.
        for name in self.config.all_tasks:
            self._task(name)
        if hasattr(self.executor, "prepare"):
            self.executor.prepare(self.config.all_tasks)
        self._rebuild()
        self._create_seed_steps()
        for step in sorted(self._active):
            self._advance(self._active[step])
        limit = self._max_in_flight()
        loop_started = time.monotonic()
        waited = 0.0
        try:
            while True:
                self._check_free_space()
                if self.stop_mode is None:
                    self._start_steps(limit)
                if self.stop_mode == "abandon":
                    break
                if self.stop_mode is None:
                    self._dispatch(limit)
                if not self._in_flight:
                    if self.stop_mode is not None or (not self._ready and not self._can_start_step()):
                        break
                    if not self._ready:
                        continue
                wait_started = time.monotonic()
                completions = self.executor.wait(timeout=0.5)
                waited += time.monotonic() - wait_started
                for completion in completions:
                    self._complete(completion)
                if self._told_pending:
                    self.storage.mark_told_many(self._told_pending)
                    self._told_pending.clear()
                self._report()
            if self._told_pending:  # units completed at once while planning (nothing to train)
                self.storage.mark_told_many(self._told_pending)
                self._told_pending.clear()
        finally:
            self.progress.driver_seconds = time.monotonic() - loop_started - waited
            self._report()
        return self.progress

    # -- rebuilding state from storage --------------------------------------------------------------------------

    def _rebuild(self) -> None:
        from cellsearch.dedup import Deduplicator

        cells = self.storage.cells()
        # the working set (see cellsearch.search.working_set): a few populations' worth of descriptions, and the
        # scores of the cells in use, read on demand; the duplicate index alone sees every cell
        self._cells = CellCache(self.storage, capacity=working_set_capacity(self.config))
        self.cell_count = len(cells)
        self._rename_legacy_studies()
        self._dedup = Deduplicator.from_specs(
            CellSpec.from_dict(json.loads(row["spec_json"])) for row in cells if row["rejected_by"] != "duplicate")
        members = {row["hash"] for row in cells if row["status"] == "population"}
        del cells  # every row's description: the rebuild's peak, not the run's
        self._population = {h: s for h, s in self.storage.population_entries().items() if h in members}
        self._best = BestScores(self.storage)
        counts = self.storage.counts()
        self.progress.units_done = counts["units_done"]
        self.progress.evaluations = counts["evaluations"]
        self.progress.cells_evaluated = counts["cells_evaluated"]
        self.progress.steps_done = counts["search_steps_done"]
        self._steps_started = counts["search_steps"]
        self._tell_committed_units()
        self._active: dict[int, _ActiveStep] = {}
        for row in self.storage.active_steps():
            active = _ActiveStep(row["step"], row["kind"], row["cell_hash"], row["parent_hash"], row["stage"])
            for unit in self.storage.units_of_step(row["step"]):
                active.units[unit["unit_id"]] = {"stage": unit["stage"], "task": unit["task"],
                                                 "cell_hash": unit["cell_hash"],
                                                 "status": unit["status"],
                                                 "settings": json.loads(unit["settings_json"])}
            self._active[active.step] = active
        for cell_hash in sorted({active.cell_hash for active in self._active.values()}
                                | {u["cell_hash"] for active in self._active.values() for u in active.units.values()}):
            self._close_unrecorded_trials(cell_hash, self.config.all_tasks)
        # in creation order (unit ids), which is the order the interrupted driver queued them in: a resumed search
        # trains them in the same order, so the same results arrive in the same order
        pending = sorted((unit_id, active.step) for active in self._active.values()
                         for unit_id, unit in active.units.items() if unit["status"] == "pending")
        for unit_id, step in pending:
            active = self._active[step]
            self._enqueue(active, unit_id, active.units[unit_id])
        self._promotions = dict(self.storage.promotions()) if self.config.promotion.enabled else {}
        # the cells' best scores at the promotion rung, read off a cell's learning curves when it is used
        self._rung_best = CellScores(self._read_rung_scores)
        if self.config.promotion.enabled:
            measured = [d for d in self._promotions.values() if d["step"] not in self._initial_steps()]
            self.progress.rung_measured = len(measured)
            self.progress.promoted = sum(bool(d["promoted"]) for d in measured)
        if self.config.filter_promotion.enabled:
            # the filter-promotion study is the record of those decisions (one finished trial per candidate)
            from optuna.trial import TrialState

            names = self.storage.retry(lambda: self._optuna.get_all_study_names(self.optuna_storage),
                                       "list the Optuna studies")
            trials = [] if FILTER_PROMOTION_STUDY not in names else self.storage.retry(
                lambda: self._optuna.load_study(study_name=FILTER_PROMOTION_STUDY, storage=self.optuna_storage)
                .get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                "read the filter-promotion decisions")
            self.progress.filter_rung_measured = len(trials)
            self.progress.filter_promoted = sum(trial.state == TrialState.COMPLETE for trial in trials)
        self._confirming = {row["cell_hash"] for row in self.storage.steps_of_kind("confirm")}
        confirmations = [row for row in self.storage.steps_of_kind("confirm") if row["status"] == "done"]
        self.progress.confirmed = sum(row["outcome"] == "confirmed" for row in confirmations)
        for row in self.storage.steps_of_kind("mutate"):
            outcome = row["outcome"] or ""
            self.progress.beat_reference += outcome.endswith((":confirm", ":above_reference"))
            if outcome.endswith(":confirm") and row["cell_hash"] not in self._confirming:
                self._start_confirmation(row["cell_hash"], advance=False)  # the loop advances every active step

    def _rename_legacy_studies(self) -> None:
        """A run made before study names were readable (``<64-digit hash>/<task>``) gets the readable names, once
        (one transaction, under the run's lock: no other driver is using the studies)."""
        renames = {}
        for name in self.storage.retry(lambda: self._optuna.get_all_study_names(self.optuna_storage),
                                       "read the study names"):
            legacy = _LEGACY_STUDY_NAME.match(name)
            if legacy is not None:
                renames[name] = self._study_name(legacy.group(1), legacy.group(2))
        if renames:
            self.storage.rename_optuna_studies(renames)
            self._log(f"renamed {len(renames)} Optuna studies to readable names (<cell name or short hash>/<task>)")

    def _check_free_space(self) -> None:
        """Below ``min_free_space_mb`` on the database's disk: start nothing new, let running units commit."""
        threshold_mb = self.config.min_free_space_mb
        if not threshold_mb or self._storage_stop is not None:
            return
        free = self.storage.free_bytes()
        if free is None or free >= threshold_mb * 1e6:
            return
        where = self.storage.database_directory()
        self._log(f"free space on {where} is {free / 1e6:.1f} MB (min_free_space_mb: {threshold_mb:g}): starting "
                  f"nothing new, finishing the {len(self._in_flight)} running units")
        self._storage_stop = StorageFull(
            f"free space on {where} is {free / 1e6:.1f} MB, below min_free_space_mb = {threshold_mb:g} MB; the "
            f"running units were committed; committed work is safe")
        self.request_stop("drain")

    def _tell_committed_units(self) -> None:
        """Optuna learns the results of units committed just before a crash."""
        for unit in self.storage.untold_units():
            study = self._study(unit["cell_hash"], unit["task"])
            for evaluation in self.storage.evaluations_of_unit(unit["unit_id"]):
                self._tell(study, evaluation)
            self.storage.mark_told(unit["unit_id"])

    def _close_unrecorded_trials(self, cell_hash: str, tasks: tuple[str, ...]) -> None:
        """Trials of ``cell_hash`` asked but never recorded in a unit (a crash, or a failed attempt to plan a
        stage): close them as FAIL. Their settings stay seen, so they are never trained; the stage is re-planned.
        """
        from optuna.trial import TrialState

        referenced: dict[str, set[int]] = {}
        for other in self._active.values():
            for unit in other.units.values():
                if unit["cell_hash"] != cell_hash:
                    continue
                referenced.setdefault(unit["task"], set()).update(s["trial_number"] for s in unit["settings"])
        for task in tasks:
            name = self._study_name(cell_hash, task)
            try:
                study = self._study(cell_hash, task, create=False)
            except KeyError:
                continue
            running = self.storage.retry(lambda: study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                                         f"read the trials of {name}")
            for trial in running:
                if trial.number not in referenced.get(task, set()):
                    self._log(f"closing trial {trial.number} of {name}: asked but never recorded in a unit")
                    self.storage.retry(lambda: study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True),
                                       f"close trial {trial.number} of {name}")

    # -- steps --------------------------------------------------------------------------------------------------

    def _create_seed_steps(self) -> None:
        """The first steps of a run, one per initial cell (those a crash kept from being recorded)."""
        for step in range(self.storage.counter("next_step"), len(self.config.initial_cells)):
            name = self.config.initial_cells[step]
            spec = zoo.get(name)
            self._dedup.add(spec)
            self.storage.start_step(step, "seed", spec.hash, None, self._cell_row(spec, step, name=name))
            self._cells.put(spec.hash, spec.to_json(), None)
            self.cell_count += 1
            self._active[step] = _ActiveStep(step, "seed", spec.hash, None, 0)

    def _cell_row(self, spec: CellSpec, step: int, name: str | None = None, parent: str | None = None,
                  mutation: Mapping[str, Any] | None = None, status: str = "evaluating",
                  rejected_by: str | None = None, duplicate_of: str | None = None) -> dict[str, Any]:
        return {"hash": spec.hash, "name": name or spec.name, "spec_json": spec.to_json(), "parent_hash": parent,
                "mutation_json": json.dumps(mutation, default=str) if mutation is not None else None,
                "step_created": step, "node_count": len(spec.nodes),
                "params_per_width": spec.parameter_count(PARAMETER_WIDTH) / PARAMETER_WIDTH ** 2, "status": status,
                "rejected_by": rejected_by, "duplicate_of": duplicate_of}

    def _seeds_done(self) -> bool:
        return not any(active.kind == "seed" for active in self._active.values())

    def _can_start_step(self) -> bool:
        config = self.config
        if self.stop_mode is not None or not self._seeds_done() or not self._population:
            return False
        if config.max_steps is not None and self._steps_started >= config.max_steps:
            return False
        if config.max_evaluations is not None and self.progress.evaluations >= config.max_evaluations:
            return False
        if config.max_wall_clock_s is not None and time.monotonic() - self._started >= config.max_wall_clock_s:
            return False
        return True

    def _start_steps(self, limit: int) -> None:
        # Bounded per call so that a run of duplicate candidates cannot starve the completion loop.
        for _ in range(4 * limit):
            if len(self._in_flight) + len(self._ready) >= limit or not self._can_start_step():
                return
            self._start_step()

    def _start_step(self) -> None:
        from cellsearch.config import from_mapping
        from cellsearch.mutation import MutationConfig, MutationError, mutate

        step = self.storage.counter("next_step")
        rng = seeds.generator(self.config.seed, seeds.STEP_STREAM, step)
        self._steps_started += 1
        if rng.random() < self.config.reevaluate_probability:
            member = self._select(rng)
            self.storage.start_step(step, "reevaluate", member, None, None)
            active = _ActiveStep(step, "reevaluate", member, None, 0)
            self._active[step] = active
            self._advance(active)
            return
        parent_hash = self._select(rng)
        parent = self._spec(parent_hash)
        mutation_config = from_mapping(MutationConfig, dict(self.config.mutation))
        try:
            mutation = mutate(parent, rng, mutation_config)
        except (CellSpecError, MutationError) as error:
            self._log(f"step {step}: mutation of {parent_hash[:12]} failed ({error})")
            self.storage.start_step(step, "mutate", parent_hash, parent_hash, None, finished_outcome="mutation_failed")
            self.progress.steps_done += 1
            return
        child = mutation.child
        record = mutation.to_dict()
        check = self._dedup.check(child)
        if not check.is_new:
            new_cell = None
            if not self._cells.known(child.hash):
                new_cell = self._cell_row(child, step, parent=parent_hash, mutation=record, status="rejected",
                                          rejected_by="duplicate", duplicate_of=check.match)
            self.storage.start_step(step, "mutate", child.hash, parent_hash, new_cell,
                                    finished_outcome=f"duplicate:{check.kind}")
            if new_cell is not None:
                self._cells.put(child.hash, new_cell["spec_json"], parent_hash)
                self.cell_count += 1
            self.progress.steps_done += 1
            return
        self._dedup.add(child)
        row = self._cell_row(child, step, parent=parent_hash, mutation=record)
        self.storage.start_step(step, "mutate", child.hash, parent_hash, row)
        self._cells.put(child.hash, row["spec_json"], parent_hash)
        self.cell_count += 1
        active = _ActiveStep(step, "mutate", child.hash, parent_hash, 0)
        self._active[step] = active
        self._advance(active)

    def _members(self) -> list[str]:
        return sorted(self._population)

    def _score(self, cell_hash: str) -> float:
        return score_of(self._best, cell_hash, self.reference_hash, self.config.tasks)

    def _select(self, rng: np.random.Generator) -> str:
        """A parent (or a member to re-evaluate), as the population policy chooses."""
        return self.policy.select(self._members(), self._score, rng)

    def _spec(self, cell_hash: str) -> CellSpec:
        return CellSpec.from_dict(json.loads(self._cells.spec_json(cell_hash)))

    # -- stages and units ---------------------------------------------------------------------------------------

    def _advance(self, active: _ActiveStep) -> None:
        """Do the next thing for a step: plan its current stage, or pass its gate when the stage is done."""
        stages = stages_for(active.kind, self.config)
        while True:
            units = [u for u in active.units.values() if u["stage"] == active.stage]
            if not units:
                self._plan_stage(active, stages[active.stage])
                units = [u for u in active.units.values() if u["stage"] == active.stage]
            if any(u["status"] == "pending" for u in units):
                return
            stage = stages[active.stage]
            failed = self._gate(active, stage)
            if failed is not None:
                self._finish(active, rejected_by=failed)
                return
            if active.stage + 1 == len(stages):
                self._finish(active, rejected_by=None)
                return
            active.stage += 1
            self.storage.set_stage(active.step, active.stage)

    def _plan_stage(self, active: _ActiveStep, stage: Stage) -> None:
        """Ask Optuna for the stage's settings, record its units (one transaction), queue them."""
        from cellsearch.hparams import make_sampler, sample_settings

        if active.kind == "confirm":
            self._plan_confirmation(active, stage)
            return
        if active.kind == "mutate" and ((stage.gate == "ratio" and self.config.promotion.enabled)
                                        or (stage.gate == "memorize" and self.config.filter_promotion.enabled)):
            self._plan_promoted(active, stage)
            return

        rows = []
        for task_name in stage.tasks:
            task_index = self.config.all_tasks.index(task_name)
            sampler_seed = seeds.derived_seed(self.config.seed, seeds.SAMPLER_STREAM, active.step, active.stage,
                                              task_index)
            space = self._task(task_name).space_for(self.config.budget_profile)

            def sample(task_name=task_name, sampler_seed=sampler_seed, space=space):
                study = self._study(active.cell_hash, task_name,
                                    sampler=make_sampler(self.config.sampler, sampler_seed))
                if active.kind == "mutate" and stage.gate in ("ratio", "promote") and self.config.seed_from_parent:
                    self._enqueue_parent_settings(study, active.parent_hash, task_name)
                return sample_settings(study, space, stage.settings)

            # A failed attempt may leave asked trials RUNNING (ask committed, acknowledgement lost): they are
            # closed before the retry, so no trial stays RUNNING and none is recorded twice.
            pairs = self.storage.retry(
                sample, f"sample settings for {self._study_name(active.cell_hash, task_name)}",
                before_retry=lambda task_name=task_name: self._close_unrecorded_trials(active.cell_hash, (task_name,)))
            settings = [SettingSpec(trial.number, setting.to_dict(),
                                    seeds.derived_seed(self.config.seed, seeds.TRAIN_STREAM,
                                                       seeds.hash_key(active.cell_hash), task_index, trial.number))
                        for trial, setting in pairs]
            if self.config.batching.enabled:
                # same-shape settings side by side, so that a unit's settings can train as one batched model
                # (layers, parameter budget and dropout fix the width for one cell and task)
                settings.sort(key=lambda s: (s.hparams["num_layers"], s.hparams["parameter_budget"],
                                             s.hparams["dropout"]))
            group = self.config.settings_per_unit
            groups = [settings[i:i + group] for i in range(0, len(settings), group)] or [[]]
            for slot, chunk in enumerate(groups):
                rows.append({"step": active.step, "stage": active.stage, "cell_hash": active.cell_hash,
                             "task": task_name, "slot": slot,
                             "settings_json": json.dumps([s.to_dict() for s in chunk])})
        self._record_units(active, rows)

    def _record_units(self, active: _ActiveStep, rows: list[dict[str, Any]]) -> None:
        """Record a stage's units (one transaction) and queue them; a unit without settings is done at once."""
        ids = self.storage.add_units(rows)
        for unit_id, row in zip(ids, rows):
            unit = {"stage": row["stage"], "task": row["task"], "cell_hash": row["cell_hash"], "status": "pending",
                    "settings": json.loads(row["settings_json"])}
            active.units[unit_id] = unit
            if not unit["settings"]:
                # The space is used up for this cell and task: nothing to train, the unit is done at once.
                self._complete(Completion(unit_id, [], {}), active=active, advance=False)
            else:
                self._enqueue(active, unit_id, unit)

    def _plan_confirmation(self, active: _ActiveStep, stage: Stage) -> None:
        """A confirm step's units: per task, the candidate's best setting and the reference's best setting, each on
        the same ``confirm_seeds`` fresh seeds (seed i shared by both: the pairs). Each run is a new Optuna trial
        with the best trial's parameters (enqueued), marked with the user attribute ``confirmation_of``."""
        rows = []
        for task_name in stage.tasks:
            task_index = self.config.all_tasks.index(task_name)
            shared_seeds = [seeds.derived_seed(self.config.seed, seeds.CONFIRM_STREAM, active.step, task_index, i)
                            for i in range(stage.settings)]
            space = self._task(task_name).space_for(self.config.budget_profile)
            slot = 0
            for cell_hash in (active.cell_hash, self.reference_hash):
                def ask(cell_hash=cell_hash, task_name=task_name, space=space):
                    study = self._study(cell_hash, task_name)
                    best = _best_complete_trial(study)
                    if best is None:
                        return []
                    asked = []
                    for _ in shared_seeds:
                        study.enqueue_trial(dict(best.params))
                        trial = study.ask(space.distributions())
                        trial.set_user_attr("confirmation_of", best.number)
                        asked.append(trial)
                    return asked

                trials = self.storage.retry(
                    ask, f"ask confirmation trials for {self._study_name(cell_hash, task_name)}",
                    before_retry=lambda c=cell_hash, t=task_name: self._close_unrecorded_trials(c, (t,)))
                settings = [SettingSpec(trial.number, space.from_params(trial.params).to_dict(), seed)
                            for trial, seed in zip(trials, shared_seeds)]
                group = self.config.settings_per_unit
                for chunk in [settings[i:i + group] for i in range(0, len(settings), group)] or [[]]:
                    rows.append({"step": active.step, "stage": active.stage, "cell_hash": cell_hash,
                                 "task": task_name, "slot": slot,
                                 "settings_json": json.dumps([s.to_dict() for s in chunk])})
                    slot += 1
        self._record_units(active, rows)

    def _plan_promoted(self, active: _ActiveStep, stage: Stage) -> None:
        """A promoted candidate's full-budget stage: the settings its rung stage trained, on the same seeds, as new
        trials (enqueued with the rung trial's parameters, user attribute ``promoted_from``), trained from the
        start: the rung run was a prefix of each. Settings that failed at the rung are not trained again."""
        rows = []
        for task_name in stage.tasks:
            # a setting that failed at the rung (diverged, out of memory, an error) would fail the same way again:
            # its result (score 0) stands
            failed = {row["trial_number"] for unit_id, unit in active.units.items()
                      if unit["task"] == task_name and self._is_rung(active, unit)
                      for row in self.storage.evaluations_of_unit(unit_id) if row["status"] in _FAILED}
            rung_settings = [setting for unit_id, unit in sorted(active.units.items())
                             if unit["task"] == task_name and self._is_rung(active, unit)
                             for setting in unit["settings"] if setting["trial_number"] not in failed]
            space = self._task(task_name).space_for(self.config.budget_profile)

            def ask(task_name=task_name, space=space, rung_settings=rung_settings):
                study = self._study(active.cell_hash, task_name)
                asked = []
                for setting in rung_settings:
                    study.enqueue_trial({name: setting["hparams"][name] for name in space.names()})
                    trial = study.ask(space.distributions())
                    trial.set_user_attr("promoted_from", setting["trial_number"])
                    asked.append(trial)
                return asked

            trials = self.storage.retry(
                ask, f"ask the promoted trials of {self._study_name(active.cell_hash, task_name)}",
                before_retry=lambda t=task_name: self._close_unrecorded_trials(active.cell_hash, (t,)))
            settings = [SettingSpec(trial.number, space.from_params(trial.params).to_dict(), setting["seed"])
                        for trial, setting in zip(trials, rung_settings)]
            group = self.config.settings_per_unit
            for slot, chunk in enumerate([settings[i:i + group] for i in range(0, len(settings), group)] or [[]]):
                rows.append({"step": active.step, "stage": active.stage, "cell_hash": active.cell_hash,
                             "task": task_name, "slot": slot,
                             "settings_json": json.dumps([s.to_dict() for s in chunk])})
        self._record_units(active, rows)

    def _start_confirmation(self, cell_hash: str, advance: bool = True) -> None:
        """Start the confirm step of a candidate that scored above 1 (see :mod:`cellsearch.search.confirmation`)."""
        step = self.storage.counter("next_step")
        self.storage.start_step(step, "confirm", cell_hash, None, None)
        active = _ActiveStep(step, "confirm", cell_hash, None, 0)
        self._active[step] = active
        self._confirming.add(cell_hash)
        self._log(f"step {step}: confirming {cell_hash[:12]} (score {self._score(cell_hash):.4f}) on "
                  f"{self.config.confirm_seeds} fresh seeds shared with {self.config.reference_cell}")
        if advance:
            self._advance(active)

    def _confirmation(self, active: _ActiveStep) -> Confirmation:
        rows = [row for unit_id in sorted(active.units) for row in self.storage.evaluations_of_unit(unit_id)]
        return confirm(pairs_by_task(rows, active.cell_hash, self.reference_hash), self.config.tasks)

    def _enqueue_parent_settings(self, study, parent_hash: str | None, task: str) -> None:
        from optuna.trial import TrialState

        if parent_hash is None:
            return
        try:
            parent_study = self._study(parent_hash, task, create=False)
        except KeyError:
            return
        trials = [t for t in parent_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.value is not None]
        trials.sort(key=lambda t: (-t.value, t.number))
        for trial in trials[: self.config.seed_from_parent]:
            study.enqueue_trial(dict(trial.params), skip_if_exists=True)

    def _enqueue(self, active: _ActiveStep, unit_id: int, unit: Mapping[str, Any]) -> None:
        resources = self.config.resources
        rung = self._is_rung(active, unit)
        self._unit_specs[unit_id] = UnitSpec(
            unit_id=unit_id, cell=json.loads(self._cells.spec_json(unit["cell_hash"])), task=unit["task"],
            budget_profile=self.config.budget_profile,
            settings=tuple(SettingSpec.from_dict(s) for s in unit["settings"]), device=self.config.device,
            num_threads=max(1, int(resources.num_cpus)), batching=self.config.batching.to_dict(),
            # a rung unit trains to the promotion rung only: the profile's budget capped there
            budget=self._rung_budget(unit["task"]).to_dict() if rung else None,
            # a confirm step's settings are one setting on several seeds: nothing to rank; a rung unit is too short
            halving=self.config.fidelity.to_dict() if self.config.fidelity.enabled and active.kind != "confirm"
            and not rung else None)
        self._unit_step[unit_id] = active.step
        self._ready.append(unit_id)

    def _dispatch(self, limit: int) -> None:
        while self._ready and len(self._in_flight) < limit:
            unit_id = self._ready.popleft()
            self.executor.submit(self._unit_specs[unit_id])
            self._in_flight.add(unit_id)
            self._unit_submissions[unit_id] = self._unit_submissions.get(unit_id, 0) + 1
        self.progress.in_flight = len(self._in_flight)

    def _complete(self, completion: Completion, active: _ActiveStep | None = None, advance: bool = True) -> None:
        """Commit a finished unit (one transaction), tell Optuna, and move its step on."""
        unit_id = completion.unit_id
        self._in_flight.discard(unit_id)
        active = active or self._active[self._unit_step[unit_id]]
        unit = active.units[unit_id]
        if completion.results is None and completion.system_failure:
            if self.stop_mode is None and self._unit_submissions.get(unit_id, 0) <= _RESUBMISSIONS:
                self._log(f"unit {unit_id} lost ({completion.error}); submitting it again")
                self._ready.appendleft(unit_id)
            elif self.stop_mode is None:
                # an infrastructure failure is never a result: the unit stays pending (a resume runs it), and the
                # search stops rather than go on around the gap (a lost seed step would never start the population)
                self._log(f"unit {unit_id} lost {self._unit_submissions.get(unit_id, 0)} times ({completion.error}); "
                          f"it stays pending for `cellsearch resume`; stopping after the running units")
                self.request_stop("drain")
            return
        if completion.results is None:
            self._log(f"unit {unit_id} ({unit['cell_hash'][:12]} on {unit['task']}) failed; its settings score 0:\n"
                      f"{completion.error}")
        rows = []
        rung = self._is_rung(active, unit)
        for index, setting in enumerate(unit["settings"]):
            result = completion.results[index] if completion.results is not None else None
            rows.append(self._evaluation_row(setting, result, completion, rung=rung))
        self.storage.commit_unit(unit_id, active.step, unit["cell_hash"], unit["task"], rows)
        unit["status"] = "done"
        study = self._study(unit["cell_hash"], unit["task"])
        for row in rows:
            self._tell(study, row)
            if row["status"] not in PARTIAL_STATUSES:  # a partial score (pruned, rung) is not the cell's best
                self._best.record(unit["cell_hash"], unit["task"], row["score"])
            if self.config.promotion.enabled:
                self._note_rung_value(unit["cell_hash"], unit["task"], row)
        # marked told once per round of completions (_run): one transaction for the round, not one per unit
        self._told_pending.append(unit_id)
        self._unit_specs.pop(unit_id, None)
        self._unit_step.pop(unit_id, None)
        self._unit_submissions.pop(unit_id, None)
        self.progress.units_done += 1
        self.progress.session_units += 1
        self.progress.evaluations += len(rows)
        if advance:
            self._advance(active)
            cell = unit["cell_hash"]
            if active.step not in self._active and cell not in self._population and cell != self.reference_hash \
                    and not any(other.cell_hash == cell for other in self._active.values()):
                # the step is over and the cell is not a member: its studies (and Optuna's cache of their trials)
                # leave memory; a later use (a parent's best settings) loads them again
                for task in self.config.all_tasks:
                    name = self._study_name(cell, task)
                    self._studies.pop(name, None)
                    self._described.discard(name)

    def _evaluation_row(self, setting: Mapping[str, Any], result: Mapping[str, Any] | None,
                        completion: Completion, rung: bool = False) -> dict[str, Any]:
        worker = completion.worker or {}
        row = {"trial_number": setting["trial_number"], "params_json": json.dumps(setting["hparams"]),
               "seed": setting["seed"], "node_id": worker.get("node_id"), "worker_pid": worker.get("worker_pid"),
               "hostname": worker.get("hostname")}
        if result is None:
            return {**row, "score": 0.0, "status": "error", "duration_s": None, "train_steps": None, "epochs": None,
                    "metrics_json": json.dumps({"error": (completion.error or "")[-2000:]}), "curve_json": None}
        score = float(result.get("score", 0.0))
        status = str(result.get("status", "ok"))
        if rung and status not in _FAILED:
            status = "rung"  # trained to the promotion rung only: a partial score, like a pruned setting's
        return {**row, "score": score if math.isfinite(score) else 0.0, "status": status,
                "duration_s": result.get("duration_s"), "train_steps": result.get("steps"),
                "epochs": result.get("epochs"), "metrics_json": json.dumps(result.get("metrics", {}), default=float),
                "curve_json": json.dumps(result.get("curve"), default=float)}

    def _tell(self, study, evaluation: Mapping[str, Any]) -> None:
        """Tell Optuna one trained setting (an evaluation row), as optuna-dashboard users expect: COMPLETE with its
        score (ok, timeout), FAIL (diverged, oom, error), PRUNED (successive halving, or trained to the promotion
        rung only, with its learning curve); user attributes ``status``
        and, for a perplexity task, ``perplexity``; with successive halving on, the learning curve as intermediate
        values. One retried operation; a trial already finished (told before a crash, or by an attempt whose
        acknowledgement was lost) is left alone."""
        from optuna.trial import TrialState

        trial_number, status, score = evaluation["trial_number"], evaluation["status"], float(evaluation["score"])
        name = study.study_name
        storage = self.optuna_storage
        curve = json.loads(evaluation.get("curve_json") or "[]") \
            if self.config.fidelity.enabled or status == "rung" else []
        perplexity = self._task(name.rpartition("/")[2]).metric == "inverse_perplexity"

        def tell() -> None:
            # the study's own (cached) storage knows the ids of the trials it asked; the state is read from the
            # database (a trial told before a crash, or by an attempt whose acknowledgement was lost, is finished)
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
            if self.storage.optuna_trial_state(trial_id) != TrialState.RUNNING.name:
                return
            for point in curve:
                value = float(point.get("score", math.nan))
                if math.isfinite(value):
                    storage.set_trial_intermediate_value(trial_id, int(point["step"]), value)
            attributes = {"status": status}
            if perplexity and score > 0:
                attributes["perplexity"] = 1.0 / score
            self.storage.set_optuna_trial_attributes(trial_id, attributes)  # one transaction, not one per key
            if status in _FAILED:
                study.tell(trial_number, state=TrialState.FAIL, skip_if_finished=True)
            elif status in PARTIAL_STATUSES:
                study.tell(trial_number, state=TrialState.PRUNED, skip_if_finished=True)
            else:
                study.tell(trial_number, score, skip_if_finished=True)

        self.storage.retry(tell, f"tell trial {trial_number} of {name}")

    # -- gates and outcomes -------------------------------------------------------------------------------------

    def _gate(self, active: _ActiveStep, stage: Stage) -> str | None:
        """None when the step may go on; otherwise the name of the filter that stopped it."""
        if stage.gate == "memorize":
            task = stage.tasks[0]
            if self._best.get((active.cell_hash, task), 0.0) < self.config.memorize_threshold:
                return task
        elif stage.gate == "promote":
            return None if self._promotion(active)["promoted"] else "promotion"
        elif stage.gate == "filter_promote":
            return None if self._filter_promotion(active) else "filter_promotion"
        elif stage.gate == "ratio":
            task = stage.tasks[0]
            reference = self._best.get((self.reference_hash, task), 0.0)
            if self._best.get((active.cell_hash, task), 0.0) < self.config.early_stop_fraction * reference:
                return task
        return None

    def _finish(self, active: _ActiveStep, rejected_by: str | None) -> None:
        cell = active.cell_hash
        updates: dict[str, dict[str, Any]] = {}
        changes: list[tuple[str, str, float | None]] = []
        if active.kind == "seed":
            outcome = "seeded"
            updates[cell] = {"status": "population"}
            changes.append((cell, "enter", self._score(cell)))
        elif active.kind == "reevaluate":
            outcome = "reevaluated"
        elif active.kind == "confirm":
            confirmation = self._confirmation(active)
            outcome = "confirmed" if confirmation.confirmed else "not_confirmed"
            self.progress.confirmed += confirmation.confirmed
            self._log(f"step {active.step}: {cell[:12]} {confirmation.summary()}")
        elif rejected_by is not None:
            outcome = f"rejected:{rejected_by}"
            updates[cell] = {"status": "rejected", "rejected_by": rejected_by}
        else:
            outcome, updates, changes = self._admit(active, cell)
            if self._score(cell) > 1:
                # recorded with the outcome: the count survives a resume, and a driver killed before the confirm
                # step started starts it on resume
                self.progress.beat_reference += 1
                outcome += ":confirm" if self.config.confirm_seeds else ":above_reference"
        self.storage.finish_step(active.step, outcome, updates, changes)
        for cell_hash, action, _ in changes:
            if action == "enter":
                self._population[cell_hash] = active.step
            else:
                self._population.pop(cell_hash, None)
        if active.kind not in ("reevaluate", "confirm"):
            self.progress.cells_evaluated += 1
        if active.kind not in ("seed", "confirm"):
            self.progress.steps_done += 1
        del self._active[active.step]
        in_use = self._cells_in_use()
        self._best.retain(in_use)
        self._rung_best.retain(in_use)
        if outcome.endswith(":confirm"):
            self._start_confirmation(cell)

    def _cells_in_use(self) -> set[str]:
        """The cells whose scores (best, and at the promotion rung) the driver keeps: the population, the active
        steps' and the reference."""
        return {*self._population, self.reference_hash, *(active.cell_hash for active in self._active.values())}

    def _admit(self, active: _ActiveStep, cell: str):
        """A candidate that passed every filter: does it enter the population, and who leaves?"""
        score = self._score(cell)
        admission = self.policy.admit(score, self._population, self._score)
        if not admission.enters:
            return "evaluated", {cell: {"status": "evaluated"}}, []
        updates = {cell: {"status": "population"}}
        changes = [(cell, "enter", score)]
        if admission.leaving is not None:
            updates[admission.leaving] = {"status": "evaluated"}
            changes.append((admission.leaving, "leave", self._score(admission.leaving)))
        return "entered", updates, changes

    # -- promotion across candidates -----------------------------------------------------------------------------

    def _is_rung(self, active: _ActiveStep, unit: Mapping[str, Any]) -> bool:
        return stages_for(active.kind, self.config)[unit["stage"]].rung

    def _rung_step(self, task: str) -> int:
        """The promotion rung of ``task``: ``promotion.fraction`` (``filter_promotion.fraction`` for the filter task)
        of the profile budget's planned steps, rounded up to whole epochs (:func:`cellsearch.fidelity.rung_steps`'s
        first rung)."""
        if task not in self._rung_steps:
            from cellsearch.fidelity import HalvingConfig
            from cellsearch.training.halving import unit_rungs

            budget = self._task(task).budget(self.config.budget_profile)
            fraction = self.config.filter_promotion.fraction if task == self.config.memorize_task \
                else self.config.promotion.fraction
            config = HalvingConfig(enabled=True, eta=2, min_fraction=fraction)
            self._rung_steps[task] = unit_rungs(self._task(task), budget, config)[0]
        return self._rung_steps[task]

    def _rung_budget(self, task: str):
        return self._task(task).budget(self.config.budget_profile).replace(max_steps=self._rung_step(task))

    def _rung_value(self, task: str, row: Mapping[str, Any]) -> float:
        """One evaluation's value at the rung: a rung evaluation's score, or a longer run's best at the rung read
        off its learning curve (a failed one counts 0, as for the best); NaN for a task outside the score."""
        if task not in self.config.tasks:
            return math.nan
        if row["status"] == "rung" or row["status"] in _FAILED:
            return float(row["score"])
        return best_until(json.loads(row.get("curve_json") or "[]"), self._rung_step(task))

    def _note_rung_value(self, cell_hash: str, task: str, row: Mapping[str, Any]) -> None:
        """Fold one evaluation, just committed, into the cell's best at the rung."""
        value = self._rung_value(task, row)
        if math.isfinite(value):
            self._rung_best.record(cell_hash, task, value)

    def _read_rung_scores(self, cell_hash: str) -> dict[tuple[str, str], float]:
        """The cell's best at the rung per task, from its committed evaluations (``CellScores``' read)."""
        scores: dict[tuple[str, str], float] = {}
        for row in self.storage.learning_curves(cell_hash):
            value = self._rung_value(row["task"], row)
            if math.isfinite(value):
                key = (cell_hash, row["task"])
                scores[key] = max(scores.get(key, -math.inf), value)
        return scores

    def _rung_score(self, cell_hash: str) -> float:
        """The cell's score at the rung: its worst ratio to the reference's best at the rung."""
        return score_of(self._rung_best, cell_hash, self.reference_hash, self.config.tasks)

    def _initial_steps(self) -> set[int]:
        return set(range(len(self.config.initial_cells)))

    def _promotion(self, active: _ActiveStep) -> Mapping[str, Any]:
        """The step's promotion decision: recorded, or asked of the ``promotion`` study now and recorded."""
        decision = self._promotions.get(active.step)
        if decision is None:
            promotion = self.config.promotion
            if promotion.initial_cells_compete:
                # their full runs read at the rung (once, when the first candidate reaches the rung: every seed step
                # is done by then)
                for step, name in enumerate(self.config.initial_cells):
                    if step not in self._promotions:
                        self._decide_promotion(step, zoo.get(name).hash, initial=True)
            # decisions are recorded, so a resumed driver counts the same candidates before this one
            earlier = sum(1 for step in self._promotions if step not in self._initial_steps())
            decision = self._decide_promotion(active.step, active.cell_hash, grace=earlier < promotion.grace)
            self.progress.rung_measured += 1
            self.progress.promoted += bool(decision["promoted"])
            rule = (f"one of the first {promotion.grace} candidates measured there, promoted whatever its score"
                    if earlier < promotion.grace else
                    f"top 1/{promotion.eta} of the candidates measured there go on")
            self._log(f"step {active.step}: {active.cell_hash[:12]} scored {decision['score']:.4f} at the rung: "
                      f"{'promoted' if decision['promoted'] else 'not promoted'} ({rule})")
        return decision

    def _decide_promotion(self, step: int, cell_hash: str, initial: bool = False,
                          grace: bool = False) -> Mapping[str, Any]:
        """Ask the ``promotion`` study's SuccessiveHalvingPruner about the cell's rung score; record the answer.

        One trial per step, the rung score reported at step 1 (the pruner's rung 0). An initial cell is always
        "promoted" (it was trained at the full budget); it is there to compete. A candidate within the
        ``promotion.grace`` first is promoted too, its value told so that it competes with later ones. A trial
        finished by an attempt whose record was lost gives its decision again; one left RUNNING by a crash is closed
        as FAIL and asked anew (its rung value then counts twice among the competitors: a crash in a window of
        milliseconds).
        """
        score = self._rung_score(cell_hash)
        value = score if math.isfinite(score) else 0.0  # no score at the rung ranks last
        promoted, trial_number = self._ask_asha(PROMOTION_STUDY, self.config.promotion.eta, step, cell_hash, value,
                                                forced=initial or grace)
        self.storage.record_promotion(step, cell_hash, score, promoted, trial_number)
        decision = {"step": step, "cell_hash": cell_hash, "score": score, "promoted": promoted,
                    "trial_number": trial_number}
        self._promotions[step] = decision
        return decision

    def _ask_asha(self, study_name: str, eta: int, step: int, cell_hash: str, value: float, forced: bool = False,
                  grace: int = 0) -> tuple[bool, int]:
        """ASHA's decision for one candidate, from Optuna's SuccessiveHalvingPruner on ``study_name`` (one trial per
        step, ``value`` reported at step 1, the pruner's rung 0): (promoted, trial number). ``forced``, or fewer than
        ``grace`` decisions in the study before this one, promotes whatever the value (which still competes). The
        study is the record: a step's finished trial gives its decision again (a retried or resumed ask); one left
        RUNNING by a crash is closed as FAIL and asked anew."""
        import optuna
        from optuna.trial import TrialState

        def ask() -> tuple[bool, int]:
            study = self._optuna.create_study(
                storage=self.optuna_storage, study_name=study_name, direction="maximize", load_if_exists=True,
                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta))
            decided = 0
            for trial in study.get_trials(deepcopy=False):
                if trial.user_attrs.get("step") != step:
                    decided += trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    continue
                if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    return trial.state == TrialState.COMPLETE, trial.number
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            trial = study.ask()
            trial.set_user_attr("step", step)
            trial.set_user_attr("cell_hash", cell_hash)
            trial.set_user_attr("cell", self._spec(cell_hash).name or cell_hash[:12])
            trial.report(value, 1)
            pruned = trial.should_prune()  # also for a forced one: it records the value at the rung
            promoted = forced or decided < grace or not pruned
            if promoted:
                study.tell(trial, value)
            else:
                study.tell(trial, state=TrialState.PRUNED)
            return promoted, trial.number

        return self.storage.retry(ask, f"decide the promotion of step {step} ({study_name})")

    def _filter_promotion(self, active: _ActiveStep) -> bool:
        """Whether a candidate measured at the filter's rung trains the whole filter (``filter_promotion``): its
        best accuracy at the rung (a failed setting counts 0) against the candidates measured there so far."""
        task = self.config.memorize_task
        values = [float(row["score"]) for unit_id, unit in sorted(active.units.items())
                  if unit["task"] == task and self._is_rung(active, unit)
                  for row in self.storage.evaluations_of_unit(unit_id)]
        values = [value for value in values if math.isfinite(value)]
        value = max(values) if values else 0.0
        config = self.config.filter_promotion
        promoted, _ = self._ask_asha(FILTER_PROMOTION_STUDY, config.eta, active.step, active.cell_hash, value,
                                     grace=config.grace)
        self.progress.filter_rung_measured += 1
        self.progress.filter_promoted += promoted
        self._log(f"step {active.step}: {active.cell_hash[:12]} reached {value:.3f} on {task} at the filter's rung: "
                  f"{'promoted' if promoted else 'not promoted'} (top 1/{config.eta} of the candidates measured "
                  f"there, the first {config.grace} always)")
        return promoted

    # -- helpers ------------------------------------------------------------------------------------------------

    def _task(self, name: str):
        if name not in self._tasks:
            self._tasks[name] = self._load_task(name)
        return self._tasks[name]

    def _study_name(self, cell_hash: str, task: str) -> str:
        return study_name(cell_hash, task, self._initial_names.get(cell_hash))

    def _study(self, cell_hash: str, task: str, sampler=None, create: bool = True):
        name = self._study_name(cell_hash, task)
        if sampler is None and name in self._studies:
            return self._studies[name]
        known = self._studies.get(name)
        if known is not None and (name in self._described or not create):
            # A new sampler on a study this driver already holds: the same study (and Optuna's trial cache, so that
            # reading its trials costs only what changed), not a create_study, which first tries to insert it again.
            study = self.storage.retry(lambda: self._optuna.study.Study(
                study_name=name, storage=known._storage, sampler=sampler, pruner=known.pruner),
                f"load study {name}")
            self._studies[name] = study
            return study
        # Both are idempotent under retry: load_if_exists finds a study whose creation was acknowledged too late.
        if create:
            study = self.storage.retry(lambda: self._optuna.create_study(
                storage=self.optuna_storage, study_name=name, direction="maximize", sampler=sampler,
                load_if_exists=True), f"create study {name}")
        else:
            study = self.storage.retry(lambda: self._optuna.load_study(
                study_name=name, storage=self.optuna_storage, sampler=sampler), f"load study {name}")
        if create and "cell" not in study.user_attrs:
            user, system = self._study_attributes(cell_hash, task)
            # one transaction for every attribute, not one per key (Optuna's set_user_attr); tests read them back
            # through Optuna's own API
            self.storage.set_optuna_study_attributes(study._study_id, user, system)
        if create:
            self._described.add(name)
        self._studies[name] = study
        return study

    def _study_attributes(self, cell_hash: str, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """What optuna-dashboard shows about a study besides its name (``<cell hash>/<task>``), as (user attributes,
        system attributes): the cell's name (or short hash), hash, parent and equations, the task, and the
        objective's name (the system attribute Optuna's ``Study.set_metric_names`` writes)."""
        spec = self._spec(cell_hash)
        user: dict[str, Any] = {"cell": spec.name or cell_hash[:12], "cell_hash": cell_hash}
        parent = self._cells.parent(cell_hash)
        if parent is not None:
            user["parent"] = self._initial_names.get(parent) or parent[:12]
            user["parent_hash"] = parent
        user["task"] = task
        user["equations"] = spec.equations()
        metric = self._task(task).metric
        names = ["1/perplexity (held-out)" if metric == "inverse_perplexity" else "accuracy (held-out)"]
        return user, {_METRIC_NAMES_KEY: names}

    def _max_in_flight(self) -> int:
        return self.config.max_in_flight or 2 * self.executor.slots

    def _report(self) -> None:
        self.progress.in_flight = len(self._in_flight)
        scores = {h: self._score(h) for h in self._population}
        finite = {h: s for h, s in scores.items() if math.isfinite(s)}
        if finite:
            self.progress.best_cell = max(finite, key=lambda h: (finite[h], h))
            self.progress.best_score = finite[self.progress.best_cell]
        self._on_progress(self.progress)


#: The study system attribute holding the objective's names (what Optuna's ``Study.set_metric_names`` writes and
#: ``Study.metric_names`` reads; tests read it back through Optuna).
_METRIC_NAMES_KEY = "study:metric_names"

#: The Optuna study of the promotion decisions (one trial per candidate measured at the rung).
PROMOTION_STUDY = "promotion"

#: The Optuna study of the filter's promotion decisions (one trial per candidate measured at the filter's rung).
FILTER_PROMOTION_STUDY = "filter-promotion"

#: Statuses told to Optuna as FAIL: the setting produced no usable score (its evaluation row scores 0).
_FAILED = ("diverged", "oom", "error")


def _best_complete_trial(study):
    """The study's best COMPLETE trial (highest value, then the lowest number), or None."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return min(trials, key=lambda t: (-t.value, t.number)) if trials else None



