"""Statistics for comparing cells over seeds: intervals, rank agreement, paired effects.

Every function here takes plain numbers and an explicit seed (no global random state), so a table
computed twice is the same table. The heavy lifting is scipy's (``scipy.stats.bootstrap``,
``kendalltau``, ``spearmanr``); this module only fixes the conventions cellsearch reports with:

- intervals are 95% percentile bootstrap intervals over seeds (seeds are the unit of replication);
  with a single value, or values that are all equal, the interval is that value on both sides;
- rank agreement is Kendall's tau-b and Spearman's rho between two score vectors over the same cells,
  with a bootstrap interval obtained by resampling each cell's seeds (the cell set stays fixed:
  the question is how stable the ranking of *these* cells is under training noise);
- an ordering "a above b" is judged on the difference of means with a bootstrap interval that
  resamples the seeds of a and b independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Interval", "mean_interval", "kendall_tau", "spearman_rho", "rank_agreement", "RankAgreement",
           "difference_interval", "wilson_interval", "paired_ratio_interval", "CONFIDENCE"]

#: The confidence level of every interval cellsearch reports.
CONFIDENCE = 0.95
#: Bootstrap resamples; 2,000 keeps the percentile ends stable to about 0.01 of the interval's width.
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a (low, high) interval at :data:`CONFIDENCE`."""

    estimate: float
    low: float
    high: float

    def overlaps(self, other: "Interval") -> bool:
        return not (self.low > other.high or other.low > self.high)

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _clean(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1:
        raise ValueError("expected a flat sequence of numbers")
    return array[np.isfinite(array)]


def mean_interval(values: Sequence[float], seed: int = 0) -> Interval:
    """Mean of ``values`` with a 95% percentile bootstrap interval (NaN for no finite value)."""
    array = _clean(values)
    if array.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(array.mean())
    if array.size == 1 or np.all(array == array[0]):
        return Interval(mean, mean, mean)
    from scipy import stats

    result = stats.bootstrap((array,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                             method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(mean, float(low), float(high))


def difference_interval(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Interval:
    """mean(a) - mean(b) with a 95% percentile bootstrap interval (a and b resampled independently)."""
    first, second = _clean(a), _clean(b)
    if first.size == 0 or second.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    difference = float(first.mean() - second.mean())
    rng = np.random.default_rng(seed)
    draws_a = rng.choice(first, size=(RESAMPLES, first.size), replace=True).mean(axis=1)
    draws_b = rng.choice(second, size=(RESAMPLES, second.size), replace=True).mean(axis=1)
    low, high = np.quantile(draws_a - draws_b, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return Interval(difference, float(low), float(high))


def _rank_statistic(name: str, x: Sequence[float], y: Sequence[float]) -> float:
    """scipy.stats' ``name`` (kendalltau or spearmanr) over the finite pairs; NaN if either side is constant."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return math.nan
    return float(getattr(stats, name)(x[keep], y[keep]).statistic)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score vectors over the same items (NaN if either is constant)."""
    return _rank_statistic("kendalltau", x, y)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation between two score vectors over the same items (NaN if either is constant)."""
    return _rank_statistic("spearmanr", x, y)


@dataclass(frozen=True)
class RankAgreement:
    """How well one budget's ranking of cells agrees with a reference budget's."""

    cells: int
    tau: Interval
    rho: Interval


def rank_agreement(per_cell: Sequence[tuple[Sequence[float], Sequence[float]]], seed: int = 0,
                   resamples: int = 1000) -> RankAgreement:
    """Kendall tau-b and Spearman rho between the per-cell mean scores of two budgets.

    ``per_cell`` holds, for every cell, its per-seed scores at the budget under study and at the
    reference budget. The point estimates use the means over seeds. The intervals come from
    resampling each cell's seeds ``resamples`` times; when both budgets hold the same number of
    seeds, seed i at one budget is seed i at the other (the same initialisation, or even the same
    run read at two points), so the pair is resampled together, as a paired design should be.
    """
    pairs = [(_clean(a), _clean(b)) for a, b in per_cell]
    pairs = [(a, b) for a, b in pairs if a.size and b.size]
    if len(pairs) < 2:
        nan = Interval(math.nan, math.nan, math.nan)
        return RankAgreement(len(pairs), nan, nan)
    x = np.array([a.mean() for a, _ in pairs])
    y = np.array([b.mean() for _, b in pairs])
    rng = np.random.default_rng(seed)
    taus, rhos = [], []
    for _ in range(resamples):
        xs, ys = [], []
        for a, b in pairs:
            if a.size == b.size:
                index = rng.integers(a.size, size=a.size)
                xs.append(a[index].mean())
                ys.append(b[index].mean())
            else:
                xs.append(rng.choice(a, size=a.size).mean())
                ys.append(rng.choice(b, size=b.size).mean())
        taus.append(kendall_tau(xs, ys))
        rhos.append(spearman_rho(xs, ys))

    def interval(point: float, draws: list[float]) -> Interval:
        finite = np.asarray([d for d in draws if math.isfinite(d)])
        if not math.isfinite(point) or finite.size == 0:
            return Interval(point, math.nan, math.nan)
        low, high = np.quantile(finite, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
        return Interval(point, float(low), float(high))

    return RankAgreement(len(pairs), interval(kendall_tau(x, y), taus), interval(spearman_rho(x, y), rhos))


def wilson_interval(successes: int, trials: int) -> Interval:
    """A pass rate with its 95% Wilson score interval (NaN for no trials)."""
    if trials <= 0:
        return Interval(math.nan, math.nan, math.nan)
    from scipy import stats

    result = stats.binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Interval(successes / trials, float(result.low), float(result.high))


def paired_ratio_interval(candidate: Sequence[float], reference: Sequence[float]) -> Interval:
    """The ratio of means ``mean(candidate) / mean(reference)`` over paired runs (run i of both shares
    its seed), with Fieller's 95% interval, which uses the pairs' covariance.

    This is how a winner is confirmed: the candidate beats the reference only if ``low > 1``. Fieller's
    interval is exact for normally distributed pairs and, unlike the delta method, honest when the
    reference mean is close to zero: when the reference mean is not significantly different from zero
    the interval is unbounded, returned as ``(-inf, inf)`` (never a confirmation). Fewer than 2 pairs,
    or a non-finite value, give a NaN interval.
    """
    a, b = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("candidate and reference must be paired: two sequences of the same length")
    n = len(a)
    if n == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()) or b.mean() == 0:
        return Interval(math.nan, math.nan, math.nan)
    estimate = float(a.mean() / b.mean())
    if n < 2:
        return Interval(estimate, math.nan, math.nan)
    from scipy import stats

    t = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1))
    covariance = np.cov(a, b, ddof=1) / n  # of the two means
    va, vb, vab = covariance[0, 0], covariance[1, 1], covariance[0, 1]
    ma, mb = a.mean(), b.mean()
    # Fieller: the ratios R with (ma - R mb)^2 <= t^2 (va - 2 R vab + R^2 vb), a quadratic in R.
    quadratic = mb * mb - t * t * vb
    linear = ma * mb - t * t * vab
    constant = ma * ma - t * t * va
    if quadratic <= 0:
        return Interval(estimate, -math.inf, math.inf)
    discriminant = linear * linear - quadratic * constant
    if discriminant < 0:  # cannot happen when quadratic > 0, up to rounding
        discriminant = 0.0
    root = math.sqrt(discriminant)
    return Interval(estimate, float((linear - root) / quadratic), float((linear + root) / quadratic))
