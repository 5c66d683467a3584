"""Planning a retrain: which cells (candidates and baselines), which seeds, which jobs, and ``plan.json``.

The plan is plain data: :func:`make_plan` is what ``plan.json`` holds (a rerun must match it to
resume; :func:`write_plan` refuses a different one), and :func:`plan_jobs` splits the (cell, seed)
runs into :class:`RetrainJob` values that the search's executors accept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cellsearch import zoo
from cellsearch.batching import BatchingConfig
from cellsearch.config import to_mapping
from cellsearch.errors import UserError, shown
from cellsearch.outputs import output_directory
from cellsearch.results import load_run
from cellsearch.spec import CellSpec
from cellsearch.tasks.base import TASK_NAME, RetrainPreset
from cellsearch.training.groups import trains_together

__all__ = ["DEFAULT_BASELINES", "PLAN_FILE", "RetrainCell", "RetrainRun", "RetrainJob", "resolve_source",
           "baseline_cells", "unique_labels", "make_seeds", "make_plan", "plan_jobs", "write_plan", "read_plan",
           "read_json", "safe_label"]

DEFAULT_BASELINES = ("gru", "lstm_b")
PLAN_FILE = "plan.json"


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
    reference = _split_run_reference(source)
    if reference is not None:
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
        if top is None:
            raise UserError(f"{source} is a search run: give RUN_DIR:HASH or RUN_DIR --top N")
        if top < 1:
            raise UserError("--top must be at least 1")
        results = load_run(source)
        try:
            best = results.top(top)
            cells = [RetrainCell(safe_label(f"top{rank:02d}-{_name_or_hash(row)}"), results.spec(row.cell_hash),
                                 "candidate", f"{source}:{row.cell_hash}")
                     for rank, row in enumerate(best.itertuples(index=False), start=1)]
        finally:
            results.close()
        if not cells:
            raise UserError(f"no cell of {source} has been evaluated on every task yet")
        return cells
    if top is not None:
        raise UserError(f"--top needs a search run directory; {source} is not one (no run.json)")
    spec = zoo.resolve_cell(source)
    label = spec.name or (Path(source).stem if Path(source).is_file() else spec.short_hash)
    return [RetrainCell(safe_label(label), spec, "candidate", source)]


def _name_or_hash(row: Any) -> str:
    return row.name if isinstance(row.name, str) and row.name else row.short_hash


def safe_label(label: str) -> str:
    """A label usable as a directory name."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label).strip("._")
    return cleaned or "cell"


def baseline_cells(names: Iterable[str], candidates: Sequence[RetrainCell]) -> list[RetrainCell]:
    """Reference cells to train beside the candidates (skipping any that is already a candidate)."""
    taken = {cell.spec.hash for cell in candidates}
    cells = []
    for name in names:
        if not zoo.known(name):
            raise UserError(f"unknown baseline {name!r}; reference cells: {', '.join(zoo.names())}")
        spec = zoo.get(name)
        if spec.hash in taken:
            continue
        taken.add(spec.hash)
        cells.append(RetrainCell(name, spec, "baseline", name))
    return cells


def unique_labels(cells: Sequence[RetrainCell]) -> list[RetrainCell]:
    """The cells with repeated labels told apart by a hash suffix (each label is a directory)."""
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


# -------------------------------------------------------------------------------- plan
def _plain(data: Any) -> Any:
    """JSON-shaped data (tuples become lists), so that stored and fresh configs compare equal."""
    return json.loads(json.dumps(data))


def make_plan(task_name: str, preset_name: str, preset: RetrainPreset, seeds: Sequence[int], base_seed: int,
              cells: Sequence[RetrainCell]) -> dict[str, Any]:
    """What ``plan.json`` holds: task, preset (resolved setting and budget), seeds and cells."""
    return _plain({
        "task": task_name, "preset": preset_name, "preset_settings": to_mapping(preset), "seeds": list(seeds),
        "base_seed": base_seed, "cells": [cell.to_dict() for cell in cells],
    })


def write_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    """Write ``plan.json`` into a new output directory, or check that an existing one holds the same plan."""
    path = out_dir / PLAN_FILE
    if path.is_file():
        stored = read_json(path, "retrain plan")
        if stored != plan:
            changed = sorted(key for key in set(stored) | set(plan) if stored.get(key) != plan.get(key))
            raise UserError(f"{out_dir} holds a different retrain (differs in: {', '.join(changed)}); use another "
                            f"--out or the same arguments to resume it")
        return
    output_directory(out_dir, "retrain output directory")
    path.write_text(json.dumps(plan, indent=2), encoding="utf-8")


# --------------------------------------------------------------------- reading back
# An output directory may come from elsewhere (or be damaged): what is read back is checked, so
# that a bad file is one clear line, and a label cannot lead a read outside the directory.
def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file of a retrain output directory; anything else is one clear :class:`UserError`."""
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


def is_int(value: Any) -> bool:
    return type(value) is int


def read_plan(path: Path) -> dict[str, Any]:
    """``plan.json``, checked to be one this cellsearch wrote (labels are safe directory names)."""
    plan = read_json(path, "retrain plan")
    cells = plan.get("cells")
    fits = (isinstance(plan.get("task"), str) and TASK_NAME.fullmatch(plan["task"]) is not None
            and isinstance(plan.get("preset"), str)
            and isinstance(plan.get("seeds"), list) and all(is_int(seed) for seed in plan["seeds"])
            and isinstance(cells, list) and all(
                isinstance(cell, dict) and all(isinstance(cell.get(key), str) for key in ("label", "role", "hash"))
                and cell["label"] == safe_label(cell["label"]) for cell in cells))
    if not fits:
        raise UserError(f"{path}: not a retrain plan this cellsearch wrote (task, preset, seeds or cells are "
                        f"missing or malformed)")
    return plan


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


def plan_jobs(cells: Sequence[RetrainCell], task_name: str, preset_name: str, preset: RetrainPreset,
              seeds: Sequence[int], out_dir: Path, device: str = "cpu", num_threads: int = 1, task=None,
              batching: BatchingConfig | None = None, slots: int = 1) -> list[RetrainJob]:
    """The jobs of a retrain, cells in order: seeds of a cell that train as one batched model share a job.

    They do (:func:`~cellsearch.training.groups.trains_together`) when batching is on and, on a
    CPU, when it pays for the preset's shape on ``task`` (without ``task``, never); otherwise each
    seed is a job of its own. Batching trades parallel jobs for a faster one: a cell's seeds are
    split into as many groups as it takes for the jobs to fill ``slots`` (the runs the executor
    can hold at once), and a group holds at most ``batching.max_members`` seeds.
    """
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
