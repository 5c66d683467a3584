"""Executors run units of work and report completions as they come.

Both executors share one small interface, so the driver cannot tell them apart:

``submit(unit)``
    start a :class:`~cellsearch.search.units.UnitSpec`;
``wait(timeout)``
    block until at least one unit finished (or ``timeout`` seconds passed) and
    return the :class:`Completion` of every unit that finished;
``in_flight``, ``slots``, ``close()``.

:class:`RayExecutor` runs each unit as a Ray task with the configured CPU and
(fractional) GPU request, and ``max_retries`` so that a unit whose worker
process or node dies is re-run by Ray (system failures; Python exceptions
inside a unit are reported, not retried: they would fail again). Each task's
data set is put in the object store once and passed by reference.
:class:`SerialExecutor` runs units in the driver process, one per ``wait``,
for debugging and fast tests.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from cellsearch.search.config import ResourcesConfig
from cellsearch.search.units import UnitSpec, run_unit, worker_info

__all__ = ["Completion", "SerialExecutor", "RayExecutor", "UnitFunction"]

#: ``run_unit`` or a function with its signature (tests substitute one that records its pid).
UnitFunction = Callable[[UnitSpec, Any], list]


@dataclass
class Completion:
    """A finished unit: one result dict per setting (``TrainResult.to_dict()``), or an error."""

    unit_id: int
    results: list[dict[str, Any]] | None
    worker: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: True when the failure was the system's (worker or node lost after every retry), not the unit's.
    system_failure: bool = False


def _results_as_dicts(results: list) -> list[dict[str, Any]]:
    return [result.to_dict() if hasattr(result, "to_dict") else dict(result) for result in results]


def _execute(unit_function: UnitFunction, unit: UnitSpec, task) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The body of a unit on a worker: limit torch's threads to the unit's CPUs, train, describe the worker."""
    import torch

    torch.set_num_threads(max(1, unit.num_threads))
    results = unit_function(unit, task)
    return _results_as_dicts(results), worker_info()


class SerialExecutor:
    """Runs units in this process, in submission order, one per :meth:`wait`."""

    slots = 1

    def __init__(self, load_task: Callable[[str], Any], unit_function: UnitFunction = run_unit):
        self._load_task = load_task
        self._unit_function = unit_function
        self._tasks: dict[str, Any] = {}
        self._queue: list[UnitSpec] = []

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def prepare(self, task_names) -> None:
        """Load the tasks before the search starts."""
        for name in task_names:
            self._tasks.setdefault(name, self._load_task(name))

    def submit(self, unit: UnitSpec) -> None:
        self._queue.append(unit)

    def wait(self, timeout: float | None = None) -> list[Completion]:
        if not self._queue:
            return []
        unit = self._queue.pop(0)
        if unit.task not in self._tasks:
            self._tasks[unit.task] = self._load_task(unit.task)
        try:
            results = _results_as_dicts(self._unit_function(unit, self._tasks[unit.task]))
        except Exception:  # a bad cell must not end the search; the driver records the error
            return [Completion(unit.unit_id, None, worker_info(), error=traceback.format_exc())]
        return [Completion(unit.unit_id, results, worker_info())]

    def close(self) -> None:
        self._queue.clear()


class RayExecutor:
    """Runs units as Ray tasks; see the module docstring.

    ``address`` None starts an embedded local Ray instance with ``num_cpus``
    CPUs (all of the machine's when None); ``"auto"`` or ``host:port`` attaches to
    a running cluster (``RAY_ADDRESS`` is honoured by ``ray.init`` itself).
    """

    def __init__(self, load_task: Callable[[str], Any], resources: ResourcesConfig, address: str | None = None,
                 num_cpus: int | None = None, unit_function: UnitFunction = run_unit):
        import os

        import ray

        self._ray = ray
        self._started_ray = False
        if not ray.is_initialized():
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # "local": a new instance even when another one on this machine is recorded in
                # /tmp/ray/ray_current_cluster (ray.init() without an address would attach to it).
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=True, configure_logging=False)
            self._started_ray = True
        self._resources = resources
        self._load_task = load_task
        self._unit_function = unit_function
        self._task_refs: dict[str, Any] = {}
        self._pending: dict[Any, int] = {}
        self._remote = ray.remote(_execute).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=resources.max_retries,
            retry_exceptions=False)

    @property
    def slots(self) -> int:
        """Units the cluster can run at once, by its CPU (and GPU) totals."""
        totals = self._ray.cluster_resources()
        by_cpu = math.floor(totals.get("CPU", 1) / self._resources.num_cpus)
        if self._resources.num_gpus > 0:
            by_cpu = min(by_cpu, math.floor(totals.get("GPU", 0) / self._resources.num_gpus))
        return max(1, by_cpu)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def task_ref(self, name: str):
        """The object-store reference of a task's data, put there on first use only."""
        if name not in self._task_refs:
            self._task_refs[name] = self._ray.put(self._load_task(name))
        return self._task_refs[name]

    def prepare(self, task_names) -> None:
        """Put every task's data in the object store before the search starts."""
        for name in task_names:
            self.task_ref(name)

    def submit(self, unit: UnitSpec) -> None:
        ref = self._remote.remote(self._unit_function, unit, self.task_ref(unit.task))
        self._pending[ref] = unit.unit_id

    def wait(self, timeout: float | None = None) -> list[Completion]:
        if not self._pending:
            if timeout:
                time.sleep(min(timeout, 0.05))
            return []
        ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        if ready:
            # Collect everything else that is already done, without waiting.
            more, _ = self._ray.wait([r for r in self._pending if r not in ready], num_returns=len(self._pending)
                                     - len(ready), timeout=0) if len(self._pending) > len(ready) else ([], [])
            ready = list(ready) + list(more)
        completions = []
        for ref in ready:
            unit_id = self._pending.pop(ref)
            try:
                results, worker = self._ray.get(ref)
                completions.append(Completion(unit_id, results, worker))
            except self._ray.exceptions.RayTaskError as error:
                # A Ctrl-C in the terminal also reaches the workers: that unit was stopped, it did not fail.
                interrupted = isinstance(getattr(error, "cause", None), KeyboardInterrupt)
                completions.append(Completion(unit_id, None, {}, error=str(error), system_failure=interrupted))
            except self._ray.exceptions.RayError as error:
                completions.append(Completion(unit_id, None, {}, error=f"{type(error).__name__}: {error}",
                                              system_failure=True))
        return completions

    def close(self) -> None:
        """Cancel what is still running and, if this executor started Ray, shut it down."""
        for ref in list(self._pending):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # already finished or its worker is gone: nothing to cancel
                pass
        self._pending.clear()
        if self._started_ray:
            self._ray.shutdown()
