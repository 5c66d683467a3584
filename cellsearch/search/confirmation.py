"""Confirming a winner: paired re-evaluation of a candidate that scored above the reference.

A search keeps the best of many noisy evaluations, so a score above 1 (a cell beating the GRU) may be
luck. With ``confirm_seeds: N`` such a candidate gets a *confirm* step: on every task, its best setting
and the reference cell's best setting are trained again on the same N fresh seeds (seed i is shared, so
run i of both sees the same initialisation stream and data order: a pair). The candidate is
*confirmed* only when, on every task, the paired ratio of means (candidate / reference) has a 95%
interval above 1 (Fieller's interval, :func:`cellsearch.stats.paired_ratio_interval`). The cell's
confirmed ratio is that of its worst task, as the score is.

The driver decides with :func:`confirm` from the confirm step's evaluations; the tables
(:meth:`cellsearch.results.SearchRun.cells`) recompute the same from the database, so both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from cellsearch.stats import Interval, paired_ratio_interval

__all__ = ["Confirmation", "confirm", "pairs_by_task"]


@dataclass(frozen=True)
class Confirmation:
    """The outcome of a confirm step."""

    #: Per task: the paired ratio of means with its 95% interval.
    per_task: Mapping[str, Interval]
    #: Pairs (seeds trained by both cells) per task.
    pairs: Mapping[str, int]

    @property
    def confirmed(self) -> bool:
        """Every task's interval lies above 1 (a NaN interval never confirms)."""
        return bool(self.per_task) and all(interval.low > 1 for interval in self.per_task.values())

    @property
    def worst_task(self) -> str | None:
        """The task with the lowest ratio (the one that decides, as in the score); None without tasks."""
        finite = {task: i for task, i in self.per_task.items() if not math.isnan(i.estimate)}
        if not finite:
            return next(iter(self.per_task), None)
        return min(finite, key=lambda task: (finite[task].estimate, task))

    @property
    def ratio(self) -> Interval:
        """The worst task's ratio and interval (NaN without tasks)."""
        task = self.worst_task
        return self.per_task[task] if task is not None else Interval(math.nan, math.nan, math.nan)

    def summary(self) -> str:
        """One line: confirmed or not, and the ratio per task."""
        parts = ", ".join(f"{task} {i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}] ({self.pairs[task]} pairs)"
                          for task, i in self.per_task.items())
        return f"{'confirmed' if self.confirmed else 'not confirmed'}: {parts}"


def pairs_by_task(rows: Iterable[Mapping], candidate_hash: str, reference_hash: str
                  ) -> dict[str, tuple[list[float], list[float]]]:
    """Evaluation rows of a confirm step (``cell_hash``, ``task``, ``seed`` and the run's metric: ``score`` as stored,
    ``metric`` as :meth:`cellsearch.results.SearchRun.evaluations` names it) -> per task, the candidate's and the
    reference's metrics on the seeds both trained, in seed order."""
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        value = row["score"] if "score" in row else row["metric"]
        scores.setdefault((row["cell_hash"], row["task"]), {})[int(row["seed"])] = float(value)
    tasks = sorted({task for _, task in scores})
    pairs = {}
    for task in tasks:
        candidate = scores.get((candidate_hash, task), {})
        reference = scores.get((reference_hash, task), {})
        shared = sorted(set(candidate) & set(reference))
        pairs[task] = ([candidate[seed] for seed in shared], [reference[seed] for seed in shared])
    return pairs


def confirm(pairs: Mapping[str, tuple[list[float], list[float]]], tasks: Iterable[str]) -> Confirmation:
    """The confirmation of a candidate from its paired scores per task (:func:`pairs_by_task`). A task without
    pairs gets a NaN interval, which does not confirm."""
    per_task, counts = {}, {}
    for task in tasks:
        candidate, reference = pairs.get(task, ([], []))
        per_task[task] = paired_ratio_interval(candidate, reference)
        counts[task] = len(candidate)
    return Confirmation(per_task, counts)
