"""The population policy: who is chosen as a parent, who enters, who leaves.

Independent of Ray, storage and Optuna: the driver hands it the members (cell hash -> the step at
which the member entered) and a score function (:func:`cellsearch.scoring.score_of` over the
driver's best results), and records what it decides. Every random draw comes from the generator the
caller passes (one stream per step, derived from the run seed), so a decision is reproducible.

Policies (``SearchConfig.selection``):

``uniform`` (the paper)
    a parent is a member drawn uniformly; a candidate that passed every filter enters when the
    population is not full, or when its score beats the worst member's, which then leaves.
``tournament``
    a parent is the best of ``tournament_size`` members drawn without replacement; admission as
    ``uniform``.
``aging`` (Real et al. 2019, regularised evolution)
    parents by tournament; a candidate that passed every filter always enters and, when the
    population is full, the *oldest* member leaves, whatever its score.

Ties (equal scores) are broken by the cell hash, so that the outcome does not depend on the order
of a dict; NaN scores rank below every number (a member without a score is the first to leave).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

__all__ = ["PopulationPolicy", "Admission", "best_first"]

Selection = Literal["uniform", "tournament", "aging"]


def _rank(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


def best_first(scores: Mapping[str, float]) -> list[str]:
    """Cell hashes ordered best score first; NaN last; ties by hash (descending, as selection breaks them)."""
    return sorted(scores, key=lambda h: (_rank(scores[h]), h), reverse=True)


@dataclass(frozen=True)
class Admission:
    """What happens to a candidate that passed every filter."""

    enters: bool
    #: The member that leaves to make room, or None.
    leaving: str | None = None


@dataclass(frozen=True)
class PopulationPolicy:
    """Selection and admission rules; see the module docstring."""

    selection: Selection = "uniform"
    population_size: int = 100
    tournament_size: int = 10

    def __post_init__(self) -> None:
        if self.selection not in ("uniform", "tournament", "aging"):
            raise ValueError(f"unknown selection {self.selection!r}: uniform, tournament or aging")
        if self.population_size < 1 or self.tournament_size < 1:
            raise ValueError("population_size and tournament_size must be at least 1")

    def select(self, members: Sequence[str], score: Callable[[str], float], rng: np.random.Generator) -> str:
        """A parent (or a member to re-evaluate) among ``members`` (in a fixed order: the caller sorts)."""
        if not members:
            raise ValueError("cannot select from an empty population")
        if self.selection == "uniform":
            return members[int(rng.integers(len(members)))]
        size = min(self.tournament_size, len(members))
        contestants = [members[i] for i in rng.choice(len(members), size=size, replace=False)]
        return max(contestants, key=lambda h: (_rank(score(h)), h))

    def admit(self, candidate_score: float, members: Mapping[str, int], score: Callable[[str], float]) -> Admission:
        """Does a candidate with ``candidate_score`` enter, and who leaves? ``members``: hash -> step entered."""
        if len(members) < self.population_size:
            return Admission(enters=True)
        if self.selection == "aging":
            oldest = min(members, key=lambda h: (members[h], h))
            return Admission(enters=True, leaving=oldest)
        worst = min(members, key=lambda h: (_rank(score(h)), h))
        # NaN ranks below every number: a NaN candidate displaces nobody, any scored one displaces a NaN member
        if _rank(candidate_score) > _rank(score(worst)):
            return Admission(enters=True, leaving=worst)
        return Admission(enters=False)
