"""Retraining discovered cells against baselines at the same parameter budget.

:func:`retrain` trains each cell (and each baseline, ``gru`` and ``lstm_b`` by
default) once per seed with a task's *retrain preset* (one hyperparameter
setting and one budget, from the ``retrain_presets`` block of ``tasks/TASK.yaml``;
:mod:`cellsearch.tasks.presets`), through the one training loop
(:func:`cellsearch.training.groups.train_settings`): a cell's seeds train as one batched
model where that pays (always on a GPU; on a CPU when the cells outweigh the softmax layer),
with results equal to separate runs up to rounding. Every cell gets the preset's parameter
budget and its own width solved from it, and every cell meets the same seeds. How it runs
(seeds, baselines, Ray or this process, resources, device, batching) is one
:class:`RetrainOptions` value.

Each (cell, seed) run writes a checkpoint every epoch (:mod:`cellsearch.training.checkpoint`;
seeds trained together commit their files together); running the same retrain again into the
same output directory skips finished runs and resumes unfinished ones from their last
checkpoint, ending with the same result as an uninterrupted run (CPU). Jobs (one run, or a group of a
cell's seeds trained together; :func:`plan_jobs` splits groups so that the jobs fill the
executor's slots) go to Ray, one per task slot, through the search's executors
(:mod:`cellsearch.search.executors`), or run in this process. A run whose checkpoint cannot
be used comes back as a :class:`RunFailure`; the others finish, and the failures are one
error at the end.

The modules: :mod:`~cellsearch.retrain.plan` (cells, seeds, jobs, ``plan.json``),
:mod:`~cellsearch.retrain.run` (options, jobs on executors, checkpoints, failures) and
:mod:`~cellsearch.retrain.tables` (reading the output directory back, the tables and plots).

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

from cellsearch.retrain.plan import (
    DEFAULT_BASELINES, RetrainCell, RetrainJob, RetrainRun, baseline_cells, make_seeds, plan_jobs, resolve_source,
)
from cellsearch.retrain.run import RetrainOptions, RunFailure, retrain, run_job, settle_checkpoints
from cellsearch.retrain.tables import (
    RetrainResults, load_retrain, markdown_table, plot_curves, summary_markdown, write_outputs,
)
from cellsearch.tasks.presets import RetrainPreset, get_preset, load_presets, preset_names

__all__ = [
    "RetrainOptions", "RetrainPreset", "RetrainCell", "RetrainRun", "RetrainJob", "RetrainResults", "RunFailure",
    "load_presets", "get_preset", "preset_names", "resolve_source", "baseline_cells", "make_seeds", "plan_jobs",
    "run_job", "settle_checkpoints", "retrain", "load_retrain", "write_outputs", "markdown_table",
    "summary_markdown", "plot_curves", "DEFAULT_BASELINES",
]
