"""The unit of work: one cell x one task x a group of hyperparameter settings.

:func:`run_unit` is everything a worker does: ``run_unit(unit, task) ->
list[TrainResult]``, one result per setting, in order. Settings of the same
shape (layers, width, dropout) train as one batched model
(:func:`cellsearch.training.groups.train_settings`; results equal training
them one after another up to rounding) unless the unit's ``batching`` config
switches it off. A :class:`UnitSpec` holds only plain data (the cell as a dict,
settings as dicts), so it pickles cheaply and means the same thing on every node.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from cellsearch.fidelity import HalvingConfig

__all__ = ["SettingSpec", "UnitSpec", "run_unit", "worker_info", "UnitStopped", "stoppable"]


class UnitStopped(BaseException):
    """Raised between two training steps of a unit whose executor was told to stop now (SIGTERM, a second Ctrl-C).

    A BaseException: the training loop's own handlers (out of memory, divergence) must not take it for a result.
    """


#: While a unit runs in this process under :func:`stoppable`: asked after every training step.
_stop_check: Callable[[], bool] | None = None


@contextmanager
def stoppable(check: Callable[[], bool]) -> Iterator[None]:
    """Units run inside raise :class:`UnitStopped` after the first training step at which ``check()`` is true."""
    global _stop_check
    previous, _stop_check = _stop_check, check
    try:
        yield
    finally:
        _stop_check = previous


def _after_step(event: Mapping[str, Any]) -> None:
    check = _stop_check
    if check is not None and check():
        raise UnitStopped


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
    batching: Mapping[str, Any] = field(default_factory=dict)  # BatchingConfig keys; empty: its defaults
    #: Budget keys that replace the profile's budget wholesale (a fidelity study's budgets); None: the profile's.
    budget: Mapping[str, Any] | None = None
    #: HalvingConfig keys (successive halving over the settings); None or empty: its defaults (off).
    halving: Mapping[str, Any] | None = None


def run_unit(unit: UnitSpec, task) -> list:
    """Train every setting of ``unit`` on ``task`` (a :class:`cellsearch.tasks.Task`); one TrainResult each.

    Same-shape settings train as one batched model unless ``unit.batching`` switches it off (see
    :func:`cellsearch.training.groups.train_settings`); ``unit.halving`` may prune settings rung by
    rung (successive halving, :mod:`cellsearch.training.halving`).
    """
    from cellsearch.batching import BatchingConfig
    from cellsearch.hparams import HyperParams
    from cellsearch.spec import CellSpec
    from cellsearch.tasks.base import Budget
    from cellsearch.training import GroupMember, train_settings

    spec = CellSpec.from_dict(dict(unit.cell))
    budget = task.budget(unit.budget_profile) if unit.budget is None else Budget.from_dict(dict(unit.budget))
    members = [GroupMember(HyperParams.from_dict(setting.hparams), setting.seed) for setting in unit.settings]
    # the progress hook only where a stop can be asked for (the serial executor): Ray workers train unhooked
    progress = _after_step if _stop_check is not None else None
    return train_settings(spec, task, members, budget, device=unit.device, num_threads=unit.num_threads,
                          config=BatchingConfig.from_dict(dict(unit.batching)), progress=progress,
                          halving=HalvingConfig.from_dict(unit.halving))


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
