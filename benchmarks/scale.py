"""The driver at paper scale: a simulated thousand-worker search, on SQLite and PostgreSQL.

    python benchmarks/scale.py dispatch [--backends sqlite postgresql] [--quick] [--out results/scale]
    python benchmarks/scale.py reads ...        # benchmarks/scale_reads.py (the read side)

What is real and what is simulated. ``dispatch`` runs the real :class:`~cellsearch.search.driver.SearchDriver`
(created by :func:`cellsearch.search.run.create_run`, so with the real ``RunStorage``, the real Optuna studies in
the same database, the real mutation engine, deduplicator and population policy) on
``search_configs/small.yaml`` (``max_wall_clock_s`` off, ``max_steps`` 10^9; the run is stopped by the
benchmark). Only the executor is simulated (:class:`SimulatedExecutor`, which implements the
:class:`~cellsearch.search.executors.Executor` protocol and never trains): nothing of Ray or torch is mocked,
neither is used.

Results model. Each setting of a unit gets a result resampled from the committed one-hour search
``results/small-cal/archive`` (``load_run(...).evaluations()``, plus the archived learning curves and metrics):
a row drawn uniformly from the real rows of the same task, so the real mix of statuses (diverged included),
scores, learning curves (same JSON sizes) and durations. Draws depend only on ``--seed`` and the unit id.

Durations. ``--durations measured`` (default): a unit lasts the sum of its settings' resampled real durations,
scaled so that the archive's mean setting duration becomes the requested mean ``D`` (the real shape: short
diverged runs, long PTB ones); ``--durations fixed``: every unit lasts exactly ``D``.

Virtual clock: the model. ``N`` simulated workers; a submitted unit starts at once on a free worker or waits in
the executor's queue (as Ray's queue holds the driver's backlog: the driver keeps up to ``2 N`` units in
flight) and starts the moment a worker frees. Time is virtual: ``wait`` jumps to the next finishing unit (or
by its ``timeout``, 0.5 s, when none finishes earlier: the driver's loop then runs again, as it does with Ray).
The driver's own work is real and charged: **while the driver computes for d seconds of CPU (process_time of
this process, measured between two executor calls), d seconds of virtual time pass**, during which workers
keep training and finish units that the driver only hears about at its next ``wait``. So a driver that needs
c CPU seconds per unit keeps N workers with D-second units busy only while c < D / N (then it is c N / D busy);
above that the backlog drains and workers starve. The executor's own bookkeeping (and the memory sampling)
is not charged. PostgreSQL runs in other processes, and the driver waits for it synchronously: with
``--clock cpu+server`` (the default) the CPU the server's backends for this database used (read from
/proc/<pid>/stat, 10 ms ticks, the server being on this machine) is charged as well, as if the server had
its own cores and answered at once; ``--clock cpu`` charges the driver's CPU only. Not modelled: Ray's own
per-task cost in the driver (``ray.wait``, object refs), and network latency to the server (here the
loopback; on a LAN add about (round trips per unit) x (round-trip time)). The machine was shared (2 cores, a
search and another benchmark running): driver costs are given in CPU seconds; wall-clock rates are given
beside them and are pessimistic.

What it reports (``results/scale/dispatch.md`` and CSVs):

- **saturation**: zero-duration units on N = 100 workers (``--saturation-workers``; the driver is the only
  bottleneck, each ``wait`` returns the up to 2 N units in flight): units committed
  per driver CPU second (1 / CPU per unit) and per wall second; median of ``--repeats`` runs;
- **CPU per unit by part**, measured by wrapping the functions of each part in ``time.process_time`` timers
  that keep *exclusive* time (a part called inside another is charged to the inner part only): ``mutation``
  (``cellsearch.mutation.mutate``), ``dedup`` (``Deduplicator``), ``optuna`` (every ``Study`` method,
  ``create_study``/``load_study``, ``sample_settings`` and every method of Optuna's ``RDBStorage`` and its
  cache: ask, tell, the driver's direct storage calls), ``storage_writes`` / ``storage_reads``
  (``RunStorage`` methods), ``population`` (``PopulationPolicy``, scores, the progress report), ``other``
  (everything else of the driver's loop: planning, JSON, spec parsing, the wrappers' own overhead);
- **worker idle fraction** for N in {10, 100, 1000} and D in {10, 60, 600} s, in the steady state: from the
  first moment every worker was busy (or one D after the first non-seed unit, if that never happens) to the
  end, the run being stopped after ``max(N, 300)`` (``--quick``) or ``max(3 N, 400)`` completions in that
  window. The driver's backlog (up to N queued units) hides a slow driver for about one D, so each row also
  gives the window's charged driver cost per unit c, the driver's busy fraction c N / D, and the long-run
  idle fraction it implies once the backlog is drained, max(0, 1 - D / (N c));
- **memory**: RSS (/proc/self/statm) and optionally ``tracemalloc`` against evaluations stored, in a long
  zero-duration run (``--long-units``);
- **database size**: the SQLite file (with its WAL) or ``pg_database_size``.

PostgreSQL: the server URL is read from ``--pg-url`` or /tmp/pgurl.txt (``.ci/postgres.sh``); each run gets its
own database ``scale_dispatch_<tag>``, created and dropped by the benchmark.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import heapq
import json
import os
import platform
import random
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "results" / "small-cal" / "archive"
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the results model -----------------------------------------------------------------------------------------

class ArchiveModel:
    """Real per-task evaluation rows of a committed run, resampled (see the module docstring)."""

    def __init__(self, archive: Path = ARCHIVE):
        from cellsearch.results import load_run

        run = load_run(archive)
        try:
            evaluations = run.evaluations()
        finally:
            run.close()
        extra = {}
        with sqlite3.connect(f"file:{archive / 'run.db'}?mode=ro", uri=True) as connection:
            for row_id, metrics, curve in connection.execute(
                    "SELECT id, metrics_json, curve_json FROM cs_evaluations"):
                extra[int(row_id)] = (json.loads(metrics or "{}"), json.loads(curve or "[]"))
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in evaluations.to_dict("records"):
            metrics, curve = extra.get(int(row["id"]), ({}, []))
            duration = float(row["duration_s"]) if row["duration_s"] == row["duration_s"] else 0.0
            self.rows[row["task"]].append({
                "score": float(row["metric"]), "status": str(row["status"]), "duration_s": duration,
                "steps": None if row["train_steps"] != row["train_steps"] else int(row["train_steps"]),
                "epochs": None if row["epochs"] != row["epochs"] else float(row["epochs"]),
                "metrics": metrics, "curve": curve})
        durations = [r["duration_s"] for rows in self.rows.values() for r in rows]
        self.mean_duration = sum(durations) / len(durations)

    def statuses(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for task, rows in self.rows.items():
            for row in rows:
                out.setdefault(task, {}).setdefault(row["status"], 0)
                out[task][row["status"]] += 1
        return out

    def draw(self, task: str, rng: random.Random) -> dict[str, Any]:
        rows = self.rows.get(task) or self.rows["memorize"]
        return rng.choice(rows)


# -- the simulated executor ------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class SimulatedExecutor:
    """N simulated workers on a virtual clock (see the module docstring); implements the Executor protocol."""

    def __init__(self, slots: int, model: ArchiveModel, mean_duration: float, durations: str = "measured",
                 seed: int = 0, window_units: int = 400, initial_hashes: frozenset[str] = frozenset(),
                 stop_after_units: int | None = None, sample_every: int = 0,
                 on_sample: Callable[["SimulatedExecutor"], None] | None = None,
                 server_cpu: Callable[[], float] | None = None):
        self.slots = slots
        #: With PostgreSQL on this machine: the server's CPU for the driver, charged too (``--clock cpu+server``).
        self.server_cpu = server_cpu
        self._server_mark = server_cpu() if server_cpu is not None else 0.0
        self.server_charged = 0.0
        self.model = model
        self.mean_duration = mean_duration
        self.durations = durations
        self.seed = seed
        self.window_units = window_units
        self.stop_after_units = stop_after_units
        self.initial_hashes = initial_hashes
        self.sample_every = sample_every
        self.on_sample = on_sample
        self.request_stop: Callable[[], None] = lambda: None
        self.now = 0.0
        self._mark: float | None = None
        self._running: list[tuple[float, int, float, Any]] = []  # (finish, seq, start, completion)
        self._queue: deque[tuple[float, Any]] = deque()
        self._done: list[Any] = []
        self._free = slots
        self._seq = 0
        self._stopping = False
        # accounting
        self.charged = 0.0          # virtual seconds charged for the driver's CPU
        self.own_cpu = 0.0          # this executor's own CPU (not charged)
        self.submitted = 0
        self.completed = 0
        self.busy_total = 0.0
        self.first_full: float | None = None
        self.first_child_submit: float | None = None
        self.window_start: float | None = None
        self.window_busy = 0.0
        self.window_completed = 0
        self.end: float | None = None
        self.wall_started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.samples: list[dict[str, Any]] = []

    # protocol
    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._queue) + len(self._done)

    def prepare(self, task_names) -> None:
        pass

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        self._queue.clear()

    def submit(self, unit) -> None:
        self._charge()
        self._advance(self.now)
        self.submitted += 1
        if self.first_child_submit is None and not self._is_initial(unit):
            self.first_child_submit = self.now
        completion, duration = self._simulate(unit)
        if self._free > 0:
            self._start(self.now, duration, completion)
        else:
            self._queue.append((duration, completion))
        self._exit()

    def wait(self, timeout: float | None = None) -> list:
        self._charge()
        self._advance(self.now)
        if self._stopping:
            self._exit()
            return []
        if not self._done and self._running:
            upcoming = self._running[0][0]
            if timeout is not None and upcoming > self.now + timeout:
                self.now += timeout
                self._advance(self.now)
            else:
                self.now = max(self.now, upcoming)
                self._advance(self.now)
        done, self._done = self._done, []
        self.completed += len(done)
        if self.sample_every and self.on_sample is not None \
                and self.completed // self.sample_every != (self.completed - len(done)) // self.sample_every:
            self.on_sample(self)
        self._check_window()
        if (self.window_start is not None and self.window_completed >= self.window_units) or \
                (self.stop_after_units is not None and self.completed >= self.stop_after_units):
            self.end = self.now
            self._stopping = True
            self.request_stop()
        self._exit()
        return done

    # internals
    def _is_initial(self, unit) -> bool:
        from cellsearch.spec import CellSpec

        return CellSpec.from_dict(unit.cell).hash in self.initial_hashes

    def _charge(self) -> None:
        now = time.process_time()
        if self._mark is not None:
            self.now += now - self._mark
            self.charged += now - self._mark
        self._entered = now
        if self.server_cpu is not None:
            used = self.server_cpu()
            self.now += used - self._server_mark
            self.server_charged += used - self._server_mark
            self._server_mark = used

    def _exit(self) -> None:
        self._mark = time.process_time()
        self.own_cpu += self._mark - self._entered

    def _simulate(self, unit):
        from cellsearch.search.executors import Completion

        rng = random.Random(self.seed * 1_000_003 + unit.unit_id)
        results, raw = [], 0.0
        for _ in unit.settings:
            row = self.model.draw(unit.task, rng)
            raw += row["duration_s"]
            results.append(dict(row))
        if self.durations == "fixed":
            duration = self.mean_duration
        else:
            duration = raw * self.mean_duration / self.model.mean_duration
        for result in results:  # the reported durations are the simulated ones
            result["duration_s"] = result["duration_s"] * self.mean_duration / self.model.mean_duration
        worker = {"node_id": "sim", "worker_pid": 0, "hostname": "simulated"}
        return Completion(unit.unit_id, results, worker), duration

    def _start(self, start: float, duration: float, completion) -> None:
        self._free -= 1
        self._seq += 1
        heapq.heappush(self._running, (start + duration, self._seq, start, completion))
        if self._free == 0 and self.first_full is None:
            self.first_full = start

    def _advance(self, until: float) -> None:
        while self._running and self._running[0][0] <= until:
            finish, _, start, completion = heapq.heappop(self._running)
            self._account(start, finish)
            self._done.append(completion)
            self._free += 1
            if self._queue:
                duration, queued = self._queue.popleft()
                self._start(finish, duration, queued)

    def _account(self, start: float, finish: float) -> None:
        self.busy_total += finish - start
        if self.window_start is not None:
            self.window_busy += max(0.0, finish - max(start, self.window_start))
            self.window_completed += 1

    def _check_window(self) -> None:
        if self.window_start is not None:
            return
        candidates = [t for t in (self.first_full,
                                  None if self.first_child_submit is None
                                  else self.first_child_submit + self.mean_duration) if t is not None]
        if candidates and self.now >= min(candidates):
            self.window_start = min(candidates)
            self.window_charged0 = self.charged + self.server_charged

    def window_cost(self) -> float:
        """Virtual seconds charged for the driver per unit completed in the window (its steady-state cost)."""
        if self.window_start is None or not self.window_completed:
            return float("nan")
        return (self.charged + self.server_charged - self.window_charged0) / self.window_completed

    def idle_fraction(self) -> float:
        """Steady-state idle fraction of the workers over [window_start, end]."""
        end = self.end if self.end is not None else self.now
        if self.window_start is None or end <= self.window_start:
            return float("nan")
        busy = self.window_busy + sum(max(0.0, min(end, finish) - max(start, self.window_start))
                                      for finish, _, start, _ in self._running)
        return max(0.0, min(1.0, 1.0 - busy / (self.slots * (end - self.window_start))))


# -- CPU by part -----------------------------------------------------------------------------------------------

class PartTimer:
    """Exclusive process_time per part, through wrappers installed on the functions of each part."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []
        self._patches: list[tuple[Any, str, Any]] = []

    def wrap(self, part: str, function):
        if getattr(function, "_scale_part", None):
            return function
        stack, cpu, calls = self._stack, self.cpu, self.calls

        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.process_time()
            stack.append([0.0])
            try:
                return function(*args, **kwargs)
            finally:
                children = stack.pop()[0]
                elapsed = time.process_time() - started
                cpu[part] += elapsed - children
                calls[part] += 1
                if stack:
                    stack[-1][0] += elapsed

        timed._scale_part = part
        return timed

    def patch(self, owner, name: str, part: str) -> None:
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None or isinstance(original, (property, staticmethod, classmethod)):
            return
        self._patches.append((owner, name, original))
        setattr(owner, name, self.wrap(part, original))

    def patch_class(self, cls, part: str, skip: tuple[str, ...] = ()) -> None:
        for name, value in list(cls.__dict__.items()):
            if callable(value) and not name.startswith("__") and name not in skip \
                    and not isinstance(value, (staticmethod, classmethod, type)):
                self.patch(cls, name, part)

    @contextmanager
    def installed(self) -> Iterator["PartTimer"]:
        import optuna
        from optuna.storages import RDBStorage
        from optuna.storages._cached_storage import _CachedStorage

        import cellsearch.dedup as dedup
        import cellsearch.hparams as hparams
        import cellsearch.mutation as mutation
        from cellsearch.search import driver as driver_module
        from cellsearch.search.population import PopulationPolicy
        from cellsearch.search.storage import RunStorage

        self.patch(mutation, "mutate", "mutation")
        self.patch_class(dedup.Deduplicator, "dedup")
        self.patch(optuna, "create_study", "optuna")
        self.patch(optuna, "load_study", "optuna")
        self.patch(hparams, "sample_settings", "optuna")
        self.patch_class(optuna.study.Study, "optuna")
        self.patch_class(RDBStorage, "optuna")
        self.patch_class(_CachedStorage, "optuna")
        self.patch_class(PopulationPolicy, "population")
        for name in ("_score", "_report", "_select", "_admit"):
            self.patch(driver_module.SearchDriver, name, "population")
        writes = ("commit_unit", "add_units", "start_step", "finish_step", "mark_told", "note_submission",
                  "set_stage", "record_promotion", "mark_told_many")
        for name in writes:
            self.patch(RunStorage, name, "storage_writes")
        # helpers that write or read Optuna's own tables for the driver (in place of Optuna calls): Optuna's part
        for name in ("set_optuna_study_attributes", "set_optuna_trial_attributes", "optuna_trial_state"):
            self.patch(RunStorage, name, "optuna")
        for name, value in list(RunStorage.__dict__.items()):
            if callable(value) and not name.startswith("_") and name not in writes \
                    and name not in ("retry", "close", "hold", "free_bytes", "database_directory"):
                self.patch(RunStorage, name, "storage_reads")
        try:
            yield self
        finally:
            for owner, name, original in reversed(self._patches):
                setattr(owner, name, original)
            self._patches.clear()


PARTS = ("mutation", "dedup", "optuna", "storage_writes", "storage_reads", "population", "other")


# -- databases -------------------------------------------------------------------------------------------------

def pg_url(argument: str | None) -> str:
    if argument:
        return argument
    return Path("/tmp/pgurl.txt").read_text().strip()


@contextmanager
def database(backend: str, tag: str, root: Path, server: str | None, keep: bool = False) -> Iterator[str | None]:
    """A fresh database: None (SQLite in the run directory) or the URL of ``scale_dispatch_<tag>``."""
    if backend == "sqlite":
        yield None
        return
    import sqlalchemy as sa

    name = f"scale_dispatch_{tag}"
    assert name.startswith("scale_dispatch_") and name.replace("_", "").isalnum()
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        if not keep:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def database_bytes(backend: str, run_dir: Path, url: str | None) -> int:
    if backend == "sqlite":
        return sum(path.stat().st_size for path in run_dir.glob("run.db*"))
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT pg_database_size(current_database())")).scalar())
    finally:
        engine.dispose()


def pg_server_cpu(url: str | None) -> float | None:
    """CPU seconds of the server backends now connected to the database (same machine only)."""
    if url is None:
        return None
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            pids = [int(p) for p in connection.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()")).scalars()]
    finally:
        engine.dispose()
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            return None
    return total


class ServerCpu:
    """CPU seconds used by the PostgreSQL backends serving a database since the start, read from /proc (the server
    runs on this machine): every backend connected to the database except this reader's own; refreshed every
    second of wall time; a backend that goes away keeps what it used."""

    def __init__(self, url: str):
        import sqlalchemy as sa

        self._engine = sa.create_engine(url, poolclass=sa.pool.StaticPool)
        self._query = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                              "AND pid <> pg_backend_pid()")
        self._tick = os.sysconf("SC_CLK_TCK")
        self._last: dict[int, float] = {}
        self._pids: list[int] = []
        self._refreshed = 0.0
        self.total = 0.0

    def __call__(self) -> float:
        if time.perf_counter() - self._refreshed > 1.0:
            with self._engine.connect() as connection:
                self._pids = [int(p) for p in connection.execute(self._query).scalars()]
            self._refreshed = time.perf_counter()
        for pid in self._pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            used = (int(fields[11]) + int(fields[12])) / self._tick
            previous = self._last.get(pid)
            self._last[pid] = used
            if previous is not None:
                self.total += max(0.0, used - previous)
        return self.total

    def close(self) -> None:
        self._engine.dispose()


# -- one run ---------------------------------------------------------------------------------------------------

def small_config(seed: int, storage: str | None, ptb_dir: str | None):
    from cellsearch.config import from_mapping, to_mapping
    from cellsearch.search.config import SearchConfig, load_search_config

    config = load_search_config(REPO / "search_configs" / "small.yaml")
    data = to_mapping(config)
    data.update(max_wall_clock_s=None, max_steps=10 ** 9, seed=seed)
    if storage is not None:
        data["storage"] = storage
    if ptb_dir is not None:
        data["ptb_dir"] = ptb_dir
    return from_mapping(SearchConfig, data)


def run_once(backend: str, workers: int, duration: float, *, model: ArchiveModel, root: Path,
             server: str | None = None, seed: int = 0, durations: str = "measured", window_units: int = 400,
             stop_after_units: int | None = None, sample_every: int = 0, trace: bool = False,
             tag: str = "run", config_changes: dict[str, Any] | None = None, clock: str = "cpu+server"
             ) -> dict[str, Any]:
    """Drive the real driver on the simulated executor once; returns the measurements (see the docstring)."""
    from cellsearch import zoo
    from cellsearch.search.driver import SearchDriver
    from cellsearch.search.run import create_run, task_loader

    run_dir = root / f"{backend}-{tag}"
    with database(backend, tag, root, server) as url:
        config = small_config(seed, url, os.environ.get("CELLSEARCH_PTB_DIR"))
        if config_changes:
            config = config.with_overrides(**config_changes)
        config, storage = create_run(config, run_dir, log=lambda message: None)
        initial = frozenset(zoo.get(name).hash for name in config.initial_cells)
        samples: list[dict[str, Any]] = []
        snapshots: list[Any] = []  # with trace: the first sample past a quarter of the run, and the last
        timer = PartTimer()

        def on_sample(executor: SimulatedExecutor) -> None:
            gc.collect()
            if trace and stop_after_units and (
                    (not snapshots and executor.completed >= stop_after_units // 4)
                    or executor.completed + sample_every > stop_after_units):
                snapshots.append((executor.completed, driver.progress.evaluations, driver.cell_count,
                                  tracemalloc.take_snapshot()))
            samples.append({"evaluations": driver.progress.evaluations, "units": executor.completed,
                            "rss_mb": rss_bytes() / 1e6,
                            "traced_mb": tracemalloc.get_traced_memory()[0] / 1e6 if trace else None,
                            "cells": driver.cell_count,
                            "driver_cpu_s": executor.charged, "virtual_s": executor.now,
                            "wall_s": time.perf_counter() - executor.wall_started})
            if stop_after_units and stop_after_units >= 10_000:  # a long run: its samples as they come
                print("  sample: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in samples[-1].items()), flush=True)

        load = task_loader(config)
        for name in config.all_tasks:  # read (and cached) before the clock starts, as Ray's start-up is excluded
            load(name)
        server = ServerCpu(url) if url is not None and clock == "cpu+server" else None
        executor = SimulatedExecutor(workers, model, duration, durations, seed=seed, window_units=window_units,
                                     initial_hashes=initial, stop_after_units=stop_after_units,
                                     sample_every=sample_every, on_sample=on_sample, server_cpu=server)
        if trace:
            tracemalloc.start(12)  # frames enough to reach the driver's line from Optuna's and SQLAlchemy's
        gc.collect()
        rss_before = rss_bytes()
        with timer.installed():
            driver = SearchDriver(config, storage, executor, load, log=lambda message: None)
            executor.request_stop = lambda: driver.request_stop("abandon")
            cpu0, wall0 = time.process_time(), time.perf_counter()
            server0 = pg_server_cpu(url)
            try:
                progress = driver.run()
            finally:
                cpu = time.process_time() - cpu0
                wall = time.perf_counter() - wall0
                server1 = pg_server_cpu(url)
                if trace:
                    traced_peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                storage.close()
                if server is not None:
                    server.close()
        units = max(progress.session_units, 1)
        driver_cpu = cpu - executor.own_cpu
        parts = {part: timer.cpu.get(part, 0.0) for part in PARTS if part != "other"}
        parts["other"] = driver_cpu - sum(parts.values())
        row = {
            "backend": backend, "workers": workers, "duration_s": duration, "durations": durations,
            "units": progress.session_units, "evaluations": progress.evaluations,
            "steps": progress.steps_done, "virtual_s": executor.now,
            "driver_cpu_s": driver_cpu, "wall_s": wall, "charged_s": executor.charged,
            "cpu_ms_per_unit": 1000 * driver_cpu / units, "wall_ms_per_unit": 1000 * (wall - 0) / units,
            "units_per_cpu_s": units / driver_cpu if driver_cpu > 0 else float("nan"),
            "units_per_wall_s": units / wall if wall > 0 else float("nan"),
            "clock": clock if url is not None else "cpu", "server_charged_s": executor.server_charged,
            "idle_fraction": executor.idle_fraction(),
            # the window's driver cost per unit, and the idle fraction it means in the long run, once any backlog
            # is drained: workers finish N / D units a second, the driver handles 1 / cost
            "window_ms_per_unit": 1000 * executor.window_cost(),
            "driver_busy_window": executor.window_cost() * workers / duration if duration else float("nan"),
            "idle_long_run": max(0.0, 1 - duration / (workers * executor.window_cost()))
            if duration and executor.window_cost() == executor.window_cost() else float("nan"),
            "window_start_s": executor.window_start, "window_units": executor.window_completed,
            "idle_whole_run": 1 - executor.busy_total / (workers * executor.now) if executor.now > 0 else 1.0,
            "db_mb": database_bytes(backend, run_dir, url) / 1e6,
            "rss_growth_mb": (rss_bytes() - rss_before) / 1e6,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
            "server_cpu_ms_per_unit": 1000 * (server1 - server0) / units
            if server0 is not None and server1 is not None else None,
        }
        for part in PARTS:
            row[f"ms_{part}"] = 1000 * parts[part] / units
        if trace:
            row["traced_peak_mb"] = traced_peak / 1e6
            row["growth_by_line"] = growth_by_line(snapshots)
        row["samples"] = samples
        row["trials_finished"] = finished_trials(config.storage if url is None else url, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def growth_by_line(snapshots: list[tuple[int, int, int, Any]], top: int = 25) -> str:
    """Where the traced memory grew between the first and the last snapshot: the largest differences grouped by
    the allocating traceback, each shown by its innermost frames in cellsearch (or, failing that, the innermost
    frames), with the growth per evaluation and per cell over the interval."""
    if len(snapshots) < 2:
        return "fewer than two snapshots: the run was too short for an attribution"
    (units0, evaluations0, cells0, first), (units1, evaluations1, cells1, last) = snapshots[0], snapshots[-1]
    evaluations, cells = max(evaluations1 - evaluations0, 1), max(cells1 - cells0, 1)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    differences = last.filter_traces(ignore).compare_to(first.filter_traces(ignore), "traceback")
    total = sum(d.size_diff for d in differences)
    lines = [f"traced growth from {units0} to {units1} units ({evaluations} evaluations, {cells} cells): "
             f"{total / 1e6:.1f} MB, {total / evaluations:.0f} B per evaluation, {total / cells:.0f} B per cell",
             ""]
    for difference in differences[:top]:
        frames = [f for f in difference.traceback if "/cellsearch/" in f.filename] or list(difference.traceback)
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))
        lines.append(f"{difference.size_diff / 1e6:+8.2f} MB {difference.count_diff:+9d} blocks "
                     f"{difference.size_diff / cells:8.0f} B/cell  {where}")
    return "\n".join(lines)


def finished_trials(storage_url: str | None, run_dir: Path) -> int:
    import sqlalchemy as sa

    url = storage_url if storage_url and not storage_url.startswith("sqlite") else \
        f"sqlite:///{run_dir / 'run.db'}"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text(
                "SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'FAIL', 'PRUNED')")).scalar())
    finally:
        engine.dispose()


# -- the command -----------------------------------------------------------------------------------------------

def machine_facts() -> str:
    load = os.getloadavg()
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import optuna
    import sqlalchemy

    return (f"{os.cpu_count()} CPUs ({cpu}), load average {load[0]:.2f} at the start (shared machine), "
            f"Python {platform.python_version()}, Optuna {optuna.__version__}, SQLAlchemy {sqlalchemy.__version__}")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [key for key in rows[0] if key != "samples"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})


def dispatch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scale.py dispatch", description="the driver's dispatch side at scale")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--pg-url", default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--durations-s", type=float, nargs="+", default=[10.0, 60.0, 600.0])
    parser.add_argument("--durations", choices=("measured", "fixed"), default="measured")
    parser.add_argument("--saturation-units", type=int, default=400)
    parser.add_argument("--saturation-workers", type=int, default=100,
                        help="workers of the zero-duration runs (each wait returns up to 2 N units)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-units", type=int, default=0, help="a long zero-duration run on SQLite (0: none)")
    parser.add_argument("--long-backend", default="sqlite")
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the long run")
    parser.add_argument("--quick", action="store_true", help="shorter steady-state windows")
    parser.add_argument("--clock", choices=("cpu", "cpu+server"), default="cpu+server",
                        help="virtual time charged for the driver: its CPU, plus (PostgreSQL) the server's CPU")
    parser.add_argument("--only", choices=("saturation", "idle", "long"), nargs="+",
                        default=["saturation", "idle", "long"])
    parser.add_argument("--label", default="", help="suffix of the CSV files (e.g. before, after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "scale")
    args = parser.parse_args(argv)
    os.environ.setdefault("CELLSEARCH_PTB_DIR", str(REPO.parent / "shared" / "data" / "ptb"))
    server = pg_url(args.pg_url) if "postgresql" in args.backends or args.long_backend == "postgresql" else None
    model = ArchiveModel()
    suffix = f"-{args.label}" if args.label else ""
    print(machine_facts(), flush=True)
    print(f"results model: {sum(len(r) for r in model.rows.values())} real evaluations, "
          f"mean setting duration {model.mean_duration:.1f} s, statuses {model.statuses()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-dispatch-") as temporary:
        root = Path(temporary)
        counter = iter(range(10 ** 6))
        tag = lambda: f"{os.getpid()}_{next(counter)}"  # noqa: E731
        if "saturation" in args.only:
            rows = []
            for backend in args.backends:
                for repeat in range(args.repeats):
                    row = run_once(backend, args.saturation_workers, 0.0, model=model, root=root, server=server,
                                   seed=args.seed, durations="fixed", stop_after_units=args.saturation_units,
                                   tag=tag(), clock=args.clock)
                    row["repeat"] = repeat
                    rows.append(row)
                    print(f"saturation {backend} #{repeat}: {row['units']} units, "
                          f"{row['cpu_ms_per_unit']:.2f} CPU ms/unit ({row['units_per_cpu_s']:.1f} units/CPU s), "
                          f"{row['units_per_wall_s']:.1f} units/wall s; parts ms: "
                          + ", ".join(f"{p} {row[f'ms_{p}']:.2f}" for p in PARTS), flush=True)
            write_csv(args.out / f"dispatch-saturation{suffix}.csv", rows)
            for backend in args.backends:
                mine = [r for r in rows if r["backend"] == backend]
                print(f"saturation {backend} median: {statistics.median(r['cpu_ms_per_unit'] for r in mine):.2f} "
                      f"CPU ms/unit = {statistics.median(r['units_per_cpu_s'] for r in mine):.1f} units/CPU s; "
                      f"{statistics.median(r['units_per_wall_s'] for r in mine):.1f} units/wall s", flush=True)
        if "idle" in args.only:
            rows = []
            for backend in args.backends:
                for workers in args.workers:
                    for duration in args.durations_s:
                        window = max(workers, 300) if args.quick else max(3 * workers, 400)
                        row = run_once(backend, workers, duration, model=model, root=root, server=server,
                                       seed=args.seed, durations=args.durations, window_units=window, tag=tag(),
                                       clock=args.clock)
                        rows.append(row)
                        print(f"idle {backend} N={workers} D={duration:g}s: idle {row['idle_fraction']:.3f} "
                              f"(long run {row['idle_long_run']:.3f}, driver busy {row['driver_busy_window']:.2f}, "
                              f"{row['window_ms_per_unit']:.1f} ms/unit charged in the window) "
                              f"(whole run {row['idle_whole_run']:.3f}), {row['units']} units, "
                              f"{row['cpu_ms_per_unit']:.2f} CPU ms/unit, db {row['db_mb']:.1f} MB", flush=True)
            write_csv(args.out / f"dispatch-idle{suffix}.csv", rows)
        if "long" in args.only and args.long_units:
            row = run_once(args.long_backend, args.saturation_workers, 0.0, model=model, root=root, server=server,
                           seed=args.seed, durations="fixed", stop_after_units=args.long_units, window_units=10 ** 9,
                           sample_every=max(args.long_units // 40, 100), trace=args.trace, tag=tag())
            write_csv(args.out / f"dispatch-memory{suffix}.csv", row["samples"])
            if args.trace:
                (args.out / f"dispatch-memory-trace{suffix}.txt").write_text(row.pop("growth_by_line") + "\n")
            write_csv(args.out / f"dispatch-long{suffix}.csv", [row])
            print(f"long {args.long_backend}: {row['units']} units, {row['evaluations']} evaluations, "
                  f"{row['cpu_ms_per_unit']:.2f} CPU ms/unit, RSS growth {row['rss_growth_mb']:.1f} MB, "
                  f"db {row['db_mb']:.1f} MB", flush=True)
            for sample in row["samples"]:
                print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in sample.items()), flush=True)
    return 0


def reads(argv: list[str]) -> int:
    path = Path(__file__).resolve().with_name("scale_reads.py")
    if not path.exists():
        print(f"scale.py reads: {path} is missing (the read-side benchmark is a separate file)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(path.parent))
    import scale_reads

    return int(scale_reads.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"dispatch": dispatch, "reads": reads}
    if not argv or argv[0] not in commands:
        print(__doc__.splitlines()[0] + "\n\nusage: scale.py {dispatch,reads} [options]  (-h after one for its "
              "options)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
