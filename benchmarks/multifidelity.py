"""Multi-fidelity search on the `small` config: full budget vs successive halving vs halving plus promotion.

    python benchmarks/multifidelity.py --minutes 8 --seeds 0 1 2 --out results/multifidelity

For each run seed, the three variants run one after another (interleaved, so that a slower period of a
shared machine hits every variant alike), each for the same wall-clock budget with the same workers, so
the same CPU time:

``full``
    ``search_configs/small.yaml`` as shipped (every candidate that passes the filter meets the tasks at the
    full budget, stopped by the paper's early stop);
``halving``
    the same with ``settings_per_unit = settings_per_task`` and successive halving over a unit's settings
    (``fidelity``: eta 3, first rung at 1/3);
``promotion``
    ``halving`` plus promotion across candidates (``promotion``: eta 3, the rung at 1/4 of each task's steps).

Every variant runs with ``confirm_seeds: 0`` (a confirm step would spend a variable part of the budget on
re-training) and the real CLI (``cellsearch search``, embedded Ray, ``--workers``), each in its own run
directory under ``OUT/runs``; a finished run is not run again, so an interrupted benchmark continues.

Measured per run: candidates evaluated (mutated, non-duplicate cells whose evaluation ended), candidates
trained at the full budget on every scored task, both per CPU-hour (CPU time = the search phase's span, from
the end of the seed steps to the last unit's commit, x workers), and the agreement of the run's final top 10
(``SearchRun.top``, the seed cells included) with a full-budget re-evaluation of the same cells: every cell of
any run's top 10, and the reference cell, trained again at the `small` budget on every setting of each task's
`small` space, on ``--reeval-seeds`` fresh training seeds shared by all cells (the same seeds for every cell:
paired); its re-evaluated score is the search's score formula (min over tasks of the ratio to the reference,
each cell's best setting, averaged over seeds). Kendall tau between the search's scores and the re-evaluated
ones, over the run's top cells (fewer than 10 when fewer passed every task; the count is reported).
Re-evaluations are cached by cell (``OUT/reeval.csv``), so a cell in several runs' top 10 trains once.

Printed and written to ``OUT/summary.csv`` (one row per run) and ``OUT/medians.csv`` (median over seeds
per variant, and the ratio of candidates per CPU-hour to ``full``'s in the same seed).

``--archives RUN_DIR ...`` measures the same agreement on finished runs made elsewhere (hour-long runs hold
a full top 10, which the benchmark's short runs do not): each run's top 10 is re-evaluated with the cells
above, and one row per run goes to ``OUT/archives.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "full": {},
    "halving": {"settings_per_unit": 2, "fidelity": {"enabled": True, "eta": 3, "min_fraction": 1 / 3}},
    "promotion": {"settings_per_unit": 2, "fidelity": {"enabled": True, "eta": 3, "min_fraction": 1 / 3},
                  "promotion": {"enabled": True, "eta": 3, "fraction": 0.25}},
}

#: Seeds of the re-evaluation runs derive from this (fresh: no search run seed is anywhere near it).
REEVAL_SEED = 9_000_017


def variant_config(variant: str, seed: int, minutes: float) -> dict:
    import yaml

    config = yaml.safe_load((REPO / "search_configs" / "small.yaml").read_text())
    config.update({"seed": seed, "max_wall_clock_s": minutes * 60, "confirm_seeds": 0})
    config.update(VARIANTS[variant])
    return config


def run_search(out: Path, variant: str, seed: int, minutes: float, workers: int) -> Path:
    import yaml

    run_dir = out / "runs" / f"{variant}-s{seed}"
    if (run_dir / "benchmark-done").exists():
        return run_dir
    if run_dir.exists():
        # an interrupted run would give a partial budget: start it again
        import shutil

        shutil.rmtree(run_dir)
    config_path = out / "configs" / f"{variant}-s{seed}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(variant_config(variant, seed, minutes), sort_keys=False))
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {variant} seed {seed}: {minutes:g} min", flush=True)
    cli = Path(sys.executable).with_name("cellsearch")  # the console script of this environment
    subprocess.run([str(cli), "search", str(config_path), "--run-dir", str(run_dir),
                    "--workers", str(workers), "--no-progress"], check=True, stdout=subprocess.DEVNULL,
                   stderr=open(out / "runs" / f"{variant}-s{seed}.log", "w"))
    (run_dir / "benchmark-done").write_text(f"{time.time() - started:.1f}\n")
    return run_dir


def run_statistics(run_dir: Path, workers: int, top: int) -> tuple[dict, "object"]:
    from cellsearch.results import load_run

    results = load_run(run_dir)
    try:
        cells, steps, units = results.cells(), results.steps(), results.units()
        best = results.top(top)
        tasks = list(results.tasks)
    finally:
        results.close()
    # the search phase only: from the end of the seed steps (the same GRU and LSTM evaluations in every variant) to
    # the last unit's commit
    seeds_done = steps.loc[steps["kind"] == "seed", "finished_at"].max()
    span_s = (units["finished_at"].max() - seeds_done).total_seconds()
    cpu_hours = span_s * workers / 3600
    mutated = cells[cells["parent_hash"].notna() & (cells["rejected_by"].fillna("") != "duplicate")
                    & (cells["status"] != "evaluating")]
    at_full = mutated[mutated[[f"metric_{t}" for t in tasks]].notna().all(axis="columns")
                      & (mutated["reached"] == "full")]
    stats = {"cpu_hours": cpu_hours, "steps": int((steps["kind"] != "seed").sum()),
             "candidates": len(mutated), "at_full_budget": len(at_full),
             "passed_every_task": int(mutated["status"].isin(["population", "evaluated"]).sum()),
             "candidates_per_cpu_hour": len(mutated) / cpu_hours,
             "full_budget_per_cpu_hour": len(at_full) / cpu_hours,
             "filter_rejections": int((mutated["rejected_by"] == "memorize").sum())}
    return stats, best[["cell_hash", "name", "score"]]


def _train(job: dict) -> dict:
    """One re-evaluation run (a worker process): a cell, a task, one setting, one seed, at the small budget."""
    import torch

    from cellsearch.search.units import SettingSpec, UnitSpec, run_unit
    from cellsearch.tasks import get_task

    torch.set_num_threads(1)
    task = _TASKS.get(job["task"]) or _TASKS.setdefault(job["task"], get_task(job["task"]))
    unit = UnitSpec(unit_id=0, cell=job["cell"], task=job["task"], budget_profile="small",
                    settings=(SettingSpec(0, job["hparams"], job["seed"]),))
    result = run_unit(unit, task)[0]
    return {**{k: job[k] for k in ("cell_hash", "task", "setting", "seed_index", "seed")},
            "score": float(result.score), "status": result.status, "steps": result.steps}


_TASKS: dict = {}


def reevaluate(out: Path, cells: dict[str, dict], tasks: list[str], seeds: int, workers: int):
    """Train every cell at the small budget on every setting of each task's small space, on shared fresh seeds."""
    import pandas as pd

    from cellsearch.search import seeds as seed_streams
    from cellsearch.tasks import get_task

    path = out / "reeval.csv"
    # (an older benchmark wrote the column as "hash")
    done = pd.read_csv(path).rename(columns={"hash": "cell_hash"}) if path.exists() else pd.DataFrame(
        columns=["cell_hash", "task", "setting", "seed_index", "seed", "score", "status", "steps"])
    have = {(r.cell_hash, r.task, int(r.setting), int(r.seed_index)) for r in done.itertuples()}
    jobs = []
    for task_name in tasks:
        space = get_task(task_name).space_for("small")
        for setting, hparams in enumerate(space.settings()):
            for index in range(seeds):
                seed = seed_streams.derived_seed(REEVAL_SEED, 0, tasks.index(task_name), index)
                for cell_hash, spec in cells.items():
                    if (cell_hash, task_name, setting, index) not in have:
                        jobs.append({"cell_hash": cell_hash, "cell": spec, "task": task_name, "setting": setting,
                                     "hparams": hparams.to_dict(), "seed_index": index, "seed": seed})
    print(f"[{time.strftime('%H:%M:%S')}] re-evaluating: {len(jobs)} runs ({len(cells)} cells)", flush=True)
    rows = done.to_dict("records")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for number, row in enumerate(pool.map(_train, jobs), start=1):
            rows.append(row)
            if number % 10 == 0 or number == len(jobs):
                pd.DataFrame(rows).to_csv(path, index=False)
                print(f"  {number}/{len(jobs)}", flush=True)
    return pd.DataFrame(rows)


def reevaluated_scores(table, reference: str, tasks: list[str]) -> dict[str, float]:
    """Per cell: min over tasks of (mean over seeds of its best setting's score) / the reference's same."""
    from cellsearch.scoring import score_of

    best = table.groupby(["cell_hash", "task", "seed_index"])["score"].max().groupby(["cell_hash", "task"]).mean()
    mapping = {(cell, task): float(value) for (cell, task), value in best.items()}
    return {cell: score_of(mapping, cell, reference, tasks) for cell in table["cell_hash"].unique()}


def tau_interval(searched: list[float], again: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of Kendall tau over the cells (resampled with replacement): how much the value
    owes to which few cells happen to be in a top 10."""
    import numpy as np

    from cellsearch.stats import kendall_tau

    rng = np.random.default_rng(0)
    x, y = np.asarray(searched, dtype=float), np.asarray(again, dtype=float)
    draws = []
    for _ in range(resamples):
        index = rng.integers(x.size, size=x.size)
        tau = kendall_tau(x[index], y[index])
        if tau == tau:
            draws.append(tau)
    if not draws:
        return float("nan"), float("nan")
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(low), float(high)


def agreement(top, rescored: dict[str, float]) -> dict:
    """A top table's agreement with the re-evaluation: its size, Kendall tau and the tau's bootstrap interval
    (NaN under 3 cells), and the two score lists compared."""
    from cellsearch.stats import kendall_tau

    searched = [float(x) for x in top["score"]]
    again = [rescored.get(h, float("nan")) for h in top["cell_hash"]]
    enough = len(top) >= 3
    low, high = tau_interval(searched, again) if enough else (float("nan"), float("nan"))
    return {"top_cells": len(top), "top_tau": kendall_tau(searched, again) if enough else float("nan"),
            "top_tau_low": low, "top_tau_high": high, "searched": searched, "reevaluated": again,
            "top_hashes": " ".join(h[:12] for h in top["cell_hash"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of each search run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--reeval-seeds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "multifidelity")
    parser.add_argument("--archives", type=Path, nargs="*", default=[],
                        help="finished run directories whose top cells are re-evaluated too (agreement only)")
    args = parser.parse_args()
    os.environ.setdefault("CELLSEARCH_PTB_DIR", str(REPO.parent / "shared" / "data" / "ptb"))
    import pandas as pd

    from cellsearch import zoo

    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in args.seeds:
        for variant in args.variants:
            runs[(variant, seed)] = run_search(args.out, variant, seed, args.minutes, args.workers)
    statistics, tops = {}, {}
    for key, run_dir in runs.items():
        statistics[key], tops[key] = run_statistics(run_dir, args.workers, args.top)
    from cellsearch.results import load_run

    archive_tops = {}
    for run_dir in args.archives:
        results = load_run(run_dir)
        try:
            archive_tops[run_dir] = results.top(args.top)[["cell_hash", "name", "score"]]
        finally:
            results.close()
    first = load_run(next(iter(runs.values())))
    try:
        tasks = list(first.tasks)
        reference = first.reference_hash
        specs = {}
        for top in [*tops.values(), *archive_tops.values()]:
            for cell_hash in top["cell_hash"]:
                specs[cell_hash] = None
        specs[reference] = None
    finally:
        first.close()
    for run_dir in [*runs.values(), *args.archives]:
        results = load_run(run_dir)
        try:
            for cell_hash in specs:
                if specs[cell_hash] is None:
                    try:
                        specs[cell_hash] = results.spec(cell_hash).to_dict()
                    except Exception:  # noqa: BLE001 - the cell belongs to another run
                        pass
        finally:
            results.close()
    assert zoo.get("gru").hash == reference
    table = reevaluate(args.out, specs, tasks, args.reeval_seeds, args.workers)
    rescored = reevaluated_scores(table, reference, tasks)
    rows = []
    for (variant, seed), stats in statistics.items():
        measured = agreement(tops[(variant, seed)], rescored)
        del measured["searched"], measured["reevaluated"]
        rows.append({"variant": variant, "seed": seed, **stats, **measured})
    summary = pd.DataFrame(rows)
    full = summary[summary["variant"] == "full"].set_index("seed")["candidates_per_cpu_hour"]
    summary["candidates_ratio_vs_full"] = [r.candidates_per_cpu_hour / full.get(r.seed, float("nan"))
                                           for r in summary.itertuples()]
    summary.to_csv(args.out / "summary.csv", index=False)
    medians = summary.drop(columns=["top_hashes", "seed"]).groupby("variant").median()
    medians.to_csv(args.out / "medians.csv")
    (args.out / "rescored.json").write_text(json.dumps(rescored, indent=1))
    if archive_tops:
        archive_rows = []
        for run_dir, top in archive_tops.items():
            measured = agreement(top, rescored)
            for key in ("searched", "reevaluated"):
                measured[key] = " ".join(f"{x:.4f}" for x in measured[key])
            archive_rows.append({"run": str(run_dir), **measured})
        archives = pd.DataFrame(archive_rows)
        archives.to_csv(args.out / "archives.csv", index=False)
        print(archives.drop(columns=["top_hashes"]).to_string(index=False))
    pd.set_option("display.width", 200)
    print(summary.drop(columns=["top_hashes"]).to_string(index=False))
    print("\nmedians over seeds:")
    print(medians.to_string())


if __name__ == "__main__":
    main()
