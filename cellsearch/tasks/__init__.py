"""Tasks: memorize (the filter), arithmetic, xml and ptb, each defined by ``tasks/NAME.yaml``.

``get_task(name, data_dir=None)`` returns a :class:`~cellsearch.tasks.base.Task`
(vocabulary, train/valid/test token streams with scored-target masks, model
shape, metric, hyperparameter space, budget profiles). ``name`` is a task in
the task directory (``tasks/`` at the repository root, or
``$CELLSEARCH_TASKS_DIR``) or a path to a task file. Tasks are cached per
process: building the generated streams or reading PTB happens once.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

from cellsearch.errors import UserError
from cellsearch.tasks.base import PROFILES, Budget, Split, Task, TaskFile, load_task_file

__all__ = ["get_task", "task_names", "tasks_dir", "task_path", "Task", "Budget", "Split", "TaskFile", "PROFILES"]

_REPO_TASKS = Path(__file__).resolve().parents[2] / "tasks"


def tasks_dir() -> Path:
    """Where task files live: ``$CELLSEARCH_TASKS_DIR`` or ``tasks/`` beside the package."""
    return Path(os.environ.get("CELLSEARCH_TASKS_DIR", _REPO_TASKS))


def task_names() -> tuple[str, ...]:
    """Names of the task files in :func:`tasks_dir`."""
    return tuple(sorted(p.stem for p in tasks_dir().glob("*.yaml")))


def task_path(name: str) -> Path:
    """The task file of ``name``: a task in :func:`tasks_dir`, or a task file path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = tasks_dir() / f"{name}.yaml"
    if not candidate.is_file():
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(task_names())} (or give a task file path)")
    return candidate


@functools.lru_cache(maxsize=16)
def _load(path: Path, data_dir: str | None) -> Task:
    definition = load_task_file(path)
    module = importlib.import_module(f"cellsearch.tasks.{definition.kind}")
    return module.build(definition, data_dir)


def get_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """The task ``name`` (a task in :func:`tasks_dir` or a task file path); ``data_dir`` is for ptb."""
    return _load(task_path(name).resolve(), None if data_dir is None else str(data_dir))
