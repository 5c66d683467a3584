"""Retraining several seeds of a cell: one batched model per cell versus one run per seed.

Usage::

    python benchmarks/retrain.py                                  # gru, arithmetic, 4 seeds, 3 repeats
    python benchmarks/retrain.py --cell lstm_b --task xml --seeds 8 --steps 100 --epochs 2

Each repeat runs :func:`cellsearch.retrain.retrain` in this process (one torch thread, no Ray) twice
into fresh directories, alternating which goes first: once with the cell's seeds trained as one
batched model (the default where it pays) and once with ``batching.enabled`` false (one run per
seed, one after another). Both write every checkpoint and every output table, so the time is the
whole retrain's, after one untimed warm-up round of each (code generation happens once per
process). The preset is the task's ``quick`` preset (its model size and settings) with a
shorter budget (``--epochs`` x ``--steps``), written to a temporary copy of the task file.

This is the one-worker case (``--in-process``, or more cells than Ray slots). With more free slots
than cells, :func:`cellsearch.retrain.plan_jobs` splits a cell's seeds into several jobs so that no
slot idles; separate runs in parallel can then finish sooner than one batched group would.

Printed: the load average before and after, the median wall time of each way and their ratio
(separate / batched, higher is better), and the largest relative difference between the two ways'
scores and test losses (they must agree up to float rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from cellsearch.batching import BatchingConfig
from cellsearch.retrain import RetrainOptions, resolve_source, retrain

REPO = Path(__file__).resolve().parents[1]


def bench_task_file(task: str, epochs: int, steps: int, directory: Path) -> Path:
    """A copy of ``tasks/TASK.yaml`` with a ``bench`` preset: ``quick`` with a shorter budget."""
    data = yaml.safe_load((REPO / "tasks" / f"{task}.yaml").read_text())
    quick = data["retrain_presets"]["quick"]
    data["retrain_presets"]["bench"] = {
        "description": f"quick, {epochs} epochs of {steps} steps (benchmark)",
        "hparams": dict(quick["hparams"]),
        "budget": {**quick["budget"], "max_epochs": epochs, "steps_per_epoch": steps},
    }
    path = directory / f"{task}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cell", default="gru")
    parser.add_argument("--task", default="arithmetic",
                        help="a character task (batching does not pay for PTB on a CPU)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}")
    times: dict[bool, list[float]] = {True: [], False: []}
    tables: dict[bool, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        task_file = bench_task_file(args.task, args.epochs, args.steps, scratch)
        cells = resolve_source(args.cell)
        # one untimed round first: code generation and the matmul-route check happen once per process
        (scratch / "warm-up").mkdir()
        warm_up = bench_task_file(args.task, 1, 2, scratch / "warm-up")
        for batched in (True, False):
            retrain(cells, str(warm_up), "bench", scratch / f"warm-up-{batched}",
                    RetrainOptions(seeds=2, baselines=(), in_process=True, batching=BatchingConfig(enabled=batched)))
        for repeat in range(args.repeats):
            for batched in ((True, False) if repeat % 2 == 0 else (False, True)):
                out = scratch / f"{'batched' if batched else 'separate'}-{repeat}"
                start = time.perf_counter()
                results = retrain(cells, str(task_file), "bench", out, RetrainOptions(
                    seeds=args.seeds, baselines=(), in_process=True, batching=BatchingConfig(enabled=batched)))
                times[batched].append(time.perf_counter() - start)
                tables[batched] = results.runs
            print(f"repeat {repeat + 1}: batched {times[True][-1]:.1f} s, separate {times[False][-1]:.1f} s",
                  flush=True)
    batched, separate = statistics.median(times[True]), statistics.median(times[False])
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{args.cell} on {args.task} ({args.epochs} x {args.steps} steps, width "
          f"{int(tables[True]['hidden_size'].iloc[0])}), {args.seeds} seeds, {args.repeats} repeats, 1 thread")
    print(f"| way | median wall time (s) |\n|---|---|\n| one run per seed | {separate:.1f} |\n"
          f"| seeds as one batched model | {batched:.1f} |")
    print(f"speed-up (separate / batched): {separate / batched:.2f}x")
    for column in ("score", "test_loss"):
        a, b = tables[True][column].to_numpy(float), tables[False][column].to_numpy(float)
        print(f"largest relative difference in {column}: {float(np.max(np.abs(a - b) / np.abs(b))):.2e}")
    if not (tables[True]["status"] == tables[False]["status"]).all():
        sys.exit("the two ways ended with different statuses")


if __name__ == "__main__":
    main()
