"""Greff et al.'s LSTM family ("LSTM: A Search Space Odyssey", 2017) on the paper's arithmetic and XML tasks.

The nine cells (``lstm_peephole``, the vanilla LSTM, and its variants NIG, NFG, NOG, NIAF, NOAF,
NP, CIFG, FGR; ``lstm_np`` is ``lstm``, see :mod:`cellsearch.zoo`) are trained on each task under
one budget profile (default ``small``, the calibrated one: ``results/fidelity/README.md``) with
every setting of that profile's space (the calibrated ``small`` holds two: learning rate 1 and 5),
``--seeds`` seeds each; a cell's score for a seed is its best held-out score over the settings,
as in a search. A cell's settings and seeds train as one batched model (results equal separate
runs up to rounding). The table gives each cell's mean with a 95% bootstrap interval over seeds,
and its difference from the vanilla LSTM with an interval (seeds resampled independently,
:func:`cellsearch.stats.difference_interval`), next to Greff et al.'s findings, and says which
differences are outside their interval.

    python benchmarks/greff.py --seeds 3 --workers 2 --out results/greff
    python benchmarks/greff.py --profile smoke --seeds 2 --tasks arithmetic --out /tmp/greff   # a minute

Greff et al.'s findings (their Fig. 3, TIMIT, IAM Online and JSB Chorales, 5400 runs): no variant
improves on the vanilla LSTM significantly; removing the forget gate (NFG) or the output activation
(NOAF) hurts significantly on every data set; coupling the input and forget gates (CIFG) and
removing the peepholes (NP) cost nothing significant; NIG, NOG and NIAF hurt on some data sets; full
gate recurrence (FGR) does not help and hurts on some.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

CELLS = ("lstm_peephole", "lstm_nig", "lstm_nfg", "lstm_nog", "lstm_niaf", "lstm_noaf", "lstm_np", "lstm_cifg",
         "lstm_fgr")
TASKS = ("arithmetic", "xml")
#: Greff et al.'s verdict for each variant against the vanilla LSTM (their Fig. 3).
GREFF = {
    "lstm_nig": "hurts on some data sets",
    "lstm_nfg": "hurts significantly everywhere",
    "lstm_nog": "hurts on some data sets",
    "lstm_niaf": "hurts on some data sets",
    "lstm_noaf": "hurts significantly everywhere",
    "lstm_np": "no significant difference",
    "lstm_cifg": "no significant difference",
    "lstm_fgr": "no gain; hurts on some data sets",
}


def _train(job: tuple[str, str, str, tuple[int, ...], str | None]) -> dict:
    """One cell on one task: every setting of the profile's space x every seed, as one batched group."""
    cell, task_name, profile, seeds, data_dir = job
    import torch

    from cellsearch import zoo
    from cellsearch.tasks import get_task
    from cellsearch.training import GroupMember, train_settings

    torch.set_num_threads(1)
    task = get_task(task_name, data_dir=data_dir)
    settings = list(task.space_for(profile).settings())
    members = [GroupMember(setting, seed) for seed in seeds for setting in settings]
    start = time.process_time()
    results = train_settings(zoo.get(cell), task, members, task.budget(profile))
    scores: dict[int, float] = {}
    for member, result in zip(members, results):
        scores[member.seed] = max(scores.get(member.seed, 0.0), float(result.score))
    return {"cell": cell, "task": task_name, "scores": [scores[s] for s in seeds],
            "settings": len(settings), "cpu_s": time.process_time() - start,
            "statuses": sorted({r.status for r in results})}


def _table(rows: list[dict], seeds: int) -> str:
    from cellsearch.stats import difference_interval, mean_interval

    by = {(r["task"], r["cell"]): r for r in rows}
    tasks = sorted({r["task"] for r in rows}, key=lambda t: TASKS.index(t) if t in TASKS else 99)
    lines = []
    for task in tasks:
        vanilla = by[(task, "lstm_peephole")]["scores"]
        lines += [f"### {task} ({seeds} seeds; score = best held-out accuracy over the settings)", "",
                  "| cell | mean [95%] | minus vanilla [95%] | outside the interval | Greff et al. |",
                  "|---|---|---|---|---|"]
        for cell in CELLS:
            if (task, cell) not in by:
                continue
            scores = by[(task, cell)]["scores"]
            mean = mean_interval(scores, seed=1)
            if cell == "lstm_peephole":
                lines.append(f"| {cell} | {mean} | - | - | the reference |")
                continue
            difference = difference_interval(scores, vanilla, seed=1)
            verdict = ("worse" if difference.high < 0 else "better" if difference.low > 0 else "no")
            lines.append(f"| {cell} | {mean} | {difference} | {verdict} | {GREFF[cell]} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--profile", default="small")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="directory for results.json and table.md")
    args = parser.parse_args(argv)
    seeds = tuple(range(args.seeds))
    jobs = [(cell, task, args.profile, seeds, args.data_dir)
            for task in args.tasks.split(",") for cell in args.cells.split(",")]
    start = time.time()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            rows = []
            for row in pool.imap_unordered(_train, jobs):
                rows.append(row)
                print(f"{row['task']:>10} {row['cell']:<14} {row['scores']} ({row['cpu_s']:.0f} CPU-s)", flush=True)
    else:
        rows = []
        for job in jobs:
            rows.append(_train(job))
            row = rows[-1]
            print(f"{row['task']:>10} {row['cell']:<14} {row['scores']} ({row['cpu_s']:.0f} CPU-s)", flush=True)
    table = _table(rows, args.seeds)
    summary = {"profile": args.profile, "seeds": list(seeds), "wall_s": time.time() - start,
               "cpu_s": sum(r["cpu_s"] for r in rows), "rows": sorted(rows, key=lambda r: (r["task"], r["cell"]))}
    print(table)
    print(f"{len(rows)} cell x task jobs, {summary['cpu_s']:.0f} CPU-s, {summary['wall_s']:.0f} s wall")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
