"""What a fidelity study trains: the task, the cells, the settings, the seeds and the budgets.

A :class:`StudyConfig` is plain, typed data (unknown keys rejected with the key named), written to
the study's directory and compared on every restart, so that a resumed study can never mix two
designs. A :class:`BudgetSpec` is one budget under study: a profile of the task file plus changes
to its run length and schedule (:class:`~cellsearch.tasks.base.Budget` keys), to its default
setting and to its hyperparameter space.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from cellsearch.batching import BatchingConfig
from cellsearch.config import ConfigError, from_mapping, option, to_mapping
from cellsearch.hparams import HyperParameterSpace, HyperParams
from cellsearch.search.config import ResourcesConfig

__all__ = ["BudgetSpec", "StudyConfig", "parse_budget", "BUDGET_NAME"]

BUDGET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")


def _budget_keys() -> set[str]:
    from cellsearch.tasks.base import Budget

    return {f.name for f in dataclasses.fields(Budget)}


def _hparam_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(HyperParams)}


@dataclass(frozen=True)
class BudgetSpec:
    """One budget of a study: a task profile with changes."""

    name: str = option(why="label in every table (a profile name is a good label for the profile as shipped)",
                       check=lambda s: BUDGET_NAME.fullmatch(s) is not None,
                       rule="a letter, then up to 39 letters, digits, '_', '-' or '.'")
    profile: str = option("small", "the task-file profile it starts from (space, default setting, budget)")
    budget: Mapping[str, Any] = option(None, "Budget keys changed (max_epochs, steps_per_epoch, patience, ...)",
                                       factory=dict)
    hparams: Mapping[str, Any] = option(None, "values of the default setting changed (learning_rate, ...)",
                                        factory=dict)
    space: Mapping[str, Any] = option(None, "hyperparameter lists replaced (for random settings)", factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.budget) - _budget_keys()
        if unknown:
            raise ConfigError(f"budget {self.name}: unknown budget key {sorted(unknown)[0]!r}; known: "
                              f"{', '.join(sorted(_budget_keys()))}")
        unknown = set(self.hparams) - _hparam_keys()
        if unknown:
            raise ConfigError(f"budget {self.name}: unknown hyperparameter {sorted(unknown)[0]!r}; known: "
                              f"{', '.join(sorted(_hparam_keys()))}")
        from cellsearch.tasks.base import Budget

        Budget.from_dict(dict(self.budget))  # values checked here, before any task is read
        HyperParams.from_dict(dict(self.hparams))
        HyperParameterSpace.from_dict(dict(self.space))

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


def parse_budget(text: str) -> BudgetSpec:
    """``NAME`` (a profile as shipped) or ``NAME=PROFILE[,KEY=VALUE...]`` from the command line.

    Keys are Budget keys (``max_steps=3000``), hyperparameters of the default setting
    (``learning_rate=5``) or, with ``space.`` in front, a hyperparameter list separated by ``|``
    (``space.learning_rate=2|5``).
    """
    import yaml

    name, separator, rest = text.partition("=")
    name = name.strip()
    if not separator:
        return from_mapping(BudgetSpec, {"name": name, "profile": name})
    profile, *pairs = [part.strip() for part in rest.split(",")]
    data: dict[str, Any] = {"name": name, "profile": profile or "small", "budget": {}, "hparams": {}, "space": {}}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"--budget {name}: expected KEY=VALUE, got {pair!r}")

        def scalar(item: str) -> Any:
            try:
                return yaml.safe_load(item.strip())
            except yaml.YAMLError:
                raise ConfigError(f"--budget {name}: cannot read value {item!r}") from None

        if key.startswith("space."):
            data["space"][key[len("space."):]] = [scalar(v) for v in value.split("|")]
        elif key in _hparam_keys():
            data["hparams"][key] = scalar(value)
        elif key in _budget_keys():
            data["budget"][key] = scalar(value)
        else:
            raise ConfigError(f"--budget {name}: unknown key {key!r}; budget keys: {', '.join(sorted(_budget_keys()))}"
                              f"; hyperparameters: {', '.join(sorted(_hparam_keys()))}; or space.HYPERPARAMETER")
    return from_mapping(BudgetSpec, data)


def _positive(value: int) -> bool:
    return value >= 1


@dataclass(frozen=True)
class StudyConfig:
    """A fidelity study: which cells, settings, seeds and budgets are trained on one task."""

    task: str = option(why="the task every budget trains on (memorize, arithmetic, xml, ptb or a task file)")
    budgets: tuple[BudgetSpec, ...] = option(
        None, "budgets under study; the one with the most steps is the reference unless reference_budget says",
        factory=tuple)
    reference_budget: str | None = option(None, "the budget others are compared with (null: the most steps)")
    zoo_cells: tuple[str, ...] | None = option(
        None, "reference cells trained (null: the 11 cells of Jozefowicz et al., cellsearch.zoo.PAPER_CELLS; Greff "
        "et al.'s family by name)")
    cell_files: tuple[str, ...] = option((), "further cells from .yaml/.json files", factory=tuple)
    mutated_cells: int = option(19, "cells drawn by mutating zoo cells (zoo + 19 = the 30 the issue asks for)",
                                check=lambda n: 0 <= n <= 10_000, rule="0..10000")
    mutation_parents: tuple[str, ...] = option(("gru", "lstm"), "zoo cells the mutated cells descend from "
                                               "(the search's initial population)")
    max_mutations: int = option(3, "each mutated cell is 1..max_mutations successive mutations of its parent",
                                check=_positive, rule=">= 1")
    default_setting: bool = option(True, "train each budget's default setting (the task default)")
    random_settings: int = option(0, "also train this many random settings of each budget's space (the same for "
                                  "every cell)", check=lambda n: 0 <= n <= 1000, rule="0..1000")
    seeds: int = option(3, "training seeds per cell and setting (the unit of replication for intervals)",
                        check=lambda n: 1 <= n <= 1000, rule="1..1000")
    seed: int = option(0, "study seed: mutated cells, random settings and training seeds derive from it",
                       check=lambda n: n >= 0, rule=">= 0")
    ptb_dir: str | None = option(None, "Penn Treebank directory (null: $CELLSEARCH_PTB_DIR)")
    device: str = option("cpu", "torch device units train on")
    resources: ResourcesConfig = option(None, "Ray resources of one unit (as in a search config)",
                                        factory=ResourcesConfig)
    batching: BatchingConfig = option(None, "a unit's same-shape members train as one batched model",
                                      factory=BatchingConfig)

    def __post_init__(self) -> None:
        if not self.default_setting and self.random_settings == 0:
            raise ConfigError("default_setting is false and random_settings is 0: no setting to train")
        if not self.budgets:
            raise ConfigError("budgets: at least one budget is needed")
        names = [b.name for b in self.budgets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"budgets: the name {repeated[0]!r} is used twice")
        if self.reference_budget is not None and self.reference_budget not in names:
            raise ConfigError(f"reference_budget: {self.reference_budget!r} is not one of the budgets "
                              f"({', '.join(names)})")
        from cellsearch import zoo

        for name in tuple(self.zoo_cells or ()) + tuple(self.mutation_parents):
            if not zoo.known(name):
                raise ConfigError(f"{name!r} is not a reference cell; known: {', '.join(zoo.names())}")
        if self.mutated_cells and not self.mutation_parents:
            raise ConfigError("mutation_parents: empty, but mutated_cells asks for mutated cells")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudyConfig":
        return from_mapping(cls, dict(data))

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_overrides(self, **changes: Any) -> "StudyConfig":
        return StudyConfig.from_dict({**self.to_dict(), **changes})
