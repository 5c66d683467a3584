"""Retraining discovered cells against baselines at the same parameter budget.

:func:`retrain` trains each cell (and each baseline, ``gru`` and ``lstm_b`` by
default) once per seed with a task's *retrain preset* (one hyperparameter
setting and one budget, from the ``retrain_presets`` block of ``tasks/TASK.yaml``), through the
one training loop (:func:`cellsearch.batched_training.train_settings`): a cell's seeds train
as one batched model where that pays (always on a GPU; on a CPU when the cells outweigh the
softmax layer), with results equal to separate runs up to rounding. Every cell gets the
preset's parameter budget and its own width solved from it, and every cell meets the same seeds.

Each (cell, seed) run writes a checkpoint every epoch
(:mod:`cellsearch.checkpoint`; seeds trained together commit their files together); running
the same retrain again into the same output directory skips finished runs and resumes
unfinished ones from their last checkpoint, ending with the same result as an uninterrupted
run (CPU).
Jobs (one run, or a group of a cell's seeds trained together; :func:`plan_jobs` splits groups so
that the jobs fill the executor's slots) go to Ray, one per task slot, through the search's
executors (:mod:`cellsearch.search.executors`), or run in this process.

The output directory holds

``plan.json``
    task, preset (resolved setting and budget), seeds and cells (the plan a
    rerun must match to resume);
``runs/LABEL/seed-N/``
    ``checkpoint.pt`` and, once finished, ``result.json``;
``results.csv``
    one row per cell and seed: status, width, parameters, final validation and
    test metrics, epochs, steps, seconds;
``curves.csv``, ``curves.png``
    held-out metrics after every epoch of every run;
``summary.csv``, ``summary.md``
    mean, standard deviation, minimum and maximum over seeds per cell.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from cellsearch.batching import BatchingConfig
from cellsearch.config import to_mapping
from cellsearch.errors import UserError, shown
from cellsearch.hparams import HyperParams
from cellsearch.outputs import output_directory
from cellsearch.spec import CellSpec
from cellsearch.tasks.base import Budget, RetrainPreset

__all__ = [
    "RetrainPreset", "RetrainCell", "RetrainRun", "RetrainJob", "RetrainResults", "load_presets", "get_preset", "preset_names",
    "resolve_source", "baseline_cells", "make_seeds", "plan_jobs", "run_job", "retrain", "load_retrain",
    "write_outputs", "markdown_table", "DEFAULT_BASELINES",
]

DEFAULT_BASELINES = ("gru", "lstm_b")
PLAN_FILE = "plan.json"


# ----------------------------------------------------------------------------- presets
def _task_file(task_name: str) -> Path:
    from cellsearch.tasks import task_names, tasks_dir

    path = Path(task_name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = tasks_dir() / f"{task_name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown task {task_name!r}; known tasks: {', '.join(task_names())}")
    return path


def load_presets(task_name: str) -> dict[str, RetrainPreset]:
    """The retrain presets of a task (the ``retrain_presets`` block of its task file), checked."""
    from cellsearch.tasks.base import load_task_file

    path = _task_file(task_name)
    presets = dict(load_task_file(path).retrain_presets)
    if not presets:
        raise UserError(f"task {task_name} has no retrain presets (no retrain_presets block in {path})")
    return presets


def preset_names(task_name: str) -> tuple[str, ...]:
    return tuple(load_presets(task_name))


def get_preset(task_name: str, name: str) -> RetrainPreset:
    """One preset by name; an unknown name lists the known ones."""
    presets = load_presets(task_name)
    if name not in presets:
        raise UserError(f"task {task_name} has no retrain preset {name!r}; known: {', '.join(presets)}")
    return presets[name]


# ------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class RetrainCell:
    """A cell to retrain: a label (directory name and table row), the spec, its role and where it came from."""

    label: str
    spec: CellSpec
    role: str  # "candidate" or "baseline"
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "hash": self.spec.hash, "role": self.role, "source": self.source,
                "spec": self.spec.to_dict()}


def _split_run_reference(source: str) -> tuple[Path, str] | None:
    """``RUN_DIR:HASH`` -> (run dir, hash prefix), when the part before the last colon is a run directory."""
    head, separator, tail = source.rpartition(":")
    if separator and head and (Path(head) / "run.json").is_file():
        return Path(head), tail
    return None


def resolve_source(source: str, top: int | None = None) -> list[RetrainCell]:
    """The candidate cells named by ``source``.

    ``RUN_DIR:HASH`` (a hash prefix of a cell of that search), ``RUN_DIR`` with
    ``top`` (the search's ``top`` best cells), a spec file (.json/.yaml) or a
    reference cell name (:mod:`cellsearch.zoo`).
    """
    from cellsearch.commands._common import resolve_cell

    reference = _split_run_reference(source)
    if reference is not None:
        from cellsearch.results import load_run

        if top is not None:
            raise UserError("give either RUN_DIR:HASH or RUN_DIR --top N, not both")
        run_dir, prefix = reference
        results = load_run(run_dir)
        try:
            spec = results.spec(prefix)
        finally:
            results.close()
        return [RetrainCell(spec.name or spec.short_hash, spec, "candidate", source)]
    if (Path(source) / "run.json").is_file():
        from cellsearch.results import load_run

        if top is None:
            raise UserError(f"{source} is a search run: give RUN_DIR:HASH or RUN_DIR --top N")
        if top < 1:
            raise UserError("--top must be at least 1")
        results = load_run(source)
        try:
            best = results.top(top)
            cells = [RetrainCell(_safe_label(f"top{rank:02d}-{_name_or_hash(row)}"), results.spec(row.hash),
                                 "candidate", f"{source}:{row.hash}")
                     for rank, row in enumerate(best.itertuples(index=False), start=1)]
        finally:
            results.close()
        if not cells:
            raise UserError(f"no cell of {source} has been evaluated on every task yet")
        return cells
    if top is not None:
        raise UserError(f"--top needs a search run directory; {source} is not one (no run.json)")
    spec = resolve_cell(source)
    label = spec.name or (Path(source).stem if Path(source).is_file() else spec.short_hash)
    return [RetrainCell(_safe_label(label), spec, "candidate", source)]


def _name_or_hash(row: Any) -> str:
    return row.name if isinstance(row.name, str) and row.name else row.short_hash


def _safe_label(label: str) -> str:
    """A label usable as a directory name."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label).strip("._")
    return cleaned or "cell"


def baseline_cells(names: Iterable[str], candidates: Sequence[RetrainCell]) -> list[RetrainCell]:
    """Reference cells to train beside the candidates (skipping any that is already a candidate)."""
    from cellsearch import zoo

    taken = {cell.spec.hash for cell in candidates}
    cells = []
    for name in names:
        if name not in zoo.names():
            raise UserError(f"unknown baseline {name!r}; reference cells: {', '.join(zoo.names())}")
        spec = zoo.get(name)
        if spec.hash in taken:
            continue
        taken.add(spec.hash)
        cells.append(RetrainCell(name, spec, "baseline", name))
    return cells


def _unique_labels(cells: Sequence[RetrainCell]) -> list[RetrainCell]:
    seen: dict[str, int] = {}
    unique = []
    for cell in cells:
        label = cell.label
        if label in seen:
            seen[label] += 1
            label = f"{label}-{cell.spec.short_hash}"
        else:
            seen[label] = 1
        unique.append(RetrainCell(label, cell.spec, cell.role, cell.source))
    return unique


def make_seeds(count: int, base_seed: int = 0) -> list[int]:
    """``count`` training seeds derived from ``base_seed`` (the same for every cell)."""
    if count < 1:
        raise UserError("--seeds must be at least 1")
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(base_seed).spawn(count)]


# -------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class RetrainRun:
    """One (cell, seed) run of a job: the seed, its index among the plan's seeds, and its directory."""

    seed_index: int
    seed: int
    run_dir: str

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.run_dir) / "checkpoint.pt"

    @property
    def result_path(self) -> Path:
        return Path(self.run_dir) / "result.json"


@dataclass(frozen=True)
class RetrainJob:
    """The runs of one cell trained together (several seeds as one batched model, or one run); plain data.

    ``unit_id``, ``task`` and ``num_threads`` make it acceptable to the search's executors.
    ``batching`` holds :class:`~cellsearch.batching.BatchingConfig` keys.
    """

    unit_id: int
    task: str
    label: str
    role: str
    cell: Mapping[str, Any]
    runs: tuple[RetrainRun, ...]
    hparams: Mapping[str, Any]
    budget: Mapping[str, Any]
    config: Mapping[str, Any]
    device: str = "cpu"
    num_threads: int = 1
    batching: Mapping[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(run.result_path.is_file() for run in self.runs)


def _plain(data: Any) -> Any:
    """JSON-shaped data (tuples become lists), so that stored and fresh configs compare equal."""
    return json.loads(json.dumps(data))


def plan_jobs(cells: Sequence[RetrainCell], task_name: str, preset_name: str, preset: RetrainPreset,
              seeds: Sequence[int], out_dir: Path, device: str = "cpu", num_threads: int = 1, task=None,
              batching: BatchingConfig | None = None, slots: int = 1) -> list[RetrainJob]:
    """The jobs of a retrain, cells in order: seeds of a cell that train as one batched model share a job.

    They do (:func:`~cellsearch.batched_training.trains_together`) when batching is on and, on a
    CPU, when it pays for the preset's shape on ``task`` (without ``task``, never); otherwise each
    seed is a job of its own. Batching trades parallel jobs for a faster one: a cell's seeds are
    split into as many groups as it takes for the jobs to fill ``slots`` (the runs the executor
    can hold at once), and a group holds at most ``batching.max_members`` seeds.
    """
    from cellsearch.batched_training import trains_together

    batching = batching or BatchingConfig()
    config = _plain({"task": task_name, "preset": preset_name})
    together = {cell.label: len(seeds) > 1 and task is not None
                and trains_together(cell.spec, task, preset.hparams, device, batching) for cell in cells}
    batched_cells = sum(together.values())
    solo_jobs = (len(cells) - batched_cells) * len(seeds)
    groups = 1 if not batched_cells else min(len(seeds), max(1, math.ceil((slots - solo_jobs) / batched_cells)))
    group_size = min(batching.max_members, math.ceil(len(seeds) / groups))
    jobs: list[RetrainJob] = []
    for cell in cells:
        runs = [RetrainRun(index, int(seed), str(out_dir / "runs" / cell.label / f"seed-{index}"))
                for index, seed in enumerate(seeds)]
        size = group_size if together[cell.label] else 1
        for first in range(0, len(runs), size):
            jobs.append(RetrainJob(
                unit_id=len(jobs), task=task_name, label=cell.label, role=cell.role, cell=cell.spec.to_dict(),
                runs=tuple(runs[first:first + size]), hparams=_plain(preset.hparams.to_dict()),
                budget=_plain(preset.budget.to_dict()), config=config, device=device, num_threads=num_threads,
                batching=batching.to_dict(),
            ))
    return jobs


def _checkpointers(job: RetrainJob, spec: CellSpec, task) -> list:
    """One :class:`~cellsearch.checkpoint.Checkpointer` per run of ``job`` (its identity: the plan's settings)."""
    from cellsearch.checkpoint import Checkpointer
    from cellsearch.training import solve_hidden_size

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
    from cellsearch.checkpoint import GroupCheckpoint

    checkpointers = []
    for job in jobs:
        spec = CellSpec.from_dict(dict(job.cell))
        checkpointers += [c for c, run in zip(_checkpointers(job, spec, task), job.runs) if not run.result_path.is_file()]
    GroupCheckpoint.settle(checkpointers)


def run_job(job: RetrainJob, task, progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train a job's runs on ``task`` (resuming from their checkpoints), write each ``result.json``; a record each.

    A run whose ``result.json`` exists is not trained again. The others train together (see
    :func:`~cellsearch.batched_training.train_settings`) in groups of runs whose checkpoints resume
    from the same point; normally that is all of them, and a group interrupted between its members'
    writes is put back in step first (:meth:`~cellsearch.checkpoint.GroupCheckpoint.settle`). A run
    whose checkpoint cannot be used does not stop the others: they train, and then
    :class:`~cellsearch.checkpoint.CheckpointError` names the bad file(s).
    """
    from cellsearch.batched_training import train_settings
    from cellsearch.checkpoint import CheckpointError, GroupCheckpoint
    from cellsearch.training import GroupMember

    spec = CellSpec.from_dict(dict(job.cell))
    hparams = HyperParams.from_dict(job.hparams)
    budget = Budget.from_dict(job.budget)
    batching = BatchingConfig.from_dict(dict(job.batching))
    records: dict[int, dict[str, Any]] = {}
    clusters: dict[Any, list] = {}
    problems: list[str] = []
    for run, checkpointer in zip(job.runs, _checkpointers(job, spec, task)):
        if run.result_path.is_file():
            records[run.seed_index] = _read_record(run.result_path)
            continue
        try:
            GroupCheckpoint.settle([checkpointer])
            loaded = checkpointer.existing()
        except CheckpointError as error:
            problems.append(str(error))
            continue
        clusters.setdefault(None if loaded is None else loaded.resume_point, []).append((run, checkpointer, loaded))
    for runs in clusters.values():
        def hook(event: dict[str, Any], runs=runs) -> None:
            run = runs[event["member"]][0]
            progress({**event, "label": job.label, "seed": run.seed, "seed_index": run.seed_index})

        results = train_settings(spec, task, [GroupMember(hparams, run.seed) for run, _, _ in runs], budget, job.device,
                                 None if progress is None else hook, job.num_threads, batching,
                                 checkpoints=[checkpointer for _, checkpointer, _ in runs])
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
            records[run.seed_index] = record
    if problems:
        raise CheckpointError("; ".join(problems))
    return [records[run.seed_index] for run in job.runs]


def _json_number(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# --------------------------------------------------------------------- reading back
# An output directory may come from elsewhere (or be damaged): what is read back is checked, so
# that a bad file is one clear line, and a label cannot lead a read outside the directory.
def _read_json(path: Path, what: str) -> dict[str, Any]:
    if path.exists() and not path.is_file():
        # a FIFO would block the read forever
        raise UserError(f"{path}: the {what} is not a regular file; delete it to redo that part")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UserError(f"{path}: cannot read the {what} ({shown(str(error), 120)}); delete it to redo that "
                        f"part") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the {what} is not a JSON object")
    return data


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: What a reader of result.json uses, and the type it needs.
_RECORD_FIELDS = {"status": lambda v: isinstance(v, str), "hidden_size": _is_int, "parameter_count": _is_int,
                  "score": _is_number, "epochs": _is_int, "steps": _is_int, "duration_s": _is_number,
                  "metrics": lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
                  "curve": lambda v: isinstance(v, list) and all(isinstance(point, dict) for point in v)}


def _read_record(path: Path) -> dict[str, Any]:
    record = _read_json(path, "run result")
    bad = [key for key, check in _RECORD_FIELDS.items() if key not in record or not check(record[key])]
    if bad:
        raise UserError(f"{path}: not a retrain run result (bad or missing {', '.join(bad)}); delete it to redo "
                        f"that run")
    return record


def _read_plan(path: Path) -> dict[str, Any]:
    from cellsearch.tasks.base import TASK_NAME

    plan = _read_json(path, "retrain plan")
    cells = plan.get("cells")
    fits = (isinstance(plan.get("task"), str) and TASK_NAME.fullmatch(plan["task"]) is not None
            and isinstance(plan.get("preset"), str)
            and isinstance(plan.get("seeds"), list) and all(_is_int(seed) for seed in plan["seeds"])
            and isinstance(cells, list) and all(
                isinstance(cell, dict) and all(isinstance(cell.get(key), str) for key in ("label", "role", "hash"))
                and cell["label"] == _safe_label(cell["label"]) for cell in cells))
    if not fits:
        raise UserError(f"{path}: not a retrain plan this cellsearch wrote (task, preset, seeds or cells are "
                        f"missing or malformed)")
    return plan


# ------------------------------------------------------------------------------ driver
def _write_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    path = out_dir / PLAN_FILE
    if path.is_file():
        stored = _read_json(path, "retrain plan")
        if stored != plan:
            changed = sorted(key for key in set(stored) | set(plan) if stored.get(key) != plan.get(key))
            raise UserError(f"{out_dir} holds a different retrain (differs in: {', '.join(changed)}); use another "
                            f"--out or the same arguments to resume it")
        return
    output_directory(out_dir, "retrain output directory")
    path.write_text(json.dumps(plan, indent=2), encoding="utf-8")


def retrain(
    cells: Sequence[RetrainCell],
    task_name: str,
    preset_name: str,
    out_dir: str | os.PathLike,
    *,
    seeds: int = 2,
    base_seed: int = 0,
    baselines: Iterable[str] = DEFAULT_BASELINES,
    data_dir: str | None = None,
    in_process: bool = False,
    workers: int | None = None,
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    device: str = "cpu",
    batching: BatchingConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
) -> "RetrainResults":
    """Retrain ``cells`` and the ``baselines`` on ``task_name`` with a preset, ``seeds`` seeds each.

    Writes everything listed in the module docstring into ``out_dir``; calling
    it again with the same arguments resumes. ``in_process`` runs the jobs here
    one after another (``progress`` then receives every step and epoch event of
    the training loop, with ``label`` and ``seed`` added); otherwise each job is
    a Ray task asking for ``num_cpus`` CPUs and ``num_gpus`` GPUs, on an embedded
    Ray instance with ``workers`` CPUs or on the cluster at ``address``.
    A cell's seeds train as one batched model where ``batching`` (default: on where it pays, see
    :func:`plan_jobs`) says so; results equal separate runs up to rounding.
    ``on_done(record, done, total)`` is called for each run as its job finishes (once per run).
    """
    from cellsearch.search.config import ResourcesConfig
    from cellsearch.search.executors import RayExecutor, SerialExecutor
    from cellsearch.tasks import get_task

    # Absolute, because Ray workers need not share the driver's working directory.
    out_dir = Path(out_dir).resolve()
    preset = get_preset(task_name, preset_name)
    all_cells = _unique_labels([*cells, *baseline_cells(baselines, cells)])
    seed_values = make_seeds(seeds, base_seed)
    threads = max(1, int(num_cpus))
    task = get_task(task_name, data_dir=data_dir)
    plan = _plain({
        "task": task.name, "preset": preset_name, "preset_settings": to_mapping(preset), "seeds": seed_values,
        "base_seed": base_seed, "cells": [cell.to_dict() for cell in all_cells],
    })
    _write_plan(out_dir, plan)

    def load_task(name: str):
        return get_task(name, data_dir=data_dir)

    def plan_for(slots: int) -> list[RetrainJob]:
        return plan_jobs(all_cells, task_name, preset_name, preset, seed_values, out_dir, device=device,
                         num_threads=threads, task=task, batching=batching, slots=slots)

    runs = [run for job in plan_for(1) for run in job.runs]
    records = [_read_record(run.result_path) for run in runs if run.result_path.is_file()]
    if on_done is not None:
        for count, record in enumerate(records, 1):
            on_done(record, count, len(runs))
    seen = {(record["label"], record["seed_index"]) for record in records}
    failures: list[str] = []
    if len(records) < len(runs):
        if in_process:
            executor = SerialExecutor(load_task, unit_function=lambda job, task: run_job(job, task, progress))
        else:
            executor = RayExecutor(load_task, ResourcesConfig(num_cpus=num_cpus, num_gpus=num_gpus),
                                   address=address, num_cpus=workers, unit_function=run_job)
        try:
            jobs = [job for job in plan_for(executor.slots) if not job.finished]
            settle_checkpoints(jobs, task)
            by_id = {job.unit_id: job for job in jobs}
            executor.prepare([task_name])
            queue = list(jobs)
            while queue or executor.in_flight:
                while queue and executor.in_flight < executor.slots:
                    executor.submit(queue.pop(0))
                for completion in executor.wait(timeout=1.0):
                    job = by_id[completion.unit_id]
                    done = completion.results
                    if completion.error is not None:
                        reason = completion.error.strip().splitlines()[-1]
                        # the job's other runs may have finished before the failure was raised
                        done = [_read_record(run.result_path) for run in job.runs if run.result_path.is_file()]
                        for run in job.runs:
                            if run.result_path.is_file():
                                continue
                            note = ""
                            if ("CheckpointError" in reason and str(run.checkpoint_path) in reason
                                    and f"{run.checkpoint_path}.pending" not in reason):
                                # Rerunning would meet the same file: say how to start that run over instead.
                                note = f" (delete {run.checkpoint_path} to start this run over)"
                            failures.append(f"{job.label} seed {run.seed_index}: {reason}{note}")
                    for record in done:
                        # a job also returns its runs that had finished before this retrain started
                        if (record["label"], record["seed_index"]) in seen:
                            continue
                        seen.add((record["label"], record["seed_index"]))
                        records.append(record)
                        if on_done is not None:
                            on_done(record, len(records), len(runs))
        finally:
            executor.close()
    results = write_outputs(out_dir)
    if failures:
        raise UserError(f"{len(failures)} retrain run(s) failed (the others are done; the same command retries "
                        f"these): " + "; ".join(failures))
    return results


# ----------------------------------------------------------------------------- outputs
@dataclass
class RetrainResults:
    """A retrain's tables (pandas): one row per run, per evaluation, per cell; see the module docstring."""

    out_dir: Path
    plan: dict[str, Any]
    runs: pd.DataFrame
    curves: pd.DataFrame
    summary: pd.DataFrame
    metrics: tuple[str, ...] = field(default=())

    @property
    def task(self) -> str:
        return self.plan["task"]


def _main_metrics(metric_kind: str) -> tuple[str, ...]:
    """The metrics a summary shows: perplexities for language modelling, accuracies otherwise."""
    name = "perplexity" if metric_kind == "inverse_perplexity" else "accuracy"
    return (f"valid_{name}", f"test_{name}")


def load_retrain(out_dir: str | os.PathLike) -> RetrainResults:
    """Read a retrain output directory (finished or not) into tables."""
    out_dir = Path(out_dir)
    plan_path = out_dir / PLAN_FILE
    if not plan_path.is_file():
        raise UserError(f"{out_dir} is not a retrain output directory (no {PLAN_FILE})")
    plan = _read_plan(plan_path)
    from cellsearch.tasks import tasks_dir
    from cellsearch.tasks.base import load_task_file

    task_path = tasks_dir() / f"{plan['task']}.yaml"
    metric_kind = load_task_file(task_path).metric if task_path.is_file() else "accuracy"
    metrics = _main_metrics(metric_kind)
    rows, curve_rows = [], []
    for cell in plan["cells"]:
        for index, seed in enumerate(plan["seeds"]):
            path = out_dir / "runs" / cell["label"] / f"seed-{index}" / "result.json"
            if not path.is_file():
                continue
            record = _read_record(path)
            rows.append({
                "cell": cell["label"], "role": cell["role"], "hash": cell["hash"], "seed_index": index, "seed": seed,
                "status": record["status"], "hidden_size": record["hidden_size"],
                "parameter_count": record["parameter_count"], "score": record["score"],
                **{key: record["metrics"].get(key, math.nan) for key in (*metrics, "valid_loss", "test_loss")},
                "best_epoch": record["metrics"].get("best_epoch", math.nan), "epochs": record["epochs"],
                "steps": record["steps"], "duration_s": record["duration_s"],
                "resumed_from_epoch": record.get("resumed_from_epoch"),
            })
            for point in record["curve"]:
                curve_rows.append({"cell": cell["label"], "role": cell["role"], "seed_index": index, "seed": seed,
                                   **point})
    runs = pd.DataFrame(rows, columns=["cell", "role", "hash", "seed_index", "seed", "status", "hidden_size",
                                       "parameter_count", "score", *metrics, "valid_loss", "test_loss",
                                       "best_epoch", "epochs", "steps",
                                       "duration_s", "resumed_from_epoch"])
    curves = pd.DataFrame(curve_rows)
    return RetrainResults(out_dir, plan, runs, curves, _summarise(runs, plan, metrics), metrics)


def _summarise(runs: pd.DataFrame, plan: Mapping[str, Any], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, standard deviation (over seeds, ddof 1), minimum and maximum per cell, in plan order."""
    rows = []
    for cell in plan["cells"]:
        mine = runs[runs["cell"] == cell["label"]]
        ok = mine[mine["status"].isin(["ok", "timeout"])]
        row: dict[str, Any] = {"cell": cell["label"], "role": cell["role"], "hash": cell["hash"][:12],
                               "seeds": len(mine), "ok": len(ok),
                               "hidden_size": int(mine["hidden_size"].iloc[0]) if len(mine) else math.nan,
                               "parameter_count": int(mine["parameter_count"].iloc[0]) if len(mine) else math.nan}
        for metric in metrics:
            values = ok[metric].astype(float)
            row[f"{metric}_mean"] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{metric}_min"] = values.min() if len(values) else math.nan
            row[f"{metric}_max"] = values.max() if len(values) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of a DataFrame (numbers to 4 significant digits)."""
    header = [str(column) for column in table.columns]
    rows = [[_format_cell(value) for value in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def summary_markdown(results: RetrainResults) -> str:
    """The per-cell table in markdown: mean +- standard deviation over seeds of the main metrics."""
    table = results.summary
    display = pd.DataFrame({"cell": table["cell"], "role": table["role"], "hash": table["hash"],
                            "width": table["hidden_size"], "parameters": table["parameter_count"],
                            "seeds ok": [f"{ok}/{n}" for ok, n in zip(table["ok"], table["seeds"])]})
    for metric in results.metrics:
        display[metric] = [_mean_spread(mean, std) for mean, std in zip(table[f"{metric}_mean"], table[f"{metric}_std"])]
    preset = results.plan["preset"]
    title = (f"Retrain on {results.task}, preset {preset}, {len(results.plan['seeds'])} seed(s) "
             f"(mean ± standard deviation over seeds)\n\n")
    return title + markdown_table(display)


def _mean_spread(mean: float, std: float) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    return f"{mean:.4g}" if isinstance(std, float) and math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def plot_curves(curves: pd.DataFrame, metrics: Sequence[str], path: Path) -> Path:
    """Held-out metric against epoch, one line per run, one colour per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metrics[0]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if not curves.empty and metric in curves.columns:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, (cell, group) in enumerate(curves.groupby("cell", sort=False)):
            colour = colours[index % len(colours)]
            for seed_index, run in group.groupby("seed_index"):
                axis.plot(run["epoch"], run[metric], color=colour, alpha=0.85, marker=".",
                          label=cell if seed_index == group["seed_index"].min() else None)
        if "perplexity" in metric:
            axis.set_yscale("log")
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric.replace("_", " "))
    axis.set_title("held-out learning curves (one line per seed)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outputs(out_dir: str | os.PathLike) -> RetrainResults:
    """(Re)write results.csv, curves.csv, curves.png, summary.csv and summary.md from the finished runs."""
    results = load_retrain(out_dir)
    out = results.out_dir
    results.runs.to_csv(out / "results.csv", index=False)
    results.curves.to_csv(out / "curves.csv", index=False)
    results.summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
    plot_curves(results.curves, results.metrics, out / "curves.png")
    return results
