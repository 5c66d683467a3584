"""Multi-fidelity rules: successive halving over a unit's settings, and promotion across candidates.

Torch-free, so that configs can name them without importing torch.

:class:`HalvingConfig` is read by :func:`cellsearch.training.groups.train_settings` (through
:mod:`cellsearch.training.halving`) and by the search's unit of work (``UnitSpec.halving``). With
halving on, a unit trains its K settings to a first *rung* (a fraction of the budget's planned
steps), ranks them on their best validation score so far, keeps the best ``1/eta`` of them and
continues those to the next rung, up to the full budget (Jamieson & Talwalkar 2016; one bracket of
Hyperband, Li et al. 2017). A setting that survives every rung ends exactly as it would alone.

The pure rules live here: :func:`rung_steps` (where the rungs fall) and :func:`survivors` (how many
go on).

:class:`PromotionConfig` is the search's promotion across candidates (asynchronous successive halving,
ASHA, Li et al. 2020): a candidate that passed the filter first trains its settings on every task to a
cheap *rung* (a fraction of each task's planned steps); only candidates whose rung score is in the top
``1/eta`` of every candidate measured at that rung so far go on to the full budget. The decision is
Optuna's :class:`~optuna.pruners.SuccessiveHalvingPruner` on a study holding one trial per candidate
(:mod:`cellsearch.search.driver`); :func:`best_until` reads a rung value off a learning curve.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

from cellsearch.config import ConfigError, from_mapping, option, shown, to_mapping

__all__ = ["HalvingConfig", "PromotionConfig", "FilterPromotionConfig", "rung_steps", "survivors", "best_until"]


class _Options:
    """What every multi-fidelity config does: check its values when built, convert to and from a mapping."""

    def __post_init__(self) -> None:
        _check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None):
        return from_mapping(cls, dict(data or {}))


def _check_fields(config: Any) -> None:
    """``from_dict`` checks values before building; this catches a config built directly with a bad value."""
    for item in dataclasses.fields(config):
        check = item.metadata.get("check")
        value = getattr(config, item.name)
        if check is not None and not check(value):
            raise ConfigError(f"{item.name}: {shown(value)} is out of range ({item.metadata.get('rule')})")


@dataclass(frozen=True)
class HalvingConfig(_Options):
    """Whether and how a unit's settings are pruned rung by rung (successive halving)."""

    enabled: bool = option(False, "successive halving over a unit's settings; off trains every setting to the full "
                           "budget (today's results, exactly)")
    eta: int = option(3, "keep the best 1/eta of the settings still training at each rung (3: Hyperband's default)",
                      check=lambda n: n >= 2, rule=">= 2")
    min_fraction: float = option(
        1 / 9, "the first rung as a fraction of the budget's planned steps; rungs follow at min_fraction * eta^k. "
        "1/9 with eta 3 gives rungs at 1/9, 1/3 and the whole budget: of 9 settings 3 reach the second rung and 1 the "
        "end, about 2.3 full runs' steps instead of 9",
        check=lambda f: 0 < f <= 1, rule="0 < f <= 1",
    )


def rung_steps(total_steps: int, steps_per_epoch: int, eta: int, min_fraction: float) -> list[int]:
    """The rung boundaries (training steps at which settings are ranked and pruned), ending at ``total_steps``.

    Rung ``k`` falls at ``total_steps * min_fraction * eta**k`` rounded *up* to whole epochs of
    ``steps_per_epoch`` steps (the loop evaluates, and so can rank, only at the end of an epoch);
    boundaries at or beyond ``total_steps`` are dropped, equal ones merged, and the last rung is
    ``total_steps`` itself (the full budget, which need not be a whole number of epochs when
    ``max_steps`` caps it). ``min_fraction`` is read as the nearest fraction with a denominator of at
    most a million (1/9 as written in a config is exactly one ninth), so no rounding error moves a
    rung by an epoch. ``rung_steps(90, 10, 3, 1/9) == [10, 30, 90]``.
    """
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"total_steps ({total_steps}) and steps_per_epoch ({steps_per_epoch}) must be >= 1")
    if eta < 2 or not 0 < min_fraction <= 1:
        raise ValueError(f"eta must be >= 2 (got {eta}) and 0 < min_fraction <= 1 (got {min_fraction})")
    fraction = Fraction(min_fraction).limit_denominator(10**6)
    rungs: list[int] = []
    target = total_steps * fraction
    while target < total_steps:
        step = math.ceil(target / steps_per_epoch) * steps_per_epoch
        if step >= total_steps:
            break
        if not rungs or step > rungs[-1]:
            rungs.append(step)
        target *= eta
    rungs.append(total_steps)
    return rungs


def survivors(count: int, eta: int) -> int:
    """How many of ``count`` settings still training at a rung go on: the best ``count // eta``, at least one."""
    return max(1, count // eta)


@dataclass(frozen=True)
class PromotionConfig(_Options):
    """Whether and how candidates are promoted from a cheap rung to the full budget (ASHA across candidates)."""

    enabled: bool = option(False, "a candidate that passed the filter trains every task to the cheap rung first and "
                           "goes on to the full budget only when its rung score is in the top 1/eta of the "
                           "candidates measured there so far; off: every candidate meets the tasks at the full "
                           "budget, stopped by early_stop_fraction (the paper)")
    eta: int = option(3, "promote the top 1/eta of the candidates measured at the rung (ASHA's reduction factor; 3 "
                      "as in Hyperband)", check=lambda n: n >= 2, rule=">= 2")
    fraction: float = option(
        0.25, "the rung as a fraction of each task's planned steps (rounded up to whole epochs): a candidate that is "
        "not promoted costs this fraction of a full evaluation; one that is trains the same settings on the same "
        "seeds again from the start (the rung run is a prefix of the full run)",
        check=lambda f: 0 < f < 1, rule="0 < f < 1")
    initial_cells_compete: bool = option(
        False, "whether the initial cells' rung values (read off their full runs) compete with the candidates. Off: "
        "the reference scores exactly 1 at the rung by definition and the other seeds sit near it, so they would hold "
        "top places for the whole run, and ASHA, which with fewer than eta values per promoted place promotes only a "
        "new best, promoted 1 of 14 candidates in the multi-fidelity benchmark")
    grace: int = option(
        3, "the first `grace` candidates measured at the rung are promoted whatever their rung score (their values "
        "still compete): ASHA's rule for its first few values promotes only a new best, which starves the population "
        "of full-budget members early; 3 = one eta's worth",
        check=lambda n: n >= 0, rule=">= 0")


@dataclass(frozen=True)
class FilterPromotionConfig(_Options):
    """Whether and how candidates are promoted from a cheap rung of the memorisation filter to the whole filter.

    The filter is where a search's compute goes (it rejects most candidates, each after its full training), so
    it gets its own ASHA rung: a candidate first trains the filter's settings to ``fraction`` of the filter's
    steps; only candidates whose best accuracy there is in the top ``1/eta`` of the candidates measured there
    so far (the first ``grace`` always) train the filter in full, on the same settings and seeds.
    """

    enabled: bool = option(False, "a candidate trains the memorisation filter to a cheap rung first and trains the "
                           "whole filter only when its accuracy there is in the top 1/eta of the candidates "
                           "measured there so far; off: every candidate trains the whole filter (the paper)")
    eta: int = option(3, "promote the top 1/eta of the candidates measured at the filter's rung (ASHA's reduction "
                      "factor; with eta 3 a rejected candidate costs `fraction` of the filter, a promoted one "
                      "1 + fraction)", check=lambda n: n >= 2, rule=">= 2")
    fraction: float = option(
        0.25, "the rung as a fraction of the filter's planned steps (rounded up to whole epochs); the filter's "
        "accuracy rises late (the GRU: about 0.4 at 800 of 4,000 steps, 0.95 at the end), so the rung ranks "
        "candidates rather than applying the pass mark", check=lambda f: 0 < f < 1, rule="0 < f < 1")
    grace: int = option(3, "the first `grace` candidates measured at the rung are promoted whatever their accuracy "
                        "(their values still compete): ASHA's rule for its first few values promotes only a new best",
                        check=lambda n: n >= 0, rule=">= 0")


def best_until(curve: Sequence[Mapping[str, Any]], step: int) -> float:
    """The best held-out score of a learning curve (``[{step, score}, ...]``) at or before ``step``; NaN if none.

    What a run stopped at ``step`` would report as its score: the loop's schedule depends on the curve so
    far, never on the planned total, so a run capped at ``step`` is a prefix of a longer one.
    """
    values = [float(point["score"]) for point in curve if int(point["step"]) <= step]
    values = [value for value in values if math.isfinite(value)]
    return max(values) if values else math.nan
