"""``cellsearch report``: a self-contained folder (HTML, PNG, CSV) describing a search and its retrains.

:func:`write_report` reads a run directory through :func:`cellsearch.load_run`
and writes, into one folder that can be opened offline or copied anywhere:

``index.html``
    one page linking every file below (relative links only; every text
    from the run is HTML-escaped);
``leaderboard.csv``
    every cell that passed every filter, best first, with its per-task
    ratios to the reference cell (the GRU) and its score (the minimum ratio);
``best_vs_evaluations.csv``, ``best_vs_evaluations.png``
    the best score among non-reference cells after each committed evaluation;
``ratios.csv``, ``ratios.png``
    the distribution of per-task ratios of every cell evaluated on that task;
``filters.csv``
    how many proposed cells were duplicates, failed memorisation, were
    stopped at each task, passed every task and entered the population;
``cells/RANK-HASH.png``, ``cells/RANK-HASH.txt``
    drawings and equations of the top cells;
``lineage.csv``
    the ancestors of the best cells back to a seed cell (GRU or LSTM), with
    the mutation applied at each step;
``retrain_summary.csv``, ``retrain_results.csv``, ``retrain_curves.csv``, ``retrain_curves.png``
    when a retrain output directory is given (:mod:`cellsearch.retrain`).

Ratios are relative to the reference cell's best score on each task at the
time the report is written (it rises as the reference is re-evaluated); the
best-score curve uses those same final denominators throughout, so it shows
how good the cells found by then look against the final reference.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cellsearch.errors import UserError
from cellsearch.outputs import output_directory
from cellsearch.scoring import PARTIAL_STATUSES, cell_score, task_ratio

__all__ = ["write_report", "best_vs_evaluations", "filter_statistics", "lineage_table", "ReportFiles", "Progress"]

#: ``progress(what, done, total)``: once with ``done`` 0 when the steps are known (the run is read), then
#: after each step of the report (a table, a plot, one drawn cell, the page) with what it wrote.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written and the files it consists of (relative to ``out_dir``)."""

    out_dir: Path
    files: tuple[str, ...]

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"


# ------------------------------------------------------------------------------ tables
def best_vs_evaluations(run, cells: pd.DataFrame) -> pd.DataFrame:
    """Best score among non-reference cells after each committed evaluation (in commit order).

    A cell is scored once it has a result on every task; its score is the
    minimum over tasks of its best so far divided by the reference cell's final
    best (``cells.attrs['reference_best']``).
    """
    evaluations = run.evaluation_scores()  # only the four columns the curve needs
    tasks = list(run.tasks)
    reference_best = cells.attrs.get("reference_best", {})
    reference = run.reference_hash
    best: dict[tuple[str, str], float] = {}
    running_best = math.nan
    curve = []
    for cell_hash, row_task, status, metric in zip(evaluations["cell_hash"], evaluations["task"],
                                                   evaluations["status"], evaluations["metric"]):
        if row_task in tasks and cell_hash != reference and status not in PARTIAL_STATUSES:
            key = (cell_hash, row_task)
            metric = float(metric) if metric is not None and not pd.isna(metric) else 0.0
            best[key] = max(best.get(key, -math.inf), metric)
            if all((cell_hash, task) in best for task in tasks):
                ratio = cell_score(task_ratio(best[(cell_hash, task)], reference_best.get(task))
                                   for task in tasks)
                if not math.isnan(ratio) and (math.isnan(running_best) or ratio > running_best):
                    running_best = ratio
        curve.append(running_best)
    if not curve:
        return pd.DataFrame([], columns=["evaluations", "cell_hash", "task", "best_score"])
    return pd.DataFrame({"evaluations": range(1, len(curve) + 1), "cell_hash": evaluations["cell_hash"].to_numpy(),
                         "task": evaluations["task"].to_numpy(), "best_score": curve},
                        columns=["evaluations", "cell_hash", "task", "best_score"])


def filter_statistics(cells: pd.DataFrame, tasks: Sequence[str], memorize_task: str | None,
                      population_changes: pd.DataFrame) -> pd.DataFrame:
    """How the proposed cells fared at each filter."""
    seeds = cells[cells["parent_hash"].isna()]
    candidates = cells[cells["parent_hash"].notna()]
    rejected_by = candidates["rejected_by"].fillna("")
    rows = [
        ("seed cells (not filtered)", len(seeds)),
        ("candidates proposed by mutation", len(candidates)),
        ("duplicates (skipped)", int((rejected_by == "duplicate").sum())),
    ]
    if memorize_task:
        if (rejected_by == "filter_promotion").any():
            rows.append(("not promoted past the filter's rung", int((rejected_by == "filter_promotion").sum())))
        rows.append((f"failed memorisation ({memorize_task})", int((rejected_by == memorize_task).sum())))
    if "promoted" in candidates and candidates["promoted"].notna().any():
        rows.append(("measured at the promotion rung", int(candidates["promoted"].notna().sum())))
        rows.append(("not promoted to the full budget", int((rejected_by == "promotion").sum())))
    for task in tasks:
        rows.append((f"stopped at {task}", int((rejected_by == task).sum())))
    rows.append(("still being evaluated", int((candidates["status"] == "evaluating").sum())))
    rows.append(("passed every task", int(candidates["status"].isin(["population", "evaluated"]).sum())))
    entered = set(population_changes.loc[population_changes["action"] == "enter", "cell_hash"])
    rows.append(("candidates that entered the population", len(entered & set(candidates["cell_hash"]))))
    rows.append(("candidates in the population now", int((candidates["status"] == "population").sum())))
    return pd.DataFrame(rows, columns=["filter", "cells"])


def _label(row: Any) -> str:
    name = getattr(row, "name", None)
    return name if isinstance(name, str) and name else row.short_hash


def lineage_table(run, hashes: Sequence[str], cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """For each cell in ``hashes``: its chain of ancestors (oldest first) with the mutation that made each.
    ``cells``: the run's cells table, read once for every chain (by default each chain reads it)."""
    rows = []
    for rank, cell_hash in enumerate(hashes, start=1):
        chain = run.lineage(cell_hash, cells=cells).iloc[::-1].reset_index(drop=True)
        for depth, row in enumerate(chain.itertuples(index=False)):
            rows.append({"rank": rank, "cell_hash": cell_hash, "depth": depth, "ancestor": _label(row),
                         "ancestor_hash": row.cell_hash, "step_created": row.step_created, "score": row.score,
                         "mutation": row.mutation_detail})
    return pd.DataFrame(rows, columns=["rank", "cell_hash", "depth", "ancestor", "ancestor_hash", "step_created",
                                       "score", "mutation"])


# ------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_best(curve: pd.DataFrame, reference_cell: str, path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    if curve["best_score"].notna().any():
        axis.step(curve["evaluations"], curve["best_score"], where="post",
                  label="best cell so far (reference excluded)")
    else:
        axis.text(0.5, 0.5, "no candidate scored on every task yet", ha="center", va="center",
                  transform=axis.transAxes)
    axis.axhline(1.0, color="grey", linestyle="--", label=f"{reference_cell} (reference)")
    axis.set_xlabel("evaluations spent (trained settings)")
    axis.set_ylabel(f"score (min over tasks of ratio to {reference_cell})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_ratios(ratios: pd.DataFrame, tasks: Sequence[str], reference_cell: str, path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.6 * max(len(tasks), 1), 3.4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        values = ratios.loc[ratios["task"] == task, "ratio"].dropna()
        if len(values):
            axis.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
        else:
            axis.text(0.5, 0.5, "no evaluated cells", ha="center", va="center", transform=axis.transAxes)
        axis.axvline(1.0, color="grey", linestyle="--")
        axis.set_title(task)
        axis.set_xlabel(f"best / {reference_cell} best")
    axes[0][0].set_ylabel("cells")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------- html
def column_label(column: str, reference_cell: str = "gru") -> str:
    """The header a person reads for a table column (the CSV files keep the column names)."""
    fixed = {"short_hash": "cell", "name": "name", "status": "status", "rejected_by": "stopped by",
             "step_created": "step", "nodes": "nodes", "params_per_width": "params / H\u00b2",
             "score": f"score (worst ratio to {reference_cell})", "evaluations": "settings trained",
             "reached": "reached", "promotion_score": "rung score", "promoted": "promoted",
             "confirmed": "confirmed", "confirm_ratio": "confirmed ratio", "confirm_low": "ratio 95% low",
             "confirm_high": "ratio 95% high", "depth": "depth", "ancestor": "ancestor", "mutation": "mutation",
             "filter": "filter", "cells": "cells", "rank": "#"}
    if column in fixed:
        return fixed[column]
    if column == "perplexity_ptb":
        return "ptb perplexity (best)"
    for prefix, template in (("metric_", "{task} {metric} (best)"), ("ratio_", "{task} ratio to " + reference_cell)):
        if column.startswith(prefix):
            task = column[len(prefix):]
            return template.format(task=task, metric="perplexity" if task == "ptb" else "accuracy")
    return column.replace("_", " ")


def _format(column: str, value: Any) -> str:
    """A number formatted for its column: perplexities with one decimal, ratios with four, accuracies with three."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if column.startswith(("ratio_", "confirm_")) or column in ("score", "promotion_score"):
            return f"{value:.4f}"
        if column == "perplexity_ptb":
            return f"{value:.1f}"
        if column.startswith("metric_"):
            return f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)


#: Columns whose values are words (left-aligned); numbers are right-aligned.
_TEXT_COLUMNS = ("short_hash", "name", "status", "rejected_by", "reached", "mutation", "ancestor", "filter", "cell",
                 "role", "stop_reason", "task")


def _table_html(table: pd.DataFrame, reference_cell: str = "gru") -> str:
    """A table in a box that scrolls sideways when it is wider than the page; human headers, formatted numbers."""
    columns = list(table.columns)
    aligned = ["text" if column in _TEXT_COLUMNS else "num" for column in columns]
    head = "".join(f"<th class='{kind}'>{html.escape(column_label(str(column), reference_cell))}</th>"
                   for column, kind in zip(columns, aligned))
    body = "".join("<tr>" + "".join(f"<td class='{kind}'>{html.escape(_format(str(column), value))}</td>"
                                    for column, kind, value in zip(columns, aligned, row)) + "</tr>"
                   for row in table.itertuples(index=False))
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _link(path: str, text: str | None = None) -> str:
    return f'<a href="{html.escape(path, quote=True)}">{html.escape(text or path)}</a>'


def _image(path: str, alt: str) -> str:
    return f'<img src="{html.escape(path, quote=True)}" alt="{html.escape(alt, quote=True)}">'


_STYLE = """
body { font-family: sans-serif; margin: 1.5em 2em; max-width: 1280px; color: #222; line-height: 1.4; }
.scroll { overflow-x: auto; max-width: 100%; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; vertical-align: bottom; font-size: 0.95em; }
th.num { max-width: 7.5em; white-space: normal; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.text { text-align: left; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
.cell { display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; max-width: 600px; }
.note { color: #555; font-size: 0.9em; }
"""


# ------------------------------------------------------------------------------- main
def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 retrain_dir: str | os.PathLike | None = None, top: int = 10, drawn: int = 5,
                 lineages: int = 3, force: bool = False, progress: Progress | None = None) -> ReportFiles:
    """Write the report of the search in ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``), atomically.

    The report is written into a fresh folder next to ``out_dir`` that then takes its place
    (:func:`cellsearch.outputs.replaced_directory`): an earlier report there is replaced as a whole, a
    folder that is not a report is refused unless ``force``. ``progress`` follows its steps (see
    :data:`Progress`). See :func:`_write_report` for the rest.
    """
    from cellsearch.outputs import replaced_directory
    from cellsearch.search.run import read_run_info

    if top < 1 or drawn < 0 or lineages < 0:
        raise UserError("--top must be at least 1; --drawn and --lineages at least 0")
    read_run_info(run_dir)  # not a run directory: refused before anything is written
    target = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    with replaced_directory(target, "cellsearch report", "report folder", force=force) as staging:
        written = _write_report(run_dir, staging, retrain_dir, top=top, drawn=drawn, lineages=lineages,
                                progress=progress)
    return ReportFiles(target, written.files)


def _write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  retrain_dir: str | os.PathLike | None = None, top: int = 10, drawn: int = 5,
                  lineages: int = 3, progress: Progress | None = None) -> ReportFiles:
    """Write the report of the search in ``run_dir`` (and of a retrain) into ``out_dir``; see the module doc.

    ``top`` cells go in the leaderboard table of the page (the CSV holds all),
    ``drawn`` of them are drawn with their equations and the lineages of the
    best ``lineages`` are traced. ``out_dir`` defaults to ``RUN_DIR/report``.
    """
    from cellsearch.results import load_run

    if top < 1 or drawn < 0 or lineages < 0:
        raise UserError("--top must be at least 1; --drawn and --lineages at least 0")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    retrain = None
    if retrain_dir is not None:
        from cellsearch.retrain import load_retrain

        retrain = load_retrain(retrain_dir)
    output_directory(out, "report folder")
    output_directory(out / "cells", "report folder")
    files: list[str] = []
    sections: list[str] = []
    steps = {"done": 0, "total": 0}

    def step(what: str) -> None:
        steps["done"] += 1
        if progress is not None:
            progress(what, steps["done"], steps["total"])

    run = load_run(run_dir)
    try:
        config = run.config
        tasks = list(run.tasks)
        reference_cell = config.reference_cell
        cells = run.cells()
        evaluations_count = run.evaluation_count()

        # Leaderboard: the cells that passed every filter (as `cellsearch top`), best first.
        scored = cells[cells["status"].isin(["population", "evaluated"]) & cells["score"].notna()].copy()
        scored.insert(0, "rank", range(1, len(scored) + 1))
        # people read PTB as perplexity (the tables keep 1/perplexity as its metric)
        metrics = [("perplexity_ptb" if t == "ptb" else f"metric_{t}") for t in tasks]
        leaderboard_columns = ["rank", "cell_hash", "short_hash", "name", "status", "rejected_by", "step_created",
                               "nodes", "params_per_width", *metrics, *[f"ratio_{t}" for t in tasks],
                               "score", "evaluations", "parent_hash"]
        if cells["promoted"].notna().any():  # promotion across candidates: the rung score that let it go on
            leaderboard_columns.insert(-2, "promotion_score")
        if cells["confirmed"].notna().any():  # confirm_seeds: the paired re-evaluation of cells above 1
            leaderboard_columns[-2:-2] = ["confirmed", "confirm_ratio", "confirm_low", "confirm_high", "score_mean",
                                          "score_spread"]
        leaderboard = scored[leaderboard_columns]
        # leaderboard, best-score curve, ratios, filters, the drawn cells, lineage, the retrain, the page
        steps["total"] = 6 + min(drawn, len(leaderboard)) + (retrain is not None)
        if progress is not None:
            progress("run read", 0, steps["total"])
        leaderboard.to_csv(out / "leaderboard.csv", index=False)
        files.append("leaderboard.csv")
        # the page shows what tells the cells apart: a leaderboard cell passed every filter, so "stopped by" is empty
        shown = leaderboard.head(top).drop(columns=["cell_hash", "parent_hash", "rejected_by"])
        first = ["rank", "short_hash", "name", "score", *[f"ratio_{t}" for t in tasks]]  # what ranks them, first
        shown = shown[first + [column for column in shown.columns if column not in first]]
        reference_best = cells.attrs.get("reference_best", {})
        sections.append(
            "<h2>Leaderboard</h2>"
            f"<p class='note'>Ratios are each cell's best score on a task divided by the current best of the "
            f"reference cell {html.escape(reference_cell)} there ("
            + html.escape(", ".join(f"{task}: perplexity {1 / value:.1f}" if task == "ptb" and value > 0
                                    else f"{task}: {value:.4g}" for task, value in reference_best.items()
                                    if isinstance(value, float) and not math.isnan(value)))
            + "; PTB's score is 1/perplexity, so a PTB ratio is the reference's perplexity over the cell's); the "
            "score is the minimum ratio over tasks. Only cells that passed every filter are listed.</p>"
            + _table_html(shown, reference_cell) + f"<p>All {len(leaderboard)} cells: {_link('leaderboard.csv')}</p>")
        step("leaderboard")

        # Best score against evaluations spent.
        curve = best_vs_evaluations(run, cells)
        curve.to_csv(out / "best_vs_evaluations.csv", index=False)
        _plot_best(curve, reference_cell, out / "best_vs_evaluations.png")
        files += ["best_vs_evaluations.csv", "best_vs_evaluations.png"]
        sections.append(
            "<h2>Best score against evaluations spent</h2>"
            f"<p class='note'>{evaluations_count} trained settings committed. Scores use the reference's current "
            "best on each task throughout.</p>"
            + _image("best_vs_evaluations.png", "best score against evaluations")
            + f"<p>{_link('best_vs_evaluations.csv')}</p>")
        step("best score curve")

        # Distribution of per-task ratios.
        ratios = pd.concat([pd.DataFrame({"task": task, "cell_hash": cells["cell_hash"],
                                          "ratio": cells[f"ratio_{task}"]})
                            for task in tasks], ignore_index=True)
        ratios = ratios[ratios["ratio"].notna() & (ratios["cell_hash"] != run.reference_hash)]
        ratios.to_csv(out / "ratios.csv", index=False)
        _plot_ratios(ratios, tasks, reference_cell, out / "ratios.png")
        files += ["ratios.csv", "ratios.png"]
        counts = ", ".join(f"{task}: {int((ratios['task'] == task).sum())} cells" for task in tasks)
        sections.append("<h2>Per-task ratios of evaluated cells</h2>"
                        f"<p class='note'>{html.escape(counts)} (the reference cell excluded).</p>"
                        + _image("ratios.png", "distribution of per-task ratios") + f"<p>{_link('ratios.csv')}</p>")
        step("ratios")

        # Filter statistics.
        filters = filter_statistics(cells, tasks, config.memorize_task, run.population_changes())
        filters.to_csv(out / "filters.csv", index=False)
        files.append("filters.csv")
        sections.append("<h2>Filters</h2>" + _table_html(filters) + f"<p>{_link('filters.csv')}</p>")
        step("filters")

        # Drawings and equations of the top cells.
        top_cells = leaderboard.head(drawn)
        blocks = []
        for row in top_cells.itertuples(index=False):
            spec = run.spec(row.cell_hash)
            stem = f"cells/{row.rank:02d}-{row.short_hash}"
            spec.draw(out / f"{stem}.png")
            (out / f"{stem}.txt").write_text(spec.equations() + "\n", encoding="utf-8")
            files += [f"{stem}.png", f"{stem}.txt"]
            title = f"#{row.rank} {_label(row)} (score {row.score:.4g}, {row.nodes} nodes)"
            blocks.append(f"<div class='cell'><h3>{html.escape(title)}</h3>"
                          f"<pre>{html.escape(spec.equations())}</pre>{_image(stem + '.png', title)}"
                          f"<p class='note'>hash {html.escape(row.cell_hash)} · {_link(stem + '.txt', 'equations')}</p>"
                          "</div>")
            step(f"cell #{row.rank} {_label(row)} drawn")
        sections.append("<h2>Top cells</h2>" + ("".join(blocks) or "<p>No cell has been scored on every task yet.</p>"))

        # Lineage of the best cells.
        # Seed cells have no lineage to show: trace the best cells made by mutation.
        best_hashes = list(leaderboard.loc[leaderboard["parent_hash"].notna(), "cell_hash"].head(lineages))
        lineage = lineage_table(run, best_hashes, cells=cells)
        lineage.to_csv(out / "lineage.csv", index=False)
        files.append("lineage.csv")
        parts = []
        for rank, group in lineage.groupby("rank", sort=True):
            shown_lineage = group[["depth", "ancestor", "step_created", "score", "mutation"]]
            parts.append(f"<h3>{html.escape(group['cell_hash'].iloc[0][:12])}</h3>" + _table_html(shown_lineage))
        sections.append("<h2>Lineage of the best cells</h2><p class='note'>From the seed cell (depth 0) to the cell, "
                        "with the mutation that made each step.</p>"
                        + ("".join(parts) or "<p>No candidate has been scored on every task yet.</p>")
                        + f"<p>{_link('lineage.csv')}</p>")
        step("lineage")
        title = f"cellsearch report: run {run.run_id}"
        header = (f"<h1>{html.escape(title)}</h1><p class='note'>Run directory {html.escape(str(Path(run_dir)))}; "
                  f"tasks {html.escape(', '.join(tasks))}; budget profile {html.escape(config.budget_profile)}; "
                  f"{len(cells)} cells proposed; reference cell {html.escape(reference_cell)}.</p>")
    finally:
        run.close()

    if retrain is not None:
        retrain.summary.to_csv(out / "retrain_summary.csv", index=False)
        retrain.runs.to_csv(out / "retrain_results.csv", index=False)
        retrain.curves.to_csv(out / "retrain_curves.csv", index=False)
        from cellsearch.retrain import plot_curves

        plot_curves(retrain.curves, retrain.metrics, out / "retrain_curves.png")
        files += ["retrain_summary.csv", "retrain_results.csv", "retrain_curves.csv", "retrain_curves.png"]
        plan = retrain.plan
        sections.append(
            "<h2>Retraining</h2>"
            f"<p class='note'>Task {html.escape(plan['task'])}, preset {html.escape(plan['preset'])}, "
            f"{len(plan['seeds'])} seed(s) per cell, from {html.escape(str(retrain.out_dir))}.</p>"
            + _table_html(retrain.summary)
            + _image("retrain_curves.png", "retrain learning curves")
            + "<p>" + " · ".join(_link(name) for name in ("retrain_summary.csv", "retrain_results.csv",
                                                           "retrain_curves.csv")) + "</p>")
        step("retrain")

    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            + header + "".join(sections) + "</body></html>\n")
    (out / "index.html").write_text(page, encoding="utf-8")
    files.insert(0, "index.html")
    _remove_stale_drawings(out, files)
    step("page")
    return ReportFiles(out, tuple(files))


def _remove_stale_drawings(out: Path, files: Sequence[str]) -> None:
    """Drop drawings left by an earlier report in the same folder, so the folder matches the page."""
    keep = {out / name for name in files}
    for path in (out / "cells").iterdir():
        if path not in keep and path.suffix in (".png", ".txt"):
            path.unlink()
