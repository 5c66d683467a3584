"""Retrain presets: the ``retrain_presets`` block of a task file, one setting and one budget each.

They sit in ``tasks/TASK.yaml`` beside the task's profiles (``tiny`` and ``quick`` for every task;
``zaremba_small``, ``zaremba_medium``, ``gal_medium`` (variational dropout) and ``quick_regularised``
(variational dropout and layer normalisation) for ptb) and are checked when the task file is read
(:class:`~cellsearch.tasks.base.RetrainPreset`); ``cellsearch retrain --preset NAME`` picks one.
"""

from __future__ import annotations

from cellsearch.errors import UserError
from cellsearch.tasks import task_path
from cellsearch.tasks.base import RetrainPreset, load_task_file

__all__ = ["RetrainPreset", "load_presets", "get_preset", "preset_names"]


def load_presets(task_name: str) -> dict[str, RetrainPreset]:
    """The retrain presets of a task (a task name or a task file path), checked; a task without any is an error."""
    path = task_path(task_name)
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
