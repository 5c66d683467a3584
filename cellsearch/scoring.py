"""The score of a cell: one definition for the driver, the tables and the report.

The paper (Jozefowicz et al. 2015, section 3) scores a cell by its worst ratio to the GRU:

    ratio(cell, task) = best(cell, task) / best(reference, task)
    score(cell)       = min over tasks of ratio(cell, task)

where ``best`` is the best held-out score over every setting trained so far (higher is better; PTB's
is 1/perplexity) and the reference is the configured reference cell (the GRU), taken at its *current*
best, which rises as it is re-evaluated.

Edge cases, decided once here so that every reader agrees:

- a task the cell has no result on yet: the ratio is NaN, so the score is NaN (not evaluated);
- a reference whose best on a task is missing, zero, negative or not finite (every one of its settings
  diverged): the ratio is NaN. A ratio to nothing says nothing; dividing by a tiny floor instead would
  give every cell with any positive result an enormous score and let noise into the population.
- a NaN ratio on any task makes the score NaN (the min does not skip it).

Pure Python on purpose: the driver calls it per cell, the tables per row; no pandas or torch needed.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

__all__ = ["task_ratio", "cell_score", "score_of", "ratios_of", "PARTIAL_STATUSES"]

#: Evaluation statuses whose score is a partial one, never a cell's best: ``pruned`` (a setting successive
#: halving stopped at a rung) and ``rung`` (a setting trained only to the promotion rung,
#: :class:`cellsearch.fidelity.PromotionConfig`).
PARTIAL_STATUSES = ("pruned", "rung")


def _number(value: object) -> float:
    """A float, or NaN for None / missing / non-numeric (a table cell may hold pandas' NA)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def task_ratio(best: object, reference_best: object) -> float:
    """``best / reference_best``; NaN when either is missing or the reference best is not a positive number."""
    best, reference_best = _number(best), _number(reference_best)
    if math.isnan(best) or not (math.isfinite(reference_best) and reference_best > 0):
        return math.nan
    return best / reference_best


def cell_score(ratios: Iterable[float]) -> float:
    """The minimum ratio over tasks; NaN when there is none or any is NaN."""
    values = [_number(ratio) for ratio in ratios]
    if not values or any(math.isnan(value) for value in values):
        return math.nan
    return min(values)


def ratios_of(best: Mapping[tuple[str, str], float], cell_hash: str, reference_hash: str,
              tasks: Iterable[str]) -> dict[str, float]:
    """Per task, the cell's ratio to the reference, from a ``(cell_hash, task) -> best`` mapping."""
    return {task: task_ratio(best.get((cell_hash, task), math.nan), best.get((reference_hash, task), math.nan))
            for task in tasks}


def score_of(best: Mapping[tuple[str, str], float], cell_hash: str, reference_hash: str,
             tasks: Iterable[str]) -> float:
    """The cell's score from a ``(cell_hash, task) -> best`` mapping (see the module docstring)."""
    return cell_score(ratios_of(best, cell_hash, reference_hash, tasks).values())
