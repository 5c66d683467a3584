"""Executors run units of work and report completions as they come.

Both executors share one small interface, so the driver cannot tell them apart:

``submit(unit)``
    start a :class:`~cellsearch.search.units.UnitSpec`;
``wait(timeout)``
    block until at least one unit finished (or ``timeout`` seconds passed) and
    return the :class:`Completion` of every unit that finished;
``in_flight``, ``slots``, ``stop()``, ``close()``;
the written contract is :class:`Executor`.

:class:`RayExecutor` runs each unit as a Ray task with the configured CPU and
(fractional) GPU request, and ``max_retries`` so that a unit whose worker
process or node dies is re-run by Ray (system failures; Python exceptions
inside a unit are reported, not retried: they would fail again). Each task's
data set is put in the object store once and passed by reference.
:class:`SerialExecutor` runs units in the driver process, one per ``wait``,
for debugging and fast tests.

Attaching to a cluster (``--address`` or ``RAY_ADDRESS``) is bounded in time.
Ray 2.60's ``ray.init`` has no connection timeout: against an address where no
cluster runs, each of its 20 connection attempts waits about 40 s, so a typo
hangs for a quarter of an hour. :func:`check_cluster` therefore first connects
to the cluster's port (a refused or unreachable address fails at once) and then
asks the cluster's GCS for its id in a child process that is killed when
:data:`ATTACH_TIMEOUT_ENV` (``CELLSEARCH_RAY_ATTACH_TIMEOUT_S``, default 60)
seconds have passed; only then does ``ray.init`` run in this process. Failures
are :class:`ClusterUnreachable`: one line, exit status 2 in the CLI.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from cellsearch.errors import UserError
from cellsearch.search.config import ResourcesConfig
from cellsearch.search.units import UnitSpec, UnitStopped, run_unit, stoppable, worker_info

__all__ = ["Executor", "Completion", "SerialExecutor", "RayExecutor", "UnitFunction", "ClusterUnreachable",
           "check_cluster", "attach_timeout", "attaches", "embedded_on_loopback", "ATTACH_TIMEOUT_ENV",
           "DEFAULT_ATTACH_TIMEOUT_S"]

#: Environment variable: seconds that attaching to a Ray cluster may take before it fails (see the module docstring).
ATTACH_TIMEOUT_ENV = "CELLSEARCH_RAY_ATTACH_TIMEOUT_S"
DEFAULT_ATTACH_TIMEOUT_S = 60.0

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


@runtime_checkable
class Executor(Protocol):
    """What the search driver (and a fidelity study) needs from whatever runs its units.

    ``submit(unit)``
        Start the unit (or queue it) and return at once; never raises for a unit's own failure.
    ``wait(timeout)``
        Block until at least one submitted unit has finished, or ``timeout`` seconds have passed
        (``None``: no limit), and return a :class:`Completion` for every unit that finished, each
        exactly once; ``[]`` when none did (or nothing is in flight). A unit whose Python code raised
        comes back as ``Completion(error=<traceback>)`` and is not retried (it would fail again).
    ``stop()``
        "Stop now" (SIGTERM, a second Ctrl-C): called from a signal handler, so it only sets a flag
        and returns. Running units end as soon as they can (the serial executor: after the current
        training step) and are never reported; they stay pending in the database and re-run on resume.
        Idempotent; ``wait`` returns ``[]`` from then on.
    ``close()``
        Cancel what still runs and release the executor's resources (an embedded Ray instance).
    ``in_flight``, ``slots``
        Units submitted and not yet returned by ``wait``; units that can run at once.
    ``prepare(task_names)`` (optional)
        Load the tasks' data before the first unit.

    Failures. A worker process or node that dies (killed, out of host memory and reaped by the OOM
    killer, a lost node) is the system's failure, not the unit's: Ray re-runs the unit up to
    ``resources.max_retries`` times (``retry_exceptions=False``: only system failures are retried),
    and past that the unit comes back with ``system_failure=True``, which the driver resubmits a few
    times and otherwise leaves pending for ``resume``. A NaN or infinite loss is a result, never an
    exception: the setting comes back with ``status`` ``"diverged"`` and score 0. Running out of
    accelerator memory inside training is a result too: a batched group is retried one member at a
    time, and a member that still does not fit comes back with ``status`` ``"oom"`` and score 0.
    """

    slots: int

    @property
    def in_flight(self) -> int: ...

    def submit(self, unit: UnitSpec) -> None: ...

    def wait(self, timeout: float | None = None) -> list["Completion"]: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def _results_as_dicts(results: list) -> list[dict[str, Any]]:
    return [result.to_dict() if hasattr(result, "to_dict") else dict(result) for result in results]


def _execute(unit_function: UnitFunction, unit: UnitSpec, task) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The body of a unit on a worker: limit torch's threads to the unit's CPUs, train, describe the worker."""
    import torch

    torch.set_num_threads(max(1, unit.num_threads))
    results = unit_function(unit, task)
    return _results_as_dicts(results), worker_info()


class ClusterUnreachable(UserError, ConnectionError):
    """No Ray cluster answered at the address in time (a :class:`ConnectionError` too, as ``ray.init``'s own are)."""


def attaches(address: str | None) -> bool:
    """Whether a :class:`RayExecutor` with ``address`` attaches to a cluster (rather than starting its own Ray)."""
    return address is not None or bool(os.environ.get("RAY_ADDRESS"))


def attach_timeout() -> float:
    """Seconds that attaching may take: ``$CELLSEARCH_RAY_ATTACH_TIMEOUT_S``, else 60."""
    text = os.environ.get(ATTACH_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_ATTACH_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise UserError(f"${ATTACH_TIMEOUT_ENV} must be a number of seconds in (0, 86400], got {text[:40]!r}")
    return value


#: The child's check: the GCS answers with its cluster id (what ray.init asks first). A dead or foreign port
#: makes the constructor wait and fail; the parent's timeout kills the child first.
_GCS_PROBE = "import sys\nfrom ray._raylet import GcsClient\nGcsClient(address=sys.argv[1]).cluster_id\n"

#: Addresses whose cluster answered recently (monotonic time): ``search`` checks before creating its run
#: directory and the executor then attaches without asking twice.
_answered: dict[str, float] = {}


def _where(address: str | None) -> str:
    """The address as the user gave it, for messages."""
    if os.environ.get("RAY_ADDRESS"):
        return f"{os.environ['RAY_ADDRESS']} (RAY_ADDRESS)"
    return address or "auto"


def _target(address: str | None) -> tuple[str, int, bool]:
    """Host, port and whether it is a GCS (not a Ray Client ``ray://``) address, as ``ray.init`` would resolve it."""
    shown = _where(address)
    resolved = os.environ.get("RAY_ADDRESS") or address  # ray.init lets RAY_ADDRESS win, and so does this
    if resolved and resolved.startswith("ray://"):
        gcs, rest = False, resolved[len("ray://"):]
    else:
        from ray._private.services import canonicalize_bootstrap_address

        gcs = True
        try:
            rest = canonicalize_bootstrap_address(resolved)  # "auto": the cluster recorded on this machine
        except ConnectionError as error:
            raise ClusterUnreachable(f"no Ray cluster to attach to at {shown}: {str(error).splitlines()[0]}") from None
        except Exception as error:  # a malformed address
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: not a Ray address "
                                     f"({reason})") from None
        if rest is None:
            raise ClusterUnreachable(f"no Ray cluster to attach to at {shown}")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: not host:port")
    return host, int(port), gcs


def check_cluster(address: str | None, timeout: float | None = None) -> None:
    """Raise :class:`ClusterUnreachable` unless a Ray cluster answers at ``address`` (or ``RAY_ADDRESS``) in time.

    ``timeout`` defaults to :func:`attach_timeout`. See the module docstring for why this exists.
    """
    timeout = attach_timeout() if timeout is None else timeout
    shown = _where(address)
    key = f"{address}|{os.environ.get('RAY_ADDRESS', '')}"
    if time.monotonic() - _answered.get(key, -math.inf) < 60:
        return
    deadline = time.monotonic() + timeout
    host, port, gcs = _target(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: no answer from {host}:{port} "
                                 f"within {timeout:g} s (${ATTACH_TIMEOUT_ENV})") from None
    except OSError as error:
        raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: {host}:{port}: "
                                 f"{error.strerror or error}") from None
    if gcs:
        remaining = max(1.0, deadline - time.monotonic())
        try:
            probe = subprocess.run([sys.executable, "-c", _GCS_PROBE, f"{host}:{port}"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=remaining)
        except subprocess.TimeoutExpired:
            raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: {host}:{port} accepts connections "
                                     f"but no Ray GCS answered within {timeout:g} s (${ATTACH_TIMEOUT_ENV})") from None
        if probe.returncode != 0:
            lines = [line for line in probe.stderr.decode(errors="replace").splitlines() if line.strip()]
            reason = lines[-1].strip()[:200] if lines else f"exit status {probe.returncode}"
            raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: {host}:{port} did not answer as "
                                     f"a Ray cluster ({reason})")
    _answered[key] = time.monotonic()


class SerialExecutor:
    """Runs units in this process, in submission order, one per :meth:`wait`.

    :meth:`stop` (from a signal handler) ends the running unit after its current training step
    (:func:`cellsearch.search.units.stoppable`); it is not reported, and stays pending for resume.
    """

    slots = 1

    def __init__(self, load_task: Callable[[str], Any], unit_function: UnitFunction = run_unit):
        self._load_task = load_task
        self._unit_function = unit_function
        self._tasks: dict[str, Any] = {}
        self._queue: list[UnitSpec] = []
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

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
        if not self._queue or self._stopping:
            return []
        unit = self._queue.pop(0)
        if unit.task not in self._tasks:
            self._tasks[unit.task] = self._load_task(unit.task)
        try:
            with stoppable(lambda: self._stopping):
                results = _results_as_dicts(self._unit_function(unit, self._tasks[unit.task]))
        except UnitStopped:  # stop() during training: not a result; the unit stays pending
            self._queue.insert(0, unit)
            return []
        except Exception:  # a bad cell must not end the search; the driver records the error
            return [Completion(unit.unit_id, None, worker_info(), error=traceback.format_exc())]
        return [Completion(unit.unit_id, results, worker_info())]

    def close(self) -> None:
        self._queue.clear()


@contextmanager
def embedded_on_loopback() -> Iterator[None]:
    """Make the embedded Ray instance started inside this block listen on 127.0.0.1 only.

    Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, every core worker, the dashboard
    agent) to the node's IP address when that is a loopback address and to every interface otherwise,
    and the agents' HTTP servers (runtime env agent, Prometheus metrics export) likewise. ``ray.init``
    turns ``_node_ip_address="127.0.0.1"`` into the machine's outward address on Linux
    (``resolve_ip_for_localhost``); only where Ray thinks clusters are unsupported (macOS, Windows:
    ``ray_constants.ENABLE_RAY_CLUSTER`` false) does the node take the loopback address. A local
    instance is never joined by other nodes, so this block sets that flag for the start (a private Ray
    attribute: where it is missing the instance starts as before, token authentication still on).
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - a Ray without it: its own defaults
        yield
        return
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


class RayExecutor:
    """Runs units as Ray tasks; see the module docstring.

    ``address`` None starts an embedded local Ray instance with ``num_cpus``
    CPUs (all of the machine's when None; at least 1: a cluster without CPUs
    would never run a unit); ``"auto"`` or ``host:port`` attaches to a running
    cluster (``RAY_ADDRESS`` is honoured by ``ray.init`` itself) after
    :func:`check_cluster` has seen it answer.
    """

    def __init__(self, load_task: Callable[[str], Any], resources: ResourcesConfig, address: str | None = None,
                 num_cpus: int | None = None, unit_function: UnitFunction = run_unit):
        if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
            raise UserError(f"--workers must be at least 1, got {num_cpus!r}")
        import ray

        self._ray = ray
        self._started_ray = False
        if not ray.is_initialized():
            # ray.init replaces the driver's SIGTERM handler with one that exits at once (a C++ stack dump, exit
            # 134, when Ray's threads are busy); the caller's handler (the CLI's: a clean stop, exit 143) is put back
            in_main_thread = threading.current_thread() is threading.main_thread()
            previous_terminate = signal.getsignal(signal.SIGTERM) if in_main_thread else None
            if not attaches(address):
                # "local": a new instance even when another one on this machine is recorded in
                # /tmp/ray/ray_current_cluster (ray.init() without an address would attach to it).
                # On loopback only (see embedded_on_loopback): nothing of it is reachable from the network.
                with embedded_on_loopback():
                    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                             log_to_driver=True, configure_logging=False)
            else:
                check_cluster(address)  # ray.init itself would wait up to a quarter of an hour for a dead address
                ray.init(address=address, log_to_driver=True, configure_logging=False)
            self._started_ray = True
            if previous_terminate is not None:
                signal.signal(signal.SIGTERM, previous_terminate)
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

    def stop(self) -> None:
        """Stop now: nothing to do here (a signal handler calls it); :meth:`close` cancels the running tasks."""
        self._stopping = True

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
