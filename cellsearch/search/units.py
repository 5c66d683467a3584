"""The unit of work: one cell x one task x a group of hyperparameter settings.

:func:`run_unit` is everything a worker does. It trains the unit's settings
one after another today; a later version may train the whole group as one
batched model behind the same interface (``run_unit(unit, task) ->
list[TrainResult]``, one result per setting, in order). A :class:`UnitSpec`
holds only plain data (the cell as a dict, settings as dicts), so it pickles
cheaply and means the same thing on every node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["SettingSpec", "UnitSpec", "run_unit", "worker_info"]


@dataclass(frozen=True)
class SettingSpec:
    """One hyperparameter setting of a unit: its Optuna trial number, values and training seed."""

    trial_number: int
    hparams: Mapping[str, Any]
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"trial_number": self.trial_number, "hparams": dict(self.hparams), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SettingSpec":
        return cls(int(data["trial_number"]), dict(data["hparams"]), int(data["seed"]))


@dataclass(frozen=True)
class UnitSpec:
    """What a worker needs to train one group of settings of one cell on one task."""

    unit_id: int
    cell: Mapping[str, Any]
    task: str
    budget_profile: str
    settings: tuple[SettingSpec, ...]
    device: str = "cpu"
    num_threads: int = 1


def run_unit(unit: UnitSpec, task) -> list:
    """Train every setting of ``unit`` on ``task`` (a :class:`cellsearch.tasks.Task`); one TrainResult each."""
    from cellsearch.hparams import HyperParams
    from cellsearch.spec import CellSpec
    from cellsearch.training import train_and_evaluate

    spec = CellSpec.from_dict(dict(unit.cell))
    budget = task.budget(unit.budget_profile)
    return [
        train_and_evaluate(spec, task, HyperParams.from_dict(setting.hparams), budget, setting.seed,
                           device=unit.device, num_threads=unit.num_threads)
        for setting in unit.settings
    ]


def worker_info() -> dict[str, Any]:
    """Where a unit ran: Ray node id (when under Ray), host name and process id."""
    node_id = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return {"node_id": node_id or "local", "hostname": socket.gethostname(), "worker_pid": os.getpid()}
