"""Search throughput: units per minute on the smoke config with 1 and 2 workers, and driver time per unit.

    python benchmarks/search.py [--max-steps 8] [--workers 1 2]

Each configuration runs the shipped ``search_configs/smoke.yaml`` (same seed, ``--max-steps``
steps) on a fresh embedded Ray instance with that many CPUs, in a temporary run directory.
Throughput counts committed units per minute between the first unit's creation and the last
unit's commit (so Ray's start-up is excluded). Parallel efficiency = (rate with N workers) /
(N x rate with 1 worker), measured in the same invocation. The driver's own time is the time
the driver loop spent outside ``executor.wait`` (planning stages with Optuna, committing units,
telling Optuna, choosing parents, mutating), divided by the units it committed. "Workers busy"
is the training time inside units over (span x workers): how well the driver keeps the workers
fed; when it stays high while efficiency drops, the workers are slowed by CPU contention (train
s/unit rises), not starved by the driver. Search paths
differ between runs (units finish in a different order), so the per-unit work differs a
little too; with ptb units far longer than the others, expect noise: compare ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(workers: int, max_steps: int, root: Path) -> dict[str, float]:
    import ray

    from cellsearch.results import load_run
    from cellsearch.search.config import load_search_config
    from cellsearch.search.run import create_run, drive, make_executor

    config = load_search_config(REPO / "search_configs" / "smoke.yaml").with_overrides(max_steps=max_steps)
    run_dir = root / f"workers-{workers}"
    config, storage = create_run(config, run_dir)
    executor = make_executor(config, "ray", workers=workers)
    started = time.monotonic()
    progress, _ = drive(config, storage, executor, log=lambda message: None)
    wall = time.monotonic() - started
    storage.close()
    if ray.is_initialized():
        ray.shutdown()
    results = load_run(run_dir)
    try:
        units = results.units()
        evaluations = results.evaluations()
    finally:
        results.close()
    span = (units["finished_at"].max() - units["created_at"].min()).total_seconds()
    return {
        "workers": workers,
        "units": len(units),
        "settings": len(evaluations),
        "train_seconds": float(evaluations["duration_s"].sum()),
        "span_s": span,
        "wall_s": wall,
        "units_per_min": len(units) / span * 60,
        "driver_ms_per_unit": 1000 * progress.driver_seconds / max(progress.session_units, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("CELLSEARCH_PTB_DIR", str(REPO.parent / "shared" / "data" / "ptb"))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for workers in args.workers:
            rows.append(run_once(workers, args.max_steps, Path(root)))
    print(f"smoke config, {args.max_steps} steps after the 2 seed cells, {os.cpu_count()} CPUs on this machine")
    print(f"{'workers':>7} {'units':>6} {'span s':>7} {'units/min':>10} {'train s/unit':>13} {'efficiency':>11} "
          f"{'workers busy':>13} {'driver ms/unit':>15}")
    base = rows[0]["units_per_min"] / rows[0]["workers"]
    for row in rows:
        efficiency = row["units_per_min"] / (row["workers"] * base)
        busy = row["train_seconds"] / (row["span_s"] * row["workers"])
        print(f"{row['workers']:>7} {row['units']:>6} {row['span_s']:>7.1f} {row['units_per_min']:>10.1f} "
              f"{row['train_seconds'] / row['units']:>13.2f} {efficiency:>11.2f} {busy:>13.2f} "
              f"{row['driver_ms_per_unit']:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
