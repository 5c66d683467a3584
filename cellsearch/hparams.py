"""Hyperparameters: one setting, the per-task space, and sampling through Optuna.

The paper searched hyperparameters at random from small discrete lists (init
scale, learning rate, gradient-norm cap, layers, parameter budget; dropout only
for language modelling). A :class:`HyperParameterSpace` holds those lists (read
from a task file, ``tasks/NAME.yaml``); a :class:`HyperParams` is one point of
it. :func:`sample_settings` asks an Optuna study for new points and guarantees
that a study (one per cell and task) never receives the same setting twice:
random sampling without replacement, the paper's procedure. TPE is selectable
through :func:`make_sampler`.

Two fields of a setting are not searched: ``dropout_mode`` (``standard`` or ``variational``,
Gal & Ghahramani's per-sequence masks) and ``layer_norm`` (Ba et al.'s normalisation of every
linear node). They are fixed per task default or retrain preset, have no list in the space, and
are left out of :meth:`HyperParams.to_dict` at their defaults, so that every stored setting
(database rows, Optuna trials, checkpoint identities) written before they existed reads and
compares exactly as before.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from cellsearch.config import ConfigError, from_mapping, option, to_mapping

__all__ = [
    "HyperParams",
    "HyperParameterSpace",
    "SAMPLERS",
    "make_sampler",
    "sample_settings",
    "setting_key",
]

#: Sampler kinds accepted by :func:`make_sampler`.
SAMPLERS = ("random", "tpe")
#: Consecutive duplicate proposals tolerated before a random unseen setting is
#: enqueued instead (TPE can fixate on one point; rejection sampling slows down
#: as a small space fills up).
_MAX_REJECTIONS = 20
_USER_ATTR_DUPLICATE = "duplicate_of_earlier_setting"


#: Upper bound of the real-valued hyperparameters: the largest round number below float32's 3.4e38, beyond
#: which torch fails mid-run ("value cannot be converted to type float without overflow" for a learning rate
#: of 1e39, "from is out of bounds" for an init scale of 1e300). Up to it a run that blows up ends as
#: ``diverged``, which tests use on purpose (a learning rate of 1e38).
MAX_SCALE = 1e38


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def _scale(value: float) -> bool:
    return _positive(value) and value <= MAX_SCALE


_SCALE_RULE = f"> 0 and <= {MAX_SCALE:g}"


@dataclass(frozen=True)
class HyperParams:
    """One hyperparameter setting of a training run."""

    init_scale: float = option(1.0, "weights start uniform in +-init_scale/sqrt(width)", check=_scale, rule=_SCALE_RULE)
    learning_rate: float = option(1.0, "plain SGD step size", check=_scale, rule=_SCALE_RULE)
    max_grad_norm: float = option(5.0, "gradient-norm clipping threshold", check=_scale, rule=_SCALE_RULE)
    num_layers: int = option(1, "stacked cell layers", check=lambda n: 1 <= n <= 16, rule="1..16")
    parameter_budget: int = option(
        100_000,
        "total learned parameters (embedding + cells + softmax); fixes the width",
        check=lambda n: n > 0,
        rule="> 0",
    )
    dropout: float = option(
        0.0, "dropout between layers and before the softmax", check=lambda p: 0 <= p < 1, rule="0 <= p < 1"
    )
    dropout_mode: Literal["standard", "variational"] = option(
        "standard",
        "standard: a fresh mask per element (Zaremba et al.); variational: one mask per sequence on the "
        "input, output and recurrent state (Gal & Ghahramani 2016). Not searched",
    )
    layer_norm: bool = option(False, "normalise every linear node of the cell (Ba et al. 2016). Not searched")

    def to_dict(self) -> dict[str, Any]:
        """Plain data; the regularisers only when they differ from their defaults (see the module doc)."""
        data = to_mapping(self)
        for name, default in _UNSEARCHED_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HyperParams":
        """Build from plain data; unknown keys and bad values raise ``ConfigError``."""
        return from_mapping(cls, dict(data))

    def replace(self, **changes: Any) -> "HyperParams":
        """A validated copy with some values changed."""
        return HyperParams.from_dict({**self.to_dict(), **changes})


def _nonempty(values: tuple) -> bool:
    return len(values) > 0 and len(set(values)) == len(values)


_CHOICES_RULE = "a non-empty list without repeats"


@dataclass(frozen=True)
class HyperParameterSpace:
    """The discrete choices for every field of :class:`HyperParams` (defaults: the paper's lists)."""

    init_scale: tuple[float, ...] = option(
        (0.3, 0.7, 1.0, 1.4, 2.0, 2.8), "the paper's list", check=_nonempty, rule=_CHOICES_RULE
    )
    learning_rate: tuple[float, ...] = option(
        (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0), "the paper's list", check=_nonempty, rule=_CHOICES_RULE
    )
    max_grad_norm: tuple[float, ...] = option(
        (1.0, 2.5, 5.0, 10.0, 20.0), "the paper's list", check=_nonempty, rule=_CHOICES_RULE
    )
    num_layers: tuple[int, ...] = option((1, 2, 3, 4), "the paper's list", check=_nonempty, rule=_CHOICES_RULE)
    parameter_budget: tuple[int, ...] = option(
        (100_000,), "per task (set in the task file)", check=_nonempty, rule=_CHOICES_RULE
    )
    dropout: tuple[float, ...] = option((0.0,), "only the PTB task varies it", check=_nonempty, rule=_CHOICES_RULE)

    def __post_init__(self) -> None:
        # Every combination must be a valid setting; checking the extremes of each list suffices.
        for name in self.names():
            for value in getattr(self, name):
                HyperParams.from_dict({name: value})

    @staticmethod
    def names() -> tuple[str, ...]:
        """The searched fields of :class:`HyperParams` (every field but the regularisers)."""
        return tuple(f.name for f in dataclasses.fields(HyperParameterSpace))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HyperParameterSpace":
        return from_mapping(cls, dict(data))

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    def override(self, changes: Mapping[str, Any] | None) -> "HyperParameterSpace":
        """A new space with some lists replaced (a budget profile narrowing the space)."""
        if not changes:
            return self
        return HyperParameterSpace.from_dict({**self.to_dict(), **dict(changes)})

    @property
    def size(self) -> int:
        """Number of distinct settings."""
        return math.prod(len(getattr(self, name)) for name in self.names())

    def __contains__(self, params: object) -> bool:
        if not isinstance(params, HyperParams):
            return False
        return all(getattr(params, name) in getattr(self, name) for name in self.names())

    def settings(self) -> Iterator[HyperParams]:
        """Every setting, in a fixed order."""
        lists = [getattr(self, name) for name in self.names()]
        for values in itertools.product(*lists):
            yield HyperParams(**dict(zip(self.names(), values)))

    def distributions(self) -> dict[str, Any]:
        """Optuna categorical distributions, one per field."""
        from optuna.distributions import CategoricalDistribution

        return {name: CategoricalDistribution(list(getattr(self, name))) for name in self.names()}

    def from_params(self, params: Mapping[str, Any]) -> HyperParams:
        """The setting for an Optuna trial's ``params`` (which must lie in this space)."""
        missing = [name for name in self.names() if name not in params]
        if missing:
            raise ConfigError(f"trial parameters lack {', '.join(missing)}")
        setting = HyperParams.from_dict({name: params[name] for name in self.names()})
        if setting not in self:
            raise ConfigError(f"setting {setting.to_dict()} is outside the space")
        return setting

    def sample(self, rng: np.random.Generator) -> HyperParams:
        """One uniformly random setting (without Optuna; used for fallbacks and benchmarks)."""
        values = {name: getattr(self, name)[int(rng.integers(len(getattr(self, name))))] for name in self.names()}
        return HyperParams(**values)


#: Fields of a setting that the space does not search, and their defaults.
_UNSEARCHED_DEFAULTS = {"dropout_mode": "standard", "layer_norm": False}


def setting_key(params: HyperParams | Mapping[str, Any]) -> tuple:
    """A hashable identity of a setting; numbers compare by value (1 == 1.0)."""
    data = params.to_dict() if isinstance(params, HyperParams) else dict(params)
    return tuple((name, float(data[name])) for name in HyperParameterSpace.names())


def make_sampler(kind: str = "random", seed: int | None = None):
    """An Optuna sampler: ``random`` (the paper's; the default) or ``tpe``, seeded."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ConfigError(f"sampler: expected one of {list(SAMPLERS)}, got {kind!r}")


def _seen_settings(study) -> set[tuple]:
    from optuna.trial import TrialState

    seen = set()
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING or not trial.params:
            continue
        if set(trial.params) >= set(HyperParameterSpace.names()):
            seen.add(setting_key(trial.params))
    return seen


def sample_settings(study, space: HyperParameterSpace, n: int) -> list[tuple[Any, HyperParams]]:
    """Ask ``study`` for up to ``n`` settings from ``space`` that it has never seen.

    Returns ``(trial, setting)`` pairs; the caller trains each and reports with
    ``study.tell(trial, score)`` (or ``state=TrialState.FAIL``). A proposal that
    repeats a setting already in the study (in any state: running, finished or
    failed) is closed as ``FAIL`` with the user attribute
    ``duplicate_of_earlier_setting`` and asked again; after a run of rejections a
    uniformly random unseen setting is enqueued instead, so the call stays quick
    even when the space is nearly used up. Fewer than ``n`` pairs come back only
    when the space is exhausted. Deterministic for a seeded sampler and a given
    study history.
    """
    from optuna.trial import TrialState

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    distributions = space.distributions()
    seen = _seen_settings(study)
    # The fallback generator is seeded by the study's history so that a resumed study stays deterministic.
    fallback = np.random.default_rng([len(study.get_trials(deepcopy=False)), len(seen)])
    chosen: list[tuple[Any, HyperParams]] = []
    rejections = 0
    while len(chosen) < n and len(seen) < space.size:
        if rejections >= _MAX_REJECTIONS:
            unseen = [s for s in space.settings() if setting_key(s) not in seen]
            pick = unseen[int(fallback.integers(len(unseen)))]
            study.enqueue_trial(pick.to_dict())
            rejections = 0
        trial = study.ask(distributions)
        setting = space.from_params(trial.params)
        key = setting_key(setting)
        if key in seen:
            trial.set_user_attr(_USER_ATTR_DUPLICATE, True)
            study.tell(trial, state=TrialState.FAIL)
            rejections += 1
            continue
        seen.add(key)
        rejections = 0
        chosen.append((trial, setting))
    return chosen
