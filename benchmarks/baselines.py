"""Reference cells on the paper's tasks: best score over random settings, several seeds.

For each cell (default: tanh_rnn, lstm, lstm_f, lstm_b, gru), task (default:
arithmetic, xml, ptb) and seed, the cell is trained with ``--settings`` (8)
distinct settings drawn at random (Optuna, the paper's procedure) from the
task's space under a budget profile (default ``small``), and its best held-out
score is kept. The table shows the mean, standard deviation and range of that
best score over the seeds, and the mean relative to the GRU (the paper's
yardstick). For a given task and seed every cell gets the same settings, so
the comparison is paired. Runs are spread over ``--workers`` processes, each
single-threaded.

    python benchmarks/baselines.py --workers 2 --json /tmp/baselines.json

Paper reference (best accuracy; PTB as 1/perplexity), for orientation:
tanh_rnn 0.295/0.321/0.0878, lstm 0.892/0.425/0.0891, lstm_f 0.293/0.234/0.0881,
lstm_b 0.902/0.444/0.0895, gru 0.896/0.460/0.0907 (arithmetic/xml/ptb).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

CELLS = ("tanh_rnn", "lstm", "lstm_f", "lstm_b", "gru")
TASKS = ("arithmetic", "xml", "ptb")
PAPER = {
    "tanh_rnn": (0.295, 0.321, 0.0878),
    "lstm": (0.892, 0.425, 0.0891),
    "lstm_f": (0.293, 0.234, 0.0881),
    "lstm_b": (0.902, 0.444, 0.0895),
    "gru": (0.896, 0.460, 0.0907),
}


def _settings(task_name: str, profile: str, seed: int, count: int, data_dir: str | None) -> list[dict]:
    """The same ``count`` random settings for every cell, for one task and seed."""
    import optuna

    from cellsearch.hparams import make_sampler, sample_settings
    from cellsearch.tasks import get_task

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = get_task(task_name, data_dir=data_dir)
    sampler_seed = int(
        np.random.SeedSequence([seed, TASKS.index(task_name) if task_name in TASKS else 99]).generate_state(1)[0]
    )
    study = optuna.create_study(direction="maximize", sampler=make_sampler("random", sampler_seed))
    return [setting.to_dict() for _, setting in sample_settings(study, task.space_for(profile), count)]


def _run(job: dict) -> dict:
    import torch

    from cellsearch import zoo
    from cellsearch.hparams import HyperParams
    from cellsearch.tasks import get_task
    from cellsearch.training import train_and_evaluate

    torch.set_num_threads(1)
    task = get_task(job["task"], data_dir=job["data_dir"])
    result = train_and_evaluate(
        zoo.get(job["cell"]), task, HyperParams.from_dict(job["hparams"]), task.budget(job["profile"]),
        seed=job["train_seed"],
    )
    return {**job, "status": result.status, "score": result.score, "duration_s": result.duration_s,
            "steps": result.steps, "hidden_size": result.hidden_size}


def _report(runs: list[dict], args: argparse.Namespace, wall: float) -> None:
    """Print the table of best scores per cell and task over the seeds whose runs are all present."""
    runs = [r for r in runs if r["cell"] in args.cells and r["task"] in args.tasks and r["setting"] < args.settings]
    seeds = sorted({r["seed"] for r in runs})
    complete = [seed for seed in seeds
                if sum(r["seed"] == seed for r in runs) == len(args.cells) * len(args.tasks) * args.settings]
    if len(complete) < len(seeds) or len(complete) < args.seeds:
        print(f"(partial: {len(complete)} complete seed(s) of {args.seeds}; {len(runs)} runs in all)")
    if not complete:
        return
    args.seeds = len(complete)
    runs = [r for r in runs if r["seed"] in complete]
    best: dict[tuple[str, str], list[float]] = {}
    for cell in args.cells:
        for task in args.tasks:
            per_seed = []
            for seed in complete:
                scores = [r["score"] for r in runs if (r["cell"], r["task"], r["seed"]) == (cell, task, seed)]
                per_seed.append(max(scores))
            best[cell, task] = per_seed

    print(f"Best held-out score over {args.settings} random settings (profile {args.profile}), "
          f"{args.seeds} seeds: mean +- std [min, max]; ptb score = 1/perplexity")
    header = f"{'cell':10s}" + "".join(f"{task:>34s}" for task in args.tasks)
    print(header)
    for cell in args.cells:
        cells = []
        for task in args.tasks:
            values = best[cell, task]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} +- {spread:.4f} [{min(values):.4f}, {max(values):.4f}]")
        print(f"{cell:10s}" + "".join(f"{c:>34s}" for c in cells))
    if "gru" in args.cells:
        print("\nMean best score relative to the GRU (the paper's yardstick), ours | paper:")
        for cell in args.cells:
            parts = []
            for task in args.tasks:
                ours = statistics.mean(best[cell, task]) / max(statistics.mean(best["gru", task]), 1e-12)
                paper = ""
                if task in TASKS and cell in PAPER:
                    paper = f" | {PAPER[cell][TASKS.index(task)] / PAPER['gru'][TASKS.index(task)]:.3f}"
                parts.append(f"{task} {ours:.3f}{paper}")
            print(f"  {cell:10s} " + ";  ".join(parts))
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run["status"]] = statuses.get(run["status"], 0) + 1
    per_task = {task: statistics.median(r["duration_s"] for r in runs if r["task"] == task) for task in args.tasks}
    print(f"\nruns: {len(runs)} ({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}); "
          f"median seconds per run: {', '.join(f'{t} {s:.1f}' for t, s in per_task.items())}")
    workers = "the logged run's" if args.from_log else str(args.workers)
    print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min) on {workers} worker process(es), {os.cpu_count()} CPUs")


_LOG_LINE = re.compile(
    r"\] (?P<cell>\S+)\s+(?P<task>\S+)\s+seed (?P<seed>\d+) #(?P<setting>\d+) (?P<status>\S+)\s+"
    r"(?P<score>\S+) \((?P<duration_s>[\d.]+)s"
)


def _runs_from_log(path: str) -> list[dict]:
    """The runs recorded in a progress log (stderr of an earlier, perhaps interrupted, benchmark)."""
    runs = []
    for line in Path(path).read_text().splitlines():
        match = _LOG_LINE.search(line)
        if match:
            run = match.groupdict()
            runs.append({**run, "seed": int(run["seed"]), "setting": int(run["setting"]),
                         "score": float(run["score"]), "duration_s": float(run["duration_s"])})
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--profile", default="small")
    parser.add_argument("--settings", type=int, default=8, help="random settings per cell, task and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir",
                        default=os.environ.get("CELLSEARCH_PTB_DIR",
                                               str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb")))
    parser.add_argument("--json", help="also write every run to this JSON file")
    parser.add_argument("--from-log", metavar="LOG", help="only print the table from an earlier run's progress log")
    args = parser.parse_args(argv)
    if args.from_log:
        elapsed = re.findall(r"^\[\d+/\d+\s+(\d+)s\]", Path(args.from_log).read_text(), flags=re.M)
        _report(_runs_from_log(args.from_log), args, wall=float(elapsed[-1]) if elapsed else float("nan"))
        return 0

    start = time.perf_counter()
    jobs = []
    for seed in range(args.seeds):
        for task in args.tasks:
            for index, hparams in enumerate(_settings(task, args.profile, seed, args.settings, args.data_dir)):
                for cell in args.cells:
                    train_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
                    jobs.append({"cell": cell, "task": task, "seed": seed, "setting": index, "hparams": hparams,
                                 "train_seed": train_seed, "profile": args.profile, "data_dir": args.data_dir})
    # Seed by seed, so that an interrupted benchmark still leaves whole seeds in its log.
    jobs.sort(key=lambda j: (j["seed"], j["setting"]))
    print(f"{len(jobs)} runs on {args.workers} worker(s), profile {args.profile}", file=sys.stderr, flush=True)
    runs = []
    # Fork shares the tasks the parent already built (copy-on-write); workers are recycled now and
    # then so that allocator fragmentation from the large PTB softmax cannot pile up.
    context = multiprocessing.get_context("fork")
    with context.Pool(args.workers, maxtasksperchild=12) as pool:
        for done, run in enumerate(pool.imap_unordered(_run, jobs), start=1):
            runs.append(run)
            print(f"[{done}/{len(jobs)} {time.perf_counter() - start:7.0f}s] {run['cell']:8s} {run['task']:10s} "
                  f"seed {run['seed']} #{run['setting']} {run['status']:8s} {run['score']:.6g} "
                  f"({run['duration_s']:.1f}s, {run['steps']} steps, width {run['hidden_size']})",
                  file=sys.stderr, flush=True)
    wall = time.perf_counter() - start

    _report(runs, args, wall)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "wall_s": wall, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
