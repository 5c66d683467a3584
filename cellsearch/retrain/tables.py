"""A retrain's output tables: ``results.csv``, ``curves.csv`` and ``curves.png``, ``summary.csv`` and ``summary.md``.

:func:`load_retrain` reads an output directory (finished or not) back into pandas tables
(:class:`RetrainResults`); :func:`write_outputs` (re)writes the files from the finished runs.
Every ``result.json`` read is checked (:func:`read_record`): a damaged one is one clear line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cellsearch.errors import UserError
from cellsearch.retrain.plan import PLAN_FILE, is_int, read_json, read_plan
from cellsearch.tasks import tasks_dir
from cellsearch.tasks.base import load_task_file

__all__ = ["RetrainResults", "load_retrain", "write_outputs", "read_record", "markdown_table", "summary_markdown",
           "plot_curves"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: What a reader of result.json uses, and the type it needs.
_RECORD_FIELDS = {"status": lambda v: isinstance(v, str), "hidden_size": is_int, "parameter_count": is_int,
                  "score": _is_number, "epochs": is_int, "steps": is_int, "duration_s": _is_number,
                  "metrics": lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
                  "curve": lambda v: isinstance(v, list) and all(isinstance(point, dict) for point in v)}


def read_record(path: Path) -> dict[str, Any]:
    """A run's ``result.json``, checked to hold what the tables read."""
    record = read_json(path, "run result")
    bad = [key for key, check in _RECORD_FIELDS.items() if key not in record or not check(record[key])]
    if bad:
        raise UserError(f"{path}: not a retrain run result (bad or missing {', '.join(bad)}); delete it to redo "
                        f"that run")
    return record


@dataclass
class RetrainResults:
    """A retrain's tables (pandas): one row per run, per evaluation, per cell; see :mod:`cellsearch.retrain`."""

    out_dir: Path
    plan: dict[str, Any]
    runs: pd.DataFrame
    curves: pd.DataFrame
    summary: pd.DataFrame
    metrics: tuple[str, ...] = field(default=())

    @property
    def task(self) -> str:
        return self.plan["task"]


def _main_metrics(metric_kind: str) -> tuple[str, ...]:
    """The metrics a summary shows: perplexities for language modelling, accuracies otherwise."""
    name = "perplexity" if metric_kind == "inverse_perplexity" else "accuracy"
    return (f"valid_{name}", f"test_{name}")


def load_retrain(out_dir: str | os.PathLike) -> RetrainResults:
    """Read a retrain output directory (finished or not) into tables."""
    out_dir = Path(out_dir)
    plan_path = out_dir / PLAN_FILE
    if not plan_path.is_file():
        raise UserError(f"{out_dir} is not a retrain output directory (no {PLAN_FILE})")
    plan = read_plan(plan_path)
    task_path = tasks_dir() / f"{plan['task']}.yaml"
    metric_kind = load_task_file(task_path).metric if task_path.is_file() else "accuracy"
    metrics = _main_metrics(metric_kind)
    rows, curve_rows = [], []
    for cell in plan["cells"]:
        for index, seed in enumerate(plan["seeds"]):
            path = out_dir / "runs" / cell["label"] / f"seed-{index}" / "result.json"
            if not path.is_file():
                continue
            record = read_record(path)
            rows.append({
                "cell": cell["label"], "role": cell["role"], "cell_hash": cell["hash"], "seed_index": index,
                "seed": seed,
                "status": record["status"], "hidden_size": record["hidden_size"],
                "parameter_count": record["parameter_count"], "metric": record["score"],
                **{key: record["metrics"].get(key, math.nan) for key in (*metrics, "valid_loss", "test_loss")},
                "best_epoch": record["metrics"].get("best_epoch", math.nan), "epochs": record["epochs"],
                "steps": record["steps"], "duration_s": record["duration_s"],
                "resumed_from_epoch": record.get("resumed_from_epoch"),
            })
            for point in record["curve"]:
                curve_rows.append({"cell": cell["label"], "role": cell["role"], "seed_index": index, "seed": seed,
                                   **point})
    runs = pd.DataFrame(rows, columns=["cell", "role", "cell_hash", "seed_index", "seed", "status", "hidden_size",
                                       "parameter_count", "metric", *metrics, "valid_loss", "test_loss",
                                       "best_epoch", "epochs", "steps",
                                       "duration_s", "resumed_from_epoch"])
    curves = pd.DataFrame(curve_rows)
    return RetrainResults(out_dir, plan, runs, curves, _summarise(runs, plan, metrics), metrics)


def _summarise(runs: pd.DataFrame, plan: Mapping[str, Any], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, standard deviation (over seeds, ddof 1), minimum and maximum per cell, in plan order."""
    rows = []
    for cell in plan["cells"]:
        mine = runs[runs["cell"] == cell["label"]]
        ok = mine[mine["status"].isin(["ok", "timeout"])]
        row: dict[str, Any] = {"cell": cell["label"], "role": cell["role"], "short_hash": cell["hash"][:12],
                               "seeds": len(mine), "ok": len(ok),
                               "hidden_size": int(mine["hidden_size"].iloc[0]) if len(mine) else math.nan,
                               "parameter_count": int(mine["parameter_count"].iloc[0]) if len(mine) else math.nan}
        for metric in metrics:
            values = ok[metric].astype(float)
            row[f"{metric}_mean"] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{metric}_min"] = values.min() if len(values) else math.nan
            row[f"{metric}_max"] = values.max() if len(values) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of a DataFrame (numbers to 4 significant digits)."""
    header = [str(column) for column in table.columns]
    rows = [[_format_cell(value) for value in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def summary_markdown(results: RetrainResults) -> str:
    """The per-cell table in markdown: mean +- standard deviation over seeds of the main metrics."""
    table = results.summary
    display = pd.DataFrame({"cell": table["cell"], "role": table["role"], "short hash": table["short_hash"],
                            "width": table["hidden_size"], "parameters": table["parameter_count"],
                            "seeds ok": [f"{ok}/{n}" for ok, n in zip(table["ok"], table["seeds"])]})
    for metric in results.metrics:
        display[metric] = [_mean_spread(mean, std)
                           for mean, std in zip(table[f"{metric}_mean"], table[f"{metric}_std"])]
    preset = results.plan["preset"]
    title = (f"Retrain on {results.task}, preset {preset}, {len(results.plan['seeds'])} seed(s) "
             f"(mean ± standard deviation over seeds)\n\n")
    return title + markdown_table(display)


def _mean_spread(mean: float, std: float) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    return f"{mean:.4g}" if isinstance(std, float) and math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def plot_curves(curves: pd.DataFrame, metrics: Sequence[str], path: Path) -> Path:
    """Held-out metric against epoch, one line per run, one colour per cell."""
    # Lazy: matplotlib takes seconds to import and is needed only here, and the non-interactive backend must be
    # chosen before pyplot is first imported (a worker or a test may have no display).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metrics[0]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if not curves.empty and metric in curves.columns:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, (cell, group) in enumerate(curves.groupby("cell", sort=False)):
            colour = colours[index % len(colours)]
            for seed_index, run in group.groupby("seed_index"):
                axis.plot(run["epoch"], run[metric], color=colour, alpha=0.85, marker=".",
                          label=cell if seed_index == group["seed_index"].min() else None)
        if "perplexity" in metric:
            axis.set_yscale("log")
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric.replace("_", " "))
    axis.set_title("held-out learning curves (one line per seed)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outputs(out_dir: str | os.PathLike) -> RetrainResults:
    """(Re)write results.csv, curves.csv, curves.png, summary.csv and summary.md from the finished runs."""
    results = load_retrain(out_dir)
    out = results.out_dir
    results.runs.to_csv(out / "results.csv", index=False)
    results.curves.to_csv(out / "curves.csv", index=False)
    results.summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
    plot_curves(results.curves, results.metrics, out / "curves.png")
    return results
