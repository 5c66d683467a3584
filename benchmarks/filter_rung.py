"""Would a rung for the memorisation filter pay? A replay of a finished run's filter evaluations.

    python benchmarks/filter_rung.py results/small-cal/archive --out results/multifidelity

``filter_promotion`` (README, "Spending less on bad settings, trusting a winner") trains every candidate's
filter settings to a rung (``fraction`` of the filter's planned steps) and trains the whole filter only for
the candidates whose best accuracy there is in the top ``1/eta`` of those measured so far (ASHA, the first
``grace`` always); a promoted candidate trains the filter again from the start. Whether that saves compute
depends on how the filter's runs end today: the training loop already stops a run whose validation score
has stopped improving (the plateau stop), so many failing candidates never reach the filter's last step.

This script replays the filter evaluations of a run made without ``filter_promotion`` (in the order they
were committed): each one's learning curve gives the accuracy it had at the rung (``best_until``), its
duration per step what a shorter or a repeated run costs. For each (fraction, eta) it reports:

- ``promoted``: candidates ASHA would have let through, with ``grace`` as in the config;
- ``passers_lost``: candidates that passed the filter in the run but would have been stopped at the rung;
- ``cost_restart``: filter seconds with the rung, promoted candidates training again from the start (what
  cellsearch does), as a fraction of the run's filter seconds;
- ``cost_continue``: the same if a promoted run continued from the rung instead (a lower bound for any
  rung rule: nothing is trained twice).

No training happens; the figures are exact for the replayed run's curves (with one setting per candidate,
as ``small`` has), not an estimate over seeds: a second run would rank other candidates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def asha(values: list[float], eta: int, grace: int) -> list[bool]:
    """ASHA's decisions over values in measurement order (Optuna's SuccessiveHalvingPruner with one rung)."""
    decisions = []
    for n in range(1, len(values) + 1):
        ranked = sorted(values[:n], reverse=True)
        decisions.append(n <= grace or values[n - 1] >= ranked[max(1, n // eta) - 1])
    return decisions


def replay(run_dir: str, fractions: list[float], etas: list[int], grace: int):
    import pandas as pd
    import sqlalchemy as sa

    from cellsearch.fidelity import best_until
    from cellsearch.results import load_run
    from cellsearch.search.storage import EVALUATIONS

    run = load_run(run_dir)
    try:
        config = run.config
        e = EVALUATIONS.c
        rows = run._read(sa.select(e.id, e.cell_hash, e.score, e.status, e.train_steps, e.duration_s, e.curve_json)
                         .where(e.task == config.memorize_task).order_by(e.id))
        planned = run.evaluations().query("task == @config.memorize_task")["train_steps"].max()
    finally:
        run.close()
    from cellsearch.tasks import get_task

    budget = get_task(config.memorize_task).budget(config.budget_profile)
    total_steps = int(budget.max_steps or planned)
    # one value per candidate (its best setting), in the order the candidates' filter runs were committed
    rows["passed"] = rows["score"] >= config.memorize_threshold
    rows["train_steps"] = rows["train_steps"].fillna(0).astype(float)
    rows["duration_s"] = rows["duration_s"].fillna(0.0).astype(float)
    rows["per_step"] = rows["duration_s"] / rows["train_steps"].clip(lower=1)
    seconds = float(rows["duration_s"].sum())
    table = []
    for fraction in fractions:
        rung = math.ceil(total_steps * fraction / budget.steps_per_epoch) * budget.steps_per_epoch
        values = [best_until(json.loads(curve or "[]"), rung) for curve in rows["curve_json"]]
        rows["at_rung"] = [0.0 if not math.isfinite(v) else v for v in values]
        per_cell = rows.groupby("cell_hash", sort=False).agg(
            first=("id", "min"), value=("at_rung", "max"), passed=("passed", "any"))
        per_cell = per_cell.sort_values("first")
        for eta in etas:
            decided = dict(zip(per_cell.index, asha(list(per_cell["value"]), eta, grace)))
            promoted = rows["cell_hash"].map(decided)
            short = rows["train_steps"].clip(upper=rung) * rows["per_step"]
            full = rows["train_steps"] * rows["per_step"]
            restart = float(short.sum() + full[promoted].sum())
            cont = float(short[~promoted].sum() + full[promoted].sum())
            table.append({"fraction": fraction, "rung_steps": rung, "eta": eta, "grace": grace,
                          "candidates": len(per_cell), "passed": int(per_cell["passed"].sum()),
                          "promoted": int(sum(decided.values())),
                          "passers_lost": int((per_cell["passed"] & ~per_cell.index.map(decided)).sum()),
                          "cost_restart": round(restart / seconds, 3), "cost_continue": round(cont / seconds, 3)})
    summary = {"run": run_dir, "filter_seconds": round(seconds, 1), "filter_runs": len(rows),
               "planned_steps": total_steps,
               "median_steps_failed": float(rows.loc[~rows["passed"], "train_steps"].median()),
               "median_steps_passed": float(rows.loc[rows["passed"], "train_steps"].median())}
    return pd.DataFrame(table), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory or archive made without filter_promotion")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.15, 0.25, 0.5])
    parser.add_argument("--etas", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--grace", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write filter_rung.csv and filter_rung.json here")
    args = parser.parse_args(argv)
    table, summary = replay(args.run, args.fractions, args.etas, args.grace)
    print(json.dumps(summary))
    print(table.to_string(index=False))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "filter_rung.csv", index=False)
        (args.out / "filter_rung.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
