"""The tables, plot and summary of a fidelity study.

From the stored rows (one per trained member of a run group) every budget's results are derived
(:func:`~cellsearch.calibration.study.truncate_result` for budgets read off a longer run), then:

``runs.csv``
    one row per cell x budget x setting x seed: status, score, steps, CPU seconds;
``cells.csv``
    per cell x budget: the cell's score per seed is its best over the settings (what a search
    keeps); mean, standard deviation and 95% bootstrap interval over seeds, CPU seconds per
    evaluation (one setting trained once), divergence rate, and the filter pass rate where the
    task has a pass mark;
``budgets.csv``
    per budget: steps, median CPU seconds per evaluation, Kendall tau-b and Spearman rho of the
    cells' mean scores against the reference budget (with bootstrap intervals over seeds),
    divergence rate, orderings that hold, and the filter pass rate of the strong reference cells;
``orderings.csv``
    the paper's orderings (gated cells above tanh_rnn and lstm_f; lstm_b >= lstm) per budget:
    difference of means with its interval, whether the two cells' intervals overlap;
``score_vs_budget.png``, ``summary.txt``
    a plot of every cell's score against the budget's steps, and one screen of the above.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellsearch import stats
from cellsearch.calibration.study import StudyPlan, StudyStore, truncate_result

__all__ = ["StudyTables", "analyse", "write_outputs", "GATED", "UNGATED", "FILTER_CELLS"]

#: Cells the paper found strong on arithmetic and XML (Table 1), compared with the two weak ones.
GATED = ("gru", "lstm_b", "mut1", "mut2", "mut3")
UNGATED = ("tanh_rnn", "lstm_f")
#: Cells that must pass the memorisation filter for a search to keep GRU- and LSTM-like candidates.
FILTER_CELLS = ("gru", "lstm_b", "mut1", "mut2", "mut3")


@dataclass
class StudyTables:
    runs: Any  # pandas.DataFrame
    cells: Any
    budgets: Any
    orderings: Any
    reference_budget: str
    task: str
    pass_score: float | None
    metric: str = "accuracy"  # the task's: accuracy or inverse_perplexity


def _runs_table(plan: StudyPlan, store: StudyStore):
    import pandas as pd

    stored = store.evaluations()
    names = {c.hash: c for c in plan.cells}
    rows = []
    for budget in plan.budgets:
        group = plan.group(budget.group)
        run_limit = plan.budget(group.name).step_limit
        for record in stored[stored.run_group == group.name].to_dict("records"):
            cell = names.get(record["cell_hash"])
            if cell is None:
                continue
            result = {**record, "curve": json.loads(record["curve_json"] or "[]")}
            short = truncate_result(result, budget.step_limit, run_limit)
            rows.append({
                "budget": budget.name, "cell": cell.name, "cell_hash": cell.hash, "origin": cell.origin,
                "setting_index": record["setting_index"], "seed_index": record["seed_index"], "seed": record["seed"],
                "status": short["status"], "score": float(short["score"] or 0.0), "steps": int(short["steps"] or 0),
                "budget_steps": budget.step_limit, "cpu_s": float(short["cpu_s"] or 0.0),
                "duration_s": float(short["duration_s"] or 0.0), "hparams": record["hparams_json"],
                "hidden_size": record["hidden_size"], "message": short.get("message", ""),
            })
    columns = ["budget", "cell", "cell_hash", "origin", "setting_index", "seed_index", "seed", "status", "score",
               "steps", "budget_steps", "cpu_s", "duration_s", "hparams", "hidden_size", "message"]
    return pd.DataFrame(rows, columns=columns)


def _per_seed(runs, budget: str, cell_hash: str) -> np.ndarray:
    """A cell's score per seed at a budget: its best over the settings (errors excluded)."""
    part = runs[(runs.budget == budget) & (runs.cell_hash == cell_hash) & (runs.status != "error")]
    if part.empty:
        return np.array([])
    return part.groupby("seed_index")["score"].max().to_numpy()


def analyse(plan: StudyPlan, store: StudyStore, task) -> StudyTables:
    """Every table of the study from what ``store`` holds so far (a partial study gives partial tables)."""
    import pandas as pd

    runs = _runs_table(plan, store)
    pass_score = getattr(task, "pass_score", None)
    cell_rows = []
    for budget in plan.budgets:
        for cell in plan.cells:
            scores = _per_seed(runs, budget.name, cell.hash)
            part = runs[(runs.budget == budget.name) & (runs.cell_hash == cell.hash)]
            interval = stats.mean_interval(scores, seed=0)
            row = {
                "budget": budget.name, "budget_steps": budget.step_limit, "cell": cell.name, "cell_hash": cell.hash,
                "origin": cell.origin, "seeds": int(scores.size), "mean": interval.estimate,
                "std": float(scores.std(ddof=1)) if scores.size > 1 else math.nan,
                "ci_low": interval.low, "ci_high": interval.high,
                "cpu_s_per_evaluation": float(part.cpu_s.mean()) if not part.empty else math.nan,
                "divergence_rate": float((part.status == "diverged").mean()) if not part.empty else math.nan,
                "errors": int((part.status == "error").sum()),
            }
            if pass_score is not None:
                row["pass_rate"] = float((part.score >= pass_score).mean()) if not part.empty else math.nan
                row["seed_pass_rate"] = float((scores >= pass_score).mean()) if scores.size else math.nan
            cell_rows.append(row)
    cells = pd.DataFrame(cell_rows)

    order_rows = []
    hashes = {c.name: c.hash for c in plan.cells if c.origin == "zoo"}
    pairs = [(a, b) for a in GATED for b in UNGATED] + [("lstm_b", "lstm")]
    for budget in plan.budgets:
        for a, b in pairs:
            if a not in hashes or b not in hashes:
                continue
            first, second = _per_seed(runs, budget.name, hashes[a]), _per_seed(runs, budget.name, hashes[b])
            if not first.size or not second.size:
                continue
            difference = stats.difference_interval(first, second, seed=0)
            ia, ib = stats.mean_interval(first), stats.mean_interval(second)
            strict = (a, b) != ("lstm_b", "lstm")
            order_rows.append({
                "budget": budget.name, "above": a, "below": b, "kind": "above" if strict else "at least",
                "difference": difference.estimate, "ci_low": difference.low, "ci_high": difference.high,
                "intervals_overlap": ia.overlaps(ib),
                # "above": separated intervals; "at least": the difference's interval does not lie below 0
                "holds": (not ia.overlaps(ib) and ia.estimate > ib.estimate) if strict else difference.high >= 0,
            })
    orderings = pd.DataFrame(order_rows, columns=["budget", "above", "below", "kind", "difference", "ci_low",
                                                  "ci_high", "intervals_overlap", "holds"])

    budget_rows = []
    for budget in plan.budgets:
        per_cell = [(_per_seed(runs, budget.name, c.hash), _per_seed(runs, plan.reference_budget, c.hash))
                    for c in plan.cells]
        agreement = stats.rank_agreement(per_cell, seed=0)
        # Among the better half of the cells at the reference budget alone: a population of broken and
        # working cells is easy to rank, and what a search needs is the order among the working ones.
        reference_means = np.array([b.mean() if b.size else np.nan for _, b in per_cell])
        cut = np.nanmedian(reference_means) if np.isfinite(reference_means).any() else np.nan
        top = stats.rank_agreement([pair for pair, m in zip(per_cell, reference_means) if m >= cut], seed=0)
        # A search trains each setting once: how well does one seed's ranking agree with the reference means?
        single = [stats.kendall_tau([a[k] if k < a.size else np.nan for a, _ in per_cell], reference_means)
                  for k in range(plan.config.seeds)]
        single = [t for t in single if math.isfinite(t)]
        part = runs[runs.budget == budget.name]
        held = orderings[orderings.budget == budget.name]
        row = {
            "budget": budget.name, "profile": budget.profile, "steps": budget.step_limit,
            "steps_per_epoch": budget.budget.steps_per_epoch, "patience": budget.budget.patience,
            "learning_rate": budget.defaults.learning_rate, "run_group": budget.group,
            "cells": agreement.cells, "runs": len(part),
            "cpu_s_per_evaluation_median": float(part.cpu_s.median()) if not part.empty else math.nan,
            "tau": agreement.tau.estimate, "tau_low": agreement.tau.low, "tau_high": agreement.tau.high,
            "rho": agreement.rho.estimate, "rho_low": agreement.rho.low, "rho_high": agreement.rho.high,
            "tau_one_seed": float(np.mean(single)) if single else math.nan,
            "tau_one_seed_min": float(np.min(single)) if single else math.nan,
            "top_half_cells": top.cells, "tau_top_half": top.tau.estimate, "tau_top_half_low": top.tau.low,
            "tau_top_half_high": top.tau.high,
            "divergence_rate": float((part.status == "diverged").mean()) if not part.empty else math.nan,
            "orderings_held": f"{int(held.holds.sum())}/{len(held)}",
        }
        if pass_score is not None:
            strong = part[part.cell.isin(FILTER_CELLS) & (part.status != "error")]
            rate = stats.wilson_interval(int((strong.score >= pass_score).sum()), len(strong))
            row.update(filter_pass_rate=rate.estimate, filter_pass_low=rate.low, filter_pass_high=rate.high,
                       filter_tries=len(strong))
        budget_rows.append(row)
    budgets = pd.DataFrame(budget_rows)
    return StudyTables(runs, cells, budgets, orderings, plan.reference_budget, plan.config.task, pass_score,
                       getattr(task, "metric", "accuracy"))


def _plot(tables: StudyTables, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = tables.cells.dropna(subset=["budget_steps", "mean"])
    figure, axis = plt.subplots(figsize=(10, 6.5), dpi=110)
    zoo_colours = plt.get_cmap("tab20")
    zoo_names = sorted(cells[cells.origin != "mutated"].cell.unique())
    for name, part in cells.groupby("cell"):
        part = part.sort_values("budget_steps")
        # several budgets may share a step count (another schedule): one line per budget family is not
        # knowable here, so points at equal steps are drawn side by side without a connecting line
        mutated = part.origin.iloc[0] == "mutated"
        colour = "0.7" if mutated else zoo_colours(zoo_names.index(name) % 20)
        first = part.drop_duplicates("budget_steps", keep="last")
        error = [first["mean"] - first.ci_low, first.ci_high - first["mean"]]
        axis.errorbar(first.budget_steps, first["mean"], yerr=error,
                      color=colour, marker="o", markersize=3, linewidth=0.8 if mutated else 1.6, capsize=2,
                      alpha=0.6 if mutated else 0.95, label=None if mutated else name, zorder=1 if mutated else 2)
    axis.set_xscale("log")
    axis.set_xlabel("training steps of the budget (log scale)")
    metric = "1 / perplexity" if tables.task == "ptb" else "held-out accuracy"
    axis.set_ylabel(f"best score over settings, mean over seeds ({metric}); bars: 95% interval")
    axis.set_title(f"Fidelity study on {tables.task}: reference cells in colour, mutated cells grey")
    if tables.pass_score is not None:
        axis.axhline(tables.pass_score, color="black", linestyle="--", linewidth=0.8)
        axis.text(axis.get_xlim()[0], tables.pass_score, f" pass mark {tables.pass_score}", va="bottom", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=9, ncol=2, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_text(tables: StudyTables) -> str:
    """One screen: per budget the cost, the rank agreement with the reference, orderings and pass rate."""
    lines = [f"fidelity study on {tables.task}: {tables.cells.cell.nunique()} cells, reference budget "
             f"{tables.reference_budget}; tau/rho: Kendall/Spearman vs the reference [95% interval over seeds]; "
             f"top half: tau among the cells in the better half at the reference budget; 1 seed: mean tau of one "
             f"seed's scores against the reference means (a search trains each setting once)"]
    header = (f"{'budget':<14}{'steps':>7}{'cpu-s/eval':>11}  {'tau [95%]':<22}{'rho [95%]':<22}"
              f"{'tau, top half':<22}{'1 seed':>7}{'diverged':>9}{'orderings':>10}")
    if tables.pass_score is not None:
        header += f"  {'filter pass (strong cells)':<28}"
    lines.append(header)
    for row in tables.budgets.to_dict("records"):
        tau = f"{_fmt(row['tau'], 2)} [{_fmt(row['tau_low'], 2)}, {_fmt(row['tau_high'], 2)}]"
        rho = f"{_fmt(row['rho'], 2)} [{_fmt(row['rho_low'], 2)}, {_fmt(row['rho_high'], 2)}]"
        top = (f"{_fmt(row['tau_top_half'], 2)} [{_fmt(row['tau_top_half_low'], 2)}, "
               f"{_fmt(row['tau_top_half_high'], 2)}]")
        line = (f"{row['budget']:<14}{_fmt(row['steps']):>7}{_fmt(row['cpu_s_per_evaluation_median'], 1):>11}  "
                f"{tau:<22}{rho:<22}{top:<22}{_fmt(row['tau_one_seed'], 2):>7}{_fmt(row['divergence_rate'], 2):>9}"
                f"{row['orderings_held']:>10}")
        if tables.pass_score is not None:
            line += (f"  {_fmt(row['filter_pass_rate'], 2)} [{_fmt(row['filter_pass_low'], 2)}, "
                     f"{_fmt(row['filter_pass_high'], 2)}] of {row['filter_tries']}")
        lines.append(line)
    reference = tables.cells[tables.cells.origin != "mutated"]
    if not reference.empty:
        lines.append("")
        perplexity = tables.metric == "inverse_perplexity"
        # people read perplexity; the score (1/perplexity) stays what is ranked
        lines.append(f"reference cells, mean {'perplexity (1 / mean score)' if perplexity else 'score'} "
                     f"[95% interval] per budget:")
        budgets = list(tables.budgets.budget)
        lines.append(f"{'cell':<10}" + "".join(f"{b:>24}" for b in budgets))

        def shown(row) -> str:
            if not perplexity:
                return f"{_fmt(row['mean'])} [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]"
            inverse = [1 / v if v and v > 0 else math.inf for v in (row["mean"], row["ci_high"], row["ci_low"])]
            return f"{inverse[0]:.0f} [{inverse[1]:.0f}, {inverse[2]:.0f}]"

        for name, part in reference.groupby("cell", sort=False):
            values = {r["budget"]: shown(r) for r in part.to_dict("records")}
            lines.append(f"{name:<10}" + "".join(f"{values.get(b, '-'):>24}" for b in budgets))
    return "\n".join(lines)


def write_outputs(tables: StudyTables, directory: str | Path) -> list[Path]:
    """Write the CSV tables, the plot and the summary into ``directory``; returns the paths written."""
    directory = Path(directory)
    written = []
    for name in ("runs", "cells", "budgets", "orderings"):
        path = directory / f"{name}.csv"
        getattr(tables, name).to_csv(path, index=False, float_format="%.6g")
        written.append(path)
    if not tables.cells.empty and tables.cells["mean"].notna().any():
        _plot(tables, directory / "score_vs_budget.png")
        written.append(directory / "score_vs_budget.png")
    (directory / "summary.txt").write_text(summary_text(tables) + "\n", encoding="utf-8")
    written.append(directory / "summary.txt")
    return written
