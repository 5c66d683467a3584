"""What every task shares: the task file format, budgets, data splits and the Task object.

A task file (``tasks/NAME.yaml``) is read into typed configs (unknown keys are
rejected with the key named). Its parts:

``kind``
    which generator or loader builds the data (memorize, arithmetic, xml, ptb);
``data``
    that generator's parameters (checked by the kind's own config class);
``metric``
    ``accuracy`` (fraction of scored positions predicted exactly, argmax) or
    ``inverse_perplexity`` (1 / exp(mean cross-entropy)); higher is better;
``batch_size``, ``unroll``
    the paper's 20 and 35;
``space``, ``defaults``
    the hyperparameter lists and the setting used when none is given;
``profiles``
    ``smoke``, ``small`` and ``paper``: a :class:`Budget` plus optional
    overrides of ``space`` and ``defaults`` (a smoke run narrows layers and
    parameter budgets to small values, for instance).

Every task is a language-model-shaped problem: one token stream per split and
an optional boolean mask that marks which positions are *scored targets* (the
answer characters of memorize and arithmetic; all positions elsewhere). One
training loop serves all tasks that way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from cellsearch.config import ConfigError, from_mapping, load_yaml, option, to_mapping
from cellsearch.hparams import HyperParameterSpace, HyperParams

__all__ = [
    "Budget",
    "Profile",
    "RetrainPreset",
    "TaskFile",
    "Split",
    "Task",
    "PROFILES",
    "load_task_file",
    "encode_text",
    "data_config",
]

#: Budget profiles every task file defines: a test budget, a laptop hour, a cluster or overnight run, the paper.
PROFILES = ("smoke", "small", "medium", "paper")
#: A task's name labels database rows, Optuna studies and output folders.
TASK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
METRICS = ("accuracy", "inverse_perplexity")


def _positive_or_none(value: Any) -> bool:
    return value is None or value > 0


@dataclass(frozen=True)
class Budget:
    """How long one training run may go on (see :func:`cellsearch.training.train_and_evaluate`)."""

    max_epochs: int = option(
        50, "upper bound on epochs (the LR decay usually stops earlier)", check=lambda n: n >= 1, rule=">= 1"
    )
    steps_per_epoch: int | None = option(
        None, "steps between held-out evaluations; null = one full pass over the training stream",
        check=_positive_or_none, rule="> 0 or null",
    )
    max_steps: int | None = option(
        None, "hard cap on optimizer steps over the whole run", check=_positive_or_none, rule="> 0 or null"
    )
    max_seconds: float | None = option(
        None, "wall-clock cap; reaching it ends the run with status 'timeout' and the score so far",
        check=_positive_or_none, rule="> 0 or null",
    )
    eval_tokens: int | None = option(
        None, "evaluate on at most this many held-out tokens (null = the whole split)",
        check=_positive_or_none, rule="> 0 or null",
    )
    patience: int = option(
        3, "epochs without held-out improvement before the LR decay starts (paper: 3)",
        check=lambda n: n >= 1, rule=">= 1",
    )
    decay_epochs: int = option(
        4, "epochs run with a halving LR before stopping (paper: 4)", check=lambda n: n >= 0, rule=">= 0"
    )
    decay_factor: float = option(
        0.5, "LR multiplier per decay epoch (paper: halve)", check=lambda f: 0 < f < 1, rule="0 < f < 1"
    )
    evaluate_test: bool = option(False, "after training, also score the best model on the test split")

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Budget":
        return from_mapping(cls, dict(data))

    def replace(self, **changes: Any) -> "Budget":
        """A validated copy with some values changed."""
        return Budget.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class Profile:
    """A budget profile as written in a task file."""

    budget: Budget = option(factory=Budget, why="run length")
    space: dict[str, Any] = option(factory=dict, why="replacement lists for some hyperparameters")
    defaults: dict[str, Any] = option(factory=dict, why="replacement default values for some hyperparameters")


@dataclass(frozen=True)
class RetrainPreset:
    """A retrain preset as written in a task file: one setting and one budget (``cellsearch retrain --preset``)."""

    description: str = option("", "one line for humans")
    hparams: HyperParams = option(factory=HyperParams, why="the setting every retrained cell gets")
    budget: Budget = option(factory=Budget, why="run length and learning-rate decay")


@dataclass(frozen=True)
class TaskFile:
    """The contents of ``tasks/NAME.yaml``."""

    name: str = option(why="task name (the file's stem); it labels database rows and output folders",
                       check=lambda s: TASK_NAME.fullmatch(s) is not None,
                       rule="1-64 letters, digits, '_', '-' or '.', not starting with '.'")
    kind: Literal["memorize", "arithmetic", "xml", "ptb"] = option(why="data generator or loader")
    description: str = option("", "one line for humans")
    data: dict[str, Any] = option(factory=dict, why="the kind's data parameters")
    metric: Literal["accuracy", "inverse_perplexity"] = option("accuracy", "held-out score, higher is better")
    pass_score: float | None = option(None, "score needed to pass (the memorisation filter's 0.95)")
    batch_size: int = option(20, "sequences per batch (paper: 20)", check=lambda n: 1 <= n <= 10_000, rule="1..10000")
    unroll: int = option(35, "truncated-backpropagation length (paper: 35)", check=lambda n: 1 <= n <= 10_000,
                         rule="1..10000")
    eval_batch_size: int = option(20, "sequences per held-out batch", check=lambda n: 1 <= n <= 10_000,
                                  rule="1..10000")
    space: HyperParameterSpace = option(factory=HyperParameterSpace, why="hyperparameter lists (paper's by default)")
    defaults: HyperParams = option(factory=HyperParams, why="the setting used when none is given")
    profiles: dict[str, Profile] = option(factory=dict, why="smoke, small, medium and paper budgets")
    retrain_presets: dict[str, RetrainPreset] = option(factory=dict, why="settings for cellsearch retrain --preset")


@dataclass(frozen=True)
class Split:
    """One token stream. ``mask[t]`` says whether token t is a scored prediction target (None: all are)."""

    tokens: np.ndarray
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        tokens = np.ascontiguousarray(self.tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
        # Kept in the narrowest given dtype (uint8 for characters) so that shipping a task stays cheap.
        tokens.setflags(write=False)
        object.__setattr__(self, "tokens", tokens)
        if self.mask is not None:
            mask = np.ascontiguousarray(self.mask, dtype=bool)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask shape {mask.shape} differs from tokens shape {tokens.shape}")
            mask.setflags(write=False)
            object.__setattr__(self, "mask", mask)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def head(self, n: int | None) -> "Split":
        """The first ``n`` tokens (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return Split(self.tokens[:n], None if self.mask is None else self.mask[:n])


@dataclass(frozen=True)
class _ResolvedProfile:
    budget: Budget
    space: HyperParameterSpace
    defaults: HyperParams


def encode_text(text: str, mask_text: str | None, vocabulary: tuple[str, ...]) -> Split:
    """Turn a string of one-character symbols (and a parallel string of '1'/'0' mask flags) into a Split."""
    if len(vocabulary) > 255:
        raise ValueError("character vocabularies are limited to 255 symbols")
    lookup = np.full(256, 255, dtype=np.uint8)
    for index, symbol in enumerate(vocabulary):
        lookup[ord(symbol)] = index
    tokens = lookup[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    if (tokens == 255).any():
        bad = sorted({text[i] for i in np.flatnonzero(tokens == 255)[:10]})
        raise ValueError(f"symbols outside the vocabulary: {bad}")
    mask = None
    if mask_text is not None:
        mask = np.frombuffer(mask_text.encode("ascii"), dtype=np.uint8) == ord("1")
    return Split(tokens, mask)


class Task:
    """A task: vocabulary, train/valid/test splits, model shape, metric, space and budget profiles.

    Picklable and holding its data as read-only numpy arrays, so a search ships it
    once (``ray.put(task)``) to every worker.
    """

    def __init__(
        self, definition: TaskFile, vocabulary: tuple[str, ...], splits: Mapping[str, Split], source: str = ""
    ):
        missing = [s for s in ("train", "valid") if s not in splits]
        if missing:
            raise ValueError(f"task {definition.name}: missing split(s) {missing}")
        self.name = definition.name
        self.kind = definition.kind
        self.description = definition.description
        self.metric = definition.metric
        self.pass_score = definition.pass_score
        self.batch_size = definition.batch_size
        self.unroll = definition.unroll
        self.eval_batch_size = definition.eval_batch_size
        self.vocabulary = tuple(vocabulary)
        self.splits = dict(splits)
        self.source = source
        self._space = definition.space
        self._defaults = definition.defaults
        self._profiles = {
            name: _ResolvedProfile(
                budget=profile.budget,
                space=definition.space.override(dict(profile.space)),
                defaults=HyperParams.from_dict({**definition.defaults.to_dict(), **dict(profile.defaults)}),
            )
            for name, profile in definition.profiles.items()
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(split):,}" for name, split in self.splits.items())
        return f"Task({self.name!r}, vocab={self.vocab_size}, {sizes})"

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def profiles(self) -> tuple[str, ...]:
        return tuple(self._profiles)

    @property
    def space(self) -> HyperParameterSpace:
        """The task's full hyperparameter space (the ``paper`` lists; see :meth:`space_for`)."""
        return self._space

    def _profile(self, profile: str) -> _ResolvedProfile:
        if profile not in self._profiles:
            raise ConfigError(f"task {self.name}: unknown profile {profile!r}; known: {', '.join(self._profiles)}")
        return self._profiles[profile]

    def budget(self, profile: str) -> Budget:
        """The training budget of a profile (``smoke``, ``small`` or ``paper``)."""
        return self._profile(profile).budget

    def space_for(self, profile: str) -> HyperParameterSpace:
        """The hyperparameter space for a profile (the task's space with the profile's overrides)."""
        return self._profile(profile).space

    def default_hparams(self, profile: str) -> HyperParams:
        """The setting used when none is given, for a profile."""
        return self._profile(profile).defaults

    def score(self, loss: float, accuracy: float) -> float:
        """The held-out score from the mean cross-entropy and the accuracy; higher is better."""
        if self.metric == "accuracy":
            return float(accuracy)
        return float(np.exp(-loss))

    def decode(self, tokens: Any) -> str:
        """Text for a sequence of token ids (words are joined with spaces when symbols are
        longer than one character)."""
        symbols = [self.vocabulary[int(t)] for t in np.asarray(tokens).reshape(-1)]
        joiner = "" if all(len(s) == 1 for s in self.vocabulary) else " "
        return joiner.join(symbols)


def load_task_file(path: str | Path) -> TaskFile:
    """Read and check a task file; every profile in :data:`PROFILES` must be present."""
    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = dict(raw)
    raw.setdefault("name", path.stem)
    try:
        definition = from_mapping(TaskFile, raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    missing = [p for p in PROFILES if p not in definition.profiles]
    if missing:
        raise ConfigError(f"{path}: profiles: missing {', '.join(missing)}")
    for name, profile in definition.profiles.items():
        try:
            definition.space.override(dict(profile.space))
            HyperParams.from_dict({**definition.defaults.to_dict(), **dict(profile.defaults)})
        except ConfigError as error:
            raise ConfigError(f"{path}: profiles.{name}: {error}") from None
    return definition


def data_config(cls: type, definition: TaskFile) -> Any:
    """The kind-specific data config, with errors prefixed ``data.``."""
    return from_mapping(cls, dict(definition.data), prefix="data.")
