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
are :class:`ClusterUnreachable`: one line, exit status 2 in the CLI. A cluster that refuses this
machine's Ray token (Ray 2.60's ``ray start --head`` turns token authentication on wherever a token
exists) says so, with the fix (``RAY_AUTH_MODE=token`` and the cluster's token).

Checking the nodes. Attached to a cluster, a :class:`RayExecutor` first runs a small check task on every
node that can run units (:meth:`RayExecutor.check_nodes`): its workers must import the same cellsearch
as the driver (version and a fingerprint of the package's source), and directories the caller names
(a retrain's ``--out``) must be the same directory there (a marker file the driver wrote is read back).
(It imports torch too, which cellsearch imports only when it trains.) A node that fails is named in one
:class:`NodeCheckFailed` line before anything is created. The data
sets need not be on the workers: the driver reads them and puts them in the object store.

Environment failures. A unit that fails because of where it ran, not because of its cell (its worker
cannot import cellsearch or one of its dependencies, so that even its arguments cannot be unpickled) is
the system's failure: it comes back with ``system_failure=True`` (the driver submits it again, never
records it as the cell's result), and after :data:`ENVIRONMENT_FAILURES_TO_STOP` such failures the
next ``wait`` raises :class:`ClusterBroken`, which stops the search with one line; the units stay
pending for ``resume``.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from cellsearch.errors import UserError
from cellsearch.search.config import ResourcesConfig
from cellsearch.search.units import UnitSpec, UnitStopped, run_unit, stoppable, worker_info

__all__ = ["Executor", "Completion", "SerialExecutor", "RayExecutor", "UnitFunction", "ClusterUnreachable",
           "NodeCheckFailed", "ClusterBroken", "check_cluster", "attach_timeout", "attaches", "embedded_on_loopback",
           "package_fingerprint", "ATTACH_TIMEOUT_ENV", "DEFAULT_ATTACH_TIMEOUT_S", "ENVIRONMENT_FAILURES_TO_STOP"]

#: Environment variable: seconds that attaching to a Ray cluster may take before it fails (see the module docstring).
ATTACH_TIMEOUT_ENV = "CELLSEARCH_RAY_ATTACH_TIMEOUT_S"
DEFAULT_ATTACH_TIMEOUT_S = 60.0
#: Units failed for environmental reasons (see the module docstring) after which ``wait`` stops the caller: by then
#: the driver has submitted a unit three times, and the cluster, not the unit, is what is wrong.
ENVIRONMENT_FAILURES_TO_STOP = 3

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
    times and otherwise leaves pending for ``resume``. So does a unit that failed because of its worker's
    environment (it cannot import cellsearch or a dependency: :class:`RayExecutor` reports it with
    ``system_failure=True``, and past a few such failures its ``wait`` raises :class:`ClusterBroken`); such a
    failure is never the cell's result. A NaN or infinite loss is a result, never an
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


class NodeCheckFailed(UserError):
    """A node that would run units cannot: cellsearch missing or another version there, or a directory not shared."""


class ClusterBroken(UserError):
    """Units keep failing because of where they run (see the module docstring); the search stops, work is safe."""

    #: Exit status of ``cellsearch search``/``resume`` stopped by it (EX_UNAVAILABLE).
    exit_status = 69


#: Text of Ray's refusals of a client without the cluster's token (Ray 2.60: ``AuthenticationError``,
#: ``InvalidAuthToken``; a missing token file aborts the client with a failed check naming the token).
_AUTH_MARKERS = ("authenticationerror", "invalidauthtoken", "authentication token", "auth_token",
                 "ray_auth_token")


def _authentication_problem(text: str) -> str | None:
    """The one-line cause and fix when ``text`` (a failed connection's output) is a token refusal, else None."""
    if not any(marker in text.lower() for marker in _AUTH_MARKERS):
        return None
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return ("the cluster requires Ray token authentication (`ray start --head` turns it on wherever a token "
                "exists); export RAY_AUTH_MODE=token here (and on every node) with the cluster's token in "
                "~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN")
    if "no authentication token was found" in text.lower() or "cannot be opened or is empty" in text.lower():
        return ("RAY_AUTH_MODE=token is set but no Ray token was found here; copy the cluster's token (the head "
                "node's ~/.ray/auth_token) to ~/.ray/auth_token, or point $RAY_AUTH_TOKEN_PATH at it")
    return ("the cluster refused this machine's Ray token (authentication failed); use the head node's token "
            "(its ~/.ray/auth_token) in ~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN")


def _probe_reason(stderr: str, returncode: int) -> str:
    """The informative line of a failed probe: Ray's failed check or the exception, not a stack frame."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "Check failed:" in line:
            return line.split("Check failed:", 1)[1].strip()[:200]
    exceptions = [line for line in lines if not line.startswith(("File ", "^", "/", "@", "***"))
                  and ("Error" in line or "Exception" in line)]
    chosen = exceptions[-1] if exceptions else (lines[-1] if lines else f"exit status {returncode}")
    return chosen[:200]


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

#: The check task run on every node (see :meth:`RayExecutor.check_nodes`). Source compiled into a module name no
#: worker can import, so that cloudpickle ships it by value: it must run where cellsearch is missing, or another
#: version. It fingerprints the package the way the driver does (the same function, :func:`package_fingerprint`).
_NODE_CHECK_SOURCE = '''
def package_fingerprint(directory):
    """The first 12 hex digits of a SHA-256 over the relative paths and bytes of the package's .py files."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(name for name in dirs if name != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, directory).replace(os.sep, "/").encode() + b"\\0")
                with open(path, "rb") as handle:
                    digest.update(handle.read())
                digest.update(b"\\0")
    return digest.hexdigest()[:12]


def node_check(markers):
    import os
    import platform
    import socket
    import sys

    report = {"hostname": socket.gethostname(), "python": sys.executable,
              "python_version": platform.python_version(), "markers": {}}
    try:
        import cellsearch

        report["version"] = getattr(cellsearch, "__version__", "unknown")
        report["source"] = package_fingerprint(os.path.dirname(os.path.abspath(cellsearch.__file__)))
        import torch  # noqa: F401  (cellsearch imports it lazily: a node without it would fail every unit)
    except Exception as error:
        report["error"] = type(error).__name__ + ": " + str(error).splitlines()[0][:200] if str(error) else \
            type(error).__name__
    for path in markers:
        try:
            with open(path, encoding="utf-8") as handle:
                report["markers"][path] = handle.read()
        except OSError:
            report["markers"][path] = None
    return report
'''
_node_check_namespace: dict[str, Any] = {"__name__": "_cellsearch_node_check"}
exec(compile(_NODE_CHECK_SOURCE, "<cellsearch node check>", "exec"), _node_check_namespace)
_node_check: Callable[[list[str]], dict[str, Any]] = _node_check_namespace["node_check"]
package_fingerprint: Callable[[str], str] = _node_check_namespace["package_fingerprint"]


def _driver_package() -> tuple[str, str]:
    """This process's cellsearch version and source fingerprint: what every node must run."""
    import cellsearch

    return cellsearch.__version__, package_fingerprint(os.path.dirname(os.path.abspath(cellsearch.__file__)))


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
            stderr = probe.stderr.decode(errors="replace")
            authentication = _authentication_problem(stderr)
            if authentication is not None:  # Ray's own message comes as 20 lines; this is the one that matters
                raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: {authentication}")
            raise ClusterUnreachable(f"cannot attach to the Ray cluster at {shown}: {host}:{port} did not answer as "
                                     f"a Ray cluster ({_probe_reason(stderr, probe.returncode)})")
    _answered[key] = time.monotonic()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _node_name(node: Mapping[str, Any], hostname: str | None = None) -> str:
    """A Ray node for messages: address, host name and the start of its id (nodes on one machine share an address)."""
    host = hostname or node.get("NodeManagerHostname") or "?"
    return f"node {node.get('NodeManagerAddress', '?')} ({host}, id {str(node.get('NodeID', '?'))[:8]})"


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
    :func:`check_cluster` has seen it answer, and then checks its nodes
    (:meth:`check_nodes`, with ``shared_directories``) unless ``check_nodes`` is
    False; a failed check disconnects again and raises :class:`NodeCheckFailed`.
    """

    def __init__(self, load_task: Callable[[str], Any], resources: ResourcesConfig, address: str | None = None,
                 num_cpus: int | None = None, unit_function: UnitFunction = run_unit, check_nodes: bool = True,
                 shared_directories: Sequence[str | os.PathLike] = ()):
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
        self._environment_failures = 0
        self._broken: ClusterBroken | None = None
        self._remote = ray.remote(_execute).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=resources.max_retries,
            retry_exceptions=False)
        if check_nodes and attaches(address):
            try:
                self.check_nodes(shared_directories)
            except BaseException:
                if self._started_ray:
                    ray.shutdown()
                raise

    def _unit_nodes(self) -> list[dict[str, Any]]:
        """The live nodes that can run a unit (enough CPUs, and GPUs when units ask for them)."""
        cpus, gpus = self._resources.num_cpus, self._resources.num_gpus
        return [node for node in self._ray.nodes() if node.get("Alive")
                and node.get("Resources", {}).get("CPU", 0) >= cpus
                and (gpus <= 0 or node.get("Resources", {}).get("GPU", 0) >= gpus)]

    def check_nodes(self, shared_directories: Sequence[str | os.PathLike] = ()) -> None:
        """Run a check task on every node that can run units; raise :class:`NodeCheckFailed` naming those that fail.

        A node fails when its workers cannot import cellsearch, import another version of it (version or
        source fingerprint differ from this process's), do not run the task within :func:`attach_timeout`
        seconds, or do not see a marker file this process wrote into each of ``shared_directories`` (a
        directory that is not shared: what the node writes there would stay on that node).
        """
        import uuid

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self._ray
        nodes = self._unit_nodes()
        if not nodes:
            return
        version, source = _driver_package()
        token = uuid.uuid4().hex
        markers: dict[str, str] = {}
        problems: list[str] = []
        unshared: list[str] = []
        timeout = attach_timeout()
        try:
            for directory in shared_directories:
                marker = Path(directory).resolve() / f".cellsearch-shared-{token}"
                marker.write_text(token, encoding="utf-8")
                markers[str(marker)] = str(Path(directory).resolve())
            check = ray.remote(num_cpus=0, max_retries=0)(_node_check)
            refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                    .remote(list(markers)): node for node in nodes}
            ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
            for ref in late:
                problems.append(f"{_node_name(refs[ref])} ran no check task within {timeout:g} s "
                                f"(${ATTACH_TIMEOUT_ENV})")
                ray.cancel(ref, force=True)
            for ref in ready:
                node = refs[ref]
                try:
                    report = ray.get(ref)
                except ray.exceptions.RayError as error:
                    problems.append(f"{_node_name(node)}: its check task failed ({_first_line(error)})")
                    continue
                where = f"{_node_name(node, report.get('hostname'))}"
                if "error" in report:
                    problems.append(f"{where}: its workers ({report['python']}) cannot import "
                                    f"{'torch' if 'version' in report else 'cellsearch'} ({report['error']})")
                elif (report["version"], report["source"]) != (version, source) and \
                        (report["version"], report["source"]) != _driver_package():  # read again: edited meanwhile
                    problems.append(f"{where}: its workers run cellsearch {report['version']} (source "
                                    f"{report['source']}), this driver {version} (source {source})")
                for marker, directory in markers.items():
                    if report["markers"].get(marker) != token:
                        unshared.append(f"{where} does not see {directory} (it is not shared with this machine: "
                                        f"what the node writes there would stay on the node)")
        finally:
            for marker in markers:
                Path(marker).unlink(missing_ok=True)
        if problems:
            shown = "; ".join(problems[:2]) + (f"; and {len(problems) - 2} more" if len(problems) > 2 else "")
            raise NodeCheckFailed(f"{len(problems)} of {len(nodes)} Ray nodes cannot run units: {shown}; every node "
                                  f"needs cellsearch {version} (source {source}) installed in the Python its "
                                  f"`ray start` ran with (or remove the node)")
        if unshared:
            shown = "; ".join(unshared[:2]) + (f"; and {len(unshared) - 2} more" if len(unshared) > 2 else "")
            raise NodeCheckFailed(f"{shown}; give a directory every node mounts at the same path (NFS or similar), "
                                  f"or run without --address")

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
        if self._broken is not None:
            raise self._broken
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
                environment = self._environment_failure(error)
                if environment is not None:
                    # where it ran, not the cell: never a result; the driver submits it again (maybe elsewhere)
                    completions.append(Completion(unit_id, None, {}, error=environment, system_failure=True))
                    continue
                # A Ctrl-C in the terminal also reaches the workers: that unit was stopped, it did not fail.
                interrupted = isinstance(getattr(error, "cause", None), KeyboardInterrupt)
                completions.append(Completion(unit_id, None, {}, error=str(error), system_failure=interrupted))
            except self._ray.exceptions.RayError as error:
                completions.append(Completion(unit_id, None, {}, error=f"{type(error).__name__}: {error}",
                                              system_failure=True))
        return completions

    @property
    def broken(self) -> ClusterBroken | None:
        """The :class:`ClusterBroken` that the next :meth:`wait` raises (a caller that stops waiting asks here)."""
        return self._broken

    def _environment_failure(self, error) -> str | None:
        """A one-line description when a unit's task failed because of its worker's environment, else None.

        Ray reports a task whose arguments could not be unpickled on the worker (the worker cannot import
        cellsearch or a dependency) as a :class:`~ray.exceptions.RaySystemError` cause; an ImportError raised
        while the unit ran is the same kind of failure (a package missing on that node). Each counts towards
        :data:`ENVIRONMENT_FAILURES_TO_STOP`, after which the next :meth:`wait` raises :class:`ClusterBroken`.
        """
        cause = getattr(error, "cause", None)
        if not isinstance(cause, (ImportError, self._ray.exceptions.RaySystemError)):
            return None
        # Ray's error keeps where it ran only in its text ("ray::_execute() (pid=123, ip=10.0.0.2)"): the instance it
        # raises (a subclass of the cause too) forwards attribute reads to the cause
        origin = re.search(r"\(pid=(\d+), ip=([^)\s]+)\)", str(error))
        where = f"the node at {origin.group(2)} (worker pid {origin.group(1)})" if origin else "a node"
        reason = _first_line(cause).removeprefix("System error: ")
        self._environment_failures += 1
        line = f"environment failure on {where}: {reason}"
        if self._environment_failures >= ENVIRONMENT_FAILURES_TO_STOP and self._broken is None:
            self._broken = ClusterBroken(
                f"{self._environment_failures} units could not run because of their node's environment, not their "
                f"cell (last: {line}); every node needs cellsearch and its dependencies as on this machine")
        return line

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
