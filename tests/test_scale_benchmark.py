"""benchmarks/scale.py's simulated executor really drives the real driver (SQLite, a tiny config, no training)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_simulated_executor_drives_the_real_driver(tmp_path, monkeypatch):
    from cellsearch import zoo
    from cellsearch.search.driver import SearchDriver
    from cellsearch.search.executors import Executor
    from cellsearch.search.run import create_run, task_loader

    scale = _scale_module()
    model = scale.ArchiveModel()
    # the small config without PTB (no data needed), run until 40 units are committed
    config = scale.small_config(0, None, None).with_overrides(tasks=["arithmetic", "xml"])
    config, storage = create_run(config, tmp_path / "run", log=lambda message: None)
    executor = scale.SimulatedExecutor(8, model, 60.0, "measured", seed=0, window_units=10 ** 6,
                                       stop_after_units=40,
                                       initial_hashes=frozenset(zoo.get(n).hash for n in config.initial_cells))
    assert isinstance(executor, Executor)
    timer = scale.PartTimer()
    with timer.installed():
        driver = SearchDriver(config, storage, executor, task_loader(config), log=lambda message: None)
        executor.request_stop = lambda: driver.request_stop("abandon")
        progress = driver.run()
    storage.close()
    assert progress.session_units >= 40
    assert executor.now > 0 and executor.charged > 0  # virtual time passed, the driver's CPU was charged
    assert 0.0 <= 1 - executor.busy_total / (executor.slots * executor.now) <= 1.0
    idle = executor.idle_fraction()
    assert idle != idle or 0.0 <= idle <= 1.0  # NaN when no steady-state window began
    assert timer.cpu["optuna"] > 0 and timer.cpu["storage_writes"] > 0 and timer.calls["mutation"] > 0
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'run' / 'run.db'}")
    with engine.connect() as connection:
        done = connection.execute(sa.text("SELECT count(*) FROM cs_units WHERE status = 'done'")).scalar()
        evaluations = connection.execute(sa.text("SELECT count(*) FROM cs_evaluations")).scalar()
        statuses = set(connection.execute(sa.text("SELECT DISTINCT status FROM cs_evaluations")).scalars())
        finished = connection.execute(sa.text(
            "SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'FAIL', 'PRUNED')")).scalar()
        untold = connection.execute(sa.text(
            "SELECT count(*) FROM cs_units WHERE status = 'done' AND NOT told")).scalar()
    engine.dispose()
    assert done >= 40 and evaluations >= 40 and finished >= evaluations
    assert "ok" in statuses
    assert untold == 0
