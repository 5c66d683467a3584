"""Running a retrain: its jobs on the search's executors (Ray, or this process), checkpoints, typed failures.

:func:`retrain` resolves the preset, the cells and the seeds, writes (or checks) ``plan.json``,
runs every unfinished job and rewrites the output tables. How it runs is one
:class:`RetrainOptions` value. A job (:func:`run_job`) trains its runs from their checkpoints
and returns a record per run, or a :class:`RunFailure` for a run whose checkpoint cannot be
used: a plain value that crosses Ray unchanged, so the driver recognises such failures by type,
not by reading a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from cellsearch.batching import BatchingConfig
from cellsearch.config import option
from cellsearch.errors import UserError
from cellsearch.hparams import HyperParams
from cellsearch.model import solve_hidden_size
from cellsearch.retrain.plan import (
    DEFAULT_BASELINES, PLAN_FILE, RetrainCell, RetrainJob, baseline_cells, make_plan, make_seeds, plan_jobs,
    unique_labels, write_plan,
)
from cellsearch.retrain.tables import RetrainResults, read_record, write_outputs
from cellsearch.outputs import output_directory
from cellsearch.search.config import ResourcesConfig
from cellsearch.search.lock import LOCK_NAME, acquire
from cellsearch.search.executors import RayExecutor, SerialExecutor
from cellsearch.spec import CellSpec
from cellsearch.tasks import get_task
from cellsearch.tasks.base import Budget
from cellsearch.tasks.presets import get_preset
from cellsearch.training.checkpoint import Checkpointer, CheckpointError, GroupCheckpoint
from cellsearch.training.groups import train_settings
from cellsearch.training.loop import GroupMember

__all__ = ["RetrainOptions", "RunFailure", "retrain", "run_job", "settle_checkpoints"]

#: ``progress(event)``: every step and epoch event of the training loop, with ``label`` and ``seed`` added.
Progress = Callable[[dict[str, Any]], None]
#: ``on_done(record, done, total)``: a run's record as its job finishes.
OnDone = Callable[[dict[str, Any], int, int], None]
#: ``on_start(done, total)``: the plan is written; ``done`` of its ``total`` runs had finished before.
OnStart = Callable[[int, int], None]


@dataclass(frozen=True)
class RetrainOptions:
    """How a retrain runs (what it trains is the cells, the task and the preset); ``cellsearch retrain``'s options."""

    seeds: int = option(2, "seeds per cell: the spread over seeds is what a comparison of cells needs",
                        check=lambda n: n >= 1, rule=">= 1")
    base_seed: int = option(0, "the training seeds derive from it, the same for every cell")
    baselines: tuple[str, ...] = option(DEFAULT_BASELINES, "reference cells trained beside the candidates at the "
                                        "same parameter budget (the comparison the retrain is for)")
    data_dir: str | None = option(None, "Penn Treebank directory for ptb; None: $CELLSEARCH_PTB_DIR")
    in_process: bool = option(False, "run the jobs here one after another, without Ray (debugging, tests; "
                              "progress then sees every training event)")
    workers: int | None = option(None, "CPUs of the embedded Ray instance; None: all of the machine's",
                                 check=lambda n: n is None or n >= 1, rule=">= 1")
    address: str | None = option(None, "Ray cluster to attach to ('auto', host:port); None: an embedded instance "
                                 "(or $RAY_ADDRESS)")
    cpus_per_run: float = option(1.0, "CPUs a job asks Ray for; torch uses as many threads",
                                 check=lambda v: v > 0, rule="> 0")
    gpus_per_run: float = option(0.0, "GPUs a job asks Ray for; fractions share a GPU", check=lambda v: v >= 0,
                                 rule=">= 0")
    device: str = option("cpu", "torch device each job trains on")
    batching: BatchingConfig = option(factory=BatchingConfig, why="a cell's seeds train as one batched model where "
                                      "it pays (results equal separate runs up to rounding, faster)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "baselines", tuple(self.baselines))  # a list is accepted, and kept hashable

    @property
    def threads(self) -> int:
        """Torch threads per job."""
        return max(1, int(self.cpus_per_run))


# ----------------------------------------------------------------------------- failures
_FAILURE_KEY = "failure"


@dataclass(frozen=True)
class RunFailure:
    """A run that could not train because a checkpoint file cannot be used; the job's other runs still train.

    :func:`run_job` returns it in place of the run's record (as ``to_dict()``, plain data through
    the executors); :meth:`from_record` tells it apart again.
    """

    label: str
    seed_index: int
    error: str  # the CheckpointError's message
    #: The run's own checkpoint, when that is the unusable file (deleting it starts the run over); None when
    #: another file is (an interrupted group save, whose message says what to delete).
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {_FAILURE_KEY: dataclasses.asdict(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunFailure | None:
        """The failure a job returned in place of a run's record; None for a record."""
        data = record.get(_FAILURE_KEY)
        return None if data is None else cls(**data)

    def line(self) -> str:
        # Rerunning would meet the same file: say how to start that run over instead.
        note = f" (delete {self.checkpoint} to start this run over)" if self.checkpoint else ""
        return f"{self.label} seed {self.seed_index}: {self.error}{note}"


def _names_file(error: CheckpointError, path: Path) -> bool:
    """Whether ``error`` is about the file at ``path`` (checkpoint messages begin with the file they are about)."""
    message = str(error)
    return message == str(path) or message.startswith((f"{path} ", f"{path}:"))


# -------------------------------------------------------------------------------- jobs
def _checkpointers(job: RetrainJob, spec: CellSpec, task) -> list[Checkpointer]:
    """One :class:`~cellsearch.training.checkpoint.Checkpointer` per run of ``job`` (its identity: the plan's
    settings)."""
    hparams = HyperParams.from_dict(job.hparams)
    hidden_size = solve_hidden_size(spec, task.vocab_size, hparams.num_layers, hparams.parameter_budget)
    return [Checkpointer(run.checkpoint_path, spec, task=task.name, vocab_size=task.vocab_size,
                         hidden_size=hidden_size, hparams=job.hparams, budget=job.budget, seed=run.seed,
                         config=job.config) for run in job.runs]


def settle_checkpoints(jobs: Sequence[RetrainJob], task) -> None:
    """Finish or discard group saves a kill interrupted, for every run at once (see ``GroupCheckpoint.settle``).

    Before any job starts: a job that resumed one seed first could otherwise overwrite a file that
    completes another seed's interrupted save (when the grouping changed, e.g. ``--no-batch``).
    """
    checkpointers = []
    for job in jobs:
        spec = CellSpec.from_dict(dict(job.cell))
        checkpointers += [c for c, run in zip(_checkpointers(job, spec, task), job.runs)
                          if not run.result_path.is_file()]
    GroupCheckpoint.settle(checkpointers)


def _json_number(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def run_job(job: RetrainJob, task, progress: Progress | None = None) -> list[dict[str, Any] | RunFailure]:
    """Train a job's runs on ``task`` (resuming from their checkpoints), write each ``result.json``; one item each.

    A run whose ``result.json`` exists is not trained again. The others train together (see
    :func:`~cellsearch.training.groups.train_settings`) in groups of runs whose checkpoints resume
    from the same point; normally that is all of them, and a group interrupted between its members'
    writes is put back in step first (:meth:`~cellsearch.training.checkpoint.GroupCheckpoint.settle`). A run
    whose checkpoint cannot be used does not stop the others: they train, and it gets a
    :class:`RunFailure` (naming the bad file) instead of a record. Other errors propagate.
    """
    spec = CellSpec.from_dict(dict(job.cell))
    hparams = HyperParams.from_dict(job.hparams)
    budget = Budget.from_dict(job.budget)
    batching = BatchingConfig.from_dict(dict(job.batching))
    outcome: dict[int, dict[str, Any] | RunFailure] = {}
    clusters: dict[Any, list] = {}
    for run, checkpointer in zip(job.runs, _checkpointers(job, spec, task)):
        if run.result_path.is_file():
            outcome[run.seed_index] = read_record(run.result_path)
            continue
        try:
            GroupCheckpoint.settle([checkpointer])
        except CheckpointError as error:  # the pending file of an interrupted group save is the bad one
            outcome[run.seed_index] = RunFailure(job.label, run.seed_index, str(error))
            continue
        try:
            loaded = checkpointer.existing()
        except CheckpointError as error:
            outcome[run.seed_index] = RunFailure(job.label, run.seed_index, str(error), str(run.checkpoint_path))
            continue
        clusters.setdefault(None if loaded is None else loaded.resume_point, []).append((run, checkpointer, loaded))
    for runs in clusters.values():
        def hook(event: dict[str, Any], runs=runs) -> None:
            run = runs[event["member"]][0]
            progress({**event, "label": job.label, "seed": run.seed, "seed_index": run.seed_index})

        try:
            results = train_settings(spec, task, [GroupMember(hparams, run.seed) for run, _, _ in runs], budget,
                                     job.device, None if progress is None else hook, job.num_threads, batching,
                                     checkpoints=[checkpointer for _, checkpointer, _ in runs])
        except CheckpointError as error:
            # A checkpoint that reads but does not fit the model (weights, carried state, random state) stops its
            # group before any training; the error names that file.
            for run, checkpointer, _ in runs:
                restart = str(run.checkpoint_path) if _names_file(error, checkpointer.path) else None
                outcome[run.seed_index] = RunFailure(job.label, run.seed_index, str(error), restart)
            continue
        for (run, checkpointer, loaded), result in zip(runs, results):
            record = {
                "label": job.label, "role": job.role, "cell_hash": spec.hash, "seed_index": run.seed_index,
                "resumed_from_epoch": None if loaded is None else loaded.epoch,
                **result.to_dict(),
            }
            checkpointer.finish(result.to_dict())
            run.result_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = run.result_path.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(record, indent=2, default=_json_number), encoding="utf-8")
            os.replace(temporary, run.result_path)
            outcome[run.seed_index] = record
    return [outcome[run.seed_index] for run in job.runs]


# ------------------------------------------------------------------------------ driver
@contextlib.contextmanager
def _deferred_sigterm() -> Iterator[Callable[[], None]]:
    """While Ray jobs run: a SIGTERM is noted and acted on between two waits, by the handler that was installed
    before (the CLI's clean stop, exit 143). Raised inside Ray's wait, which runs in C code, the same stop came out
    as a SystemError (exit 1); the finally blocks around the loop then shut Ray down and release the lock."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    received: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)

    def check() -> None:
        if received:
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signal.SIGTERM, None)
            raise SystemExit(143)

    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield check
    finally:
        signal.signal(signal.SIGTERM, previous)


def _executor(options: RetrainOptions, progress: Progress | None, out_dir: Path) -> SerialExecutor | RayExecutor:
    """The jobs' executor. On a cluster every node that may train a job must share ``out_dir``: a job writes its
    runs' checkpoints and results there, and on a directory of its own node they would never reach the tables
    (the executor's node check refuses such a cluster before any job starts)."""
    def load_task(name: str):
        return get_task(name, data_dir=options.data_dir)

    if options.in_process:
        return SerialExecutor(load_task, unit_function=lambda job, task: run_job(job, task, progress))
    return RayExecutor(load_task, ResourcesConfig(num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run),
                       address=options.address, num_cpus=options.workers, unit_function=run_job,
                       shared_directories=(out_dir,))


def _keep_record(record: dict[str, Any], path: Path) -> None:
    """Write a run's record that came back from its job to ``path`` when the file is not there.

    The job wrote it on the node it ran on; a node that joined after the shared-directory check may not share
    ``--out``. The record came back through Ray all the same, so the tables never miss a run that finished.
    """
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2, default=_json_number), encoding="utf-8")
    os.replace(temporary, path)


def retrain(cells: Sequence[RetrainCell], task_name: str, preset_name: str, out_dir: str | os.PathLike,
            options: RetrainOptions = RetrainOptions(), *, progress: Progress | None = None,
            on_done: OnDone | None = None, on_start: OnStart | None = None) -> RetrainResults:
    """Retrain ``cells`` and the ``options.baselines`` on ``task_name`` with a preset, ``options.seeds`` seeds each.

    Writes everything listed in :mod:`cellsearch.retrain` into ``out_dir``; calling it again with
    the same arguments resumes. With ``options.in_process`` the jobs run here one after another
    (``progress`` then receives every step and epoch event of the training loop, with ``label``
    and ``seed`` added); otherwise each job is a Ray task asking for ``options.cpus_per_run``
    CPUs and ``options.gpus_per_run`` GPUs, on an embedded Ray instance with ``options.workers``
    CPUs or on the cluster at ``options.address``. A cell's seeds train as one batched model where
    ``options.batching`` (default: on where it pays, see :func:`~cellsearch.retrain.plan.plan_jobs`)
    says so; results equal separate runs up to rounding. ``on_done(record, done, total)`` is
    called for each run as its job finishes (once per run; first for the runs an earlier start finished),
    ``on_start(done, total)`` once those are reported, before any run trains. Runs that failed are listed in one
    :class:`~cellsearch.errors.UserError` at the end, after the others finished and the tables
    were written.
    """
    # Absolute, because Ray workers need not share the driver's working directory.
    out_dir = Path(out_dir).resolve()
    preset = get_preset(task_name, preset_name)
    all_cells = unique_labels([*cells, *baseline_cells(options.baselines, cells)])
    seed_values = make_seeds(options.seeds, options.base_seed)
    task = get_task(task_name, data_dir=options.data_dir)
    _check_output_directory(out_dir)
    output_directory(out_dir, "retrain output directory")
    # one retrain per output directory: a second one into the same --out refuses, naming the first
    lock = acquire(out_dir, f"the retrain directory {out_dir}", command="cellsearch retrain")
    try:
        return _retrain(cells, all_cells, task, task_name, preset_name, preset, seed_values, out_dir, options,
                        progress, on_done, on_start)
    finally:
        lock.release()


def _check_output_directory(out_dir: Path) -> None:
    """An existing ``--out`` must be empty or a retrain's own (it holds its plan): a retrain never mixes its
    files into a user's directory."""
    if not out_dir.is_dir() or (out_dir / PLAN_FILE).is_file():
        return
    foreign = sorted(entry.name for entry in os.scandir(out_dir) if entry.name != LOCK_NAME)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {out_dir} already holds files that are not a cellsearch retrain ({listed}); give a "
                        f"new or empty directory")


def _retrain(cells, all_cells, task, task_name, preset_name, preset, seed_values, out_dir: Path,
             options: RetrainOptions, progress, on_done, on_start) -> RetrainResults:
    write_plan(out_dir, make_plan(task.name, preset_name, preset, seed_values, options.base_seed, all_cells))

    def plan_for(slots: int) -> list[RetrainJob]:
        return plan_jobs(all_cells, task_name, preset_name, preset, seed_values, out_dir, device=options.device,
                         num_threads=options.threads, task=task, batching=options.batching, slots=slots)

    runs = [run for job in plan_for(1) for run in job.runs]
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set()

    def collect(record: dict[str, Any]) -> None:
        # a job also returns its runs that had finished before this retrain started
        if (record["label"], record["seed_index"]) in seen:
            return
        seen.add((record["label"], record["seed_index"]))
        records.append(record)
        if on_done is not None:
            on_done(record, len(records), len(runs))

    for run in runs:
        if run.result_path.is_file():
            collect(read_record(run.result_path))
    if on_start is not None:
        on_start(len(records), len(runs))
    failures: list[str] = []
    if len(records) < len(runs):
        executor = _executor(options, progress, out_dir)
        try:
            stop_point = _deferred_sigterm() if isinstance(executor, RayExecutor) else contextlib.nullcontext(None)
            with stop_point as check_stop:
                jobs = [job for job in plan_for(executor.slots) if not job.finished]
                settle_checkpoints(jobs, task)
                by_id = {job.unit_id: job for job in jobs}
                paths = {(job.label, run.seed_index): run.result_path for job in jobs for run in job.runs}
                executor.prepare([task_name])
                queue = list(jobs)
                while queue or executor.in_flight:
                    while queue and executor.in_flight < executor.slots:
                        executor.submit(queue.pop(0))
                    completions = executor.wait(timeout=1.0)
                    if check_stop is not None:
                        check_stop()
                    for completion in completions:
                        job = by_id[completion.unit_id]
                        if completion.error is None:
                            for item in completion.results:
                                failure = RunFailure.from_record(item)
                                if failure is None:
                                    _keep_record(item, paths[(item["label"], item["seed_index"])])
                                    collect(item)
                                else:
                                    failures.append(failure.line())
                            continue
                        # An error the job did not turn into a RunFailure (a bug, a lost worker): its unfinished runs
                        # fail with its last line; the others may have finished before it was raised.
                        reason = completion.error.strip().splitlines()[-1]
                        for run in job.runs:
                            if run.result_path.is_file():
                                collect(read_record(run.result_path))
                            else:
                                failures.append(f"{job.label} seed {run.seed_index}: {reason}")
        finally:
            executor.close()
    results = write_outputs(out_dir)
    if failures:
        raise UserError(f"{len(failures)} retrain run(s) failed (the others are done; the same command retries "
                        f"these): " + "; ".join(failures))
    return results
