"""Typed configuration of an evolutionary search (one YAML file per search).

Every key has a default and a reason (see ``cellsearch search --describe``);
unknown keys and out-of-range values fail at load time with a message naming
the key. The defaults are the paper's settings (population 100, 20 settings
per task, memorisation filter at 0.95, early stop below 0.9 of the GRU's best).

Paths. A search writes only inside its run directory (``--run-dir``), under
fixed names (``config.yaml``, ``run.json``, ``versions.json``, ``run.db``); no
key names a file inside it, so no value can steer a write elsewhere. The two
keys that name places outside it are ones the user chooses explicitly and may
point anywhere: ``ptb_dir`` (read only; it must be an existing directory, and
hold the PTB files when a task needs them; stored absolute) and ``storage`` (a
database URL: PostgreSQL, or SQLite at an absolute file path, because a
relative one would name another file when the run is resumed from another
directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from cellsearch.batching import BatchingConfig
from cellsearch.config import ConfigError, from_mapping, load_yaml, option, to_mapping
from cellsearch.devices import is_device_name
from cellsearch.fidelity import FilterPromotionConfig, HalvingConfig, PromotionConfig
from cellsearch.errors import UserError, shown

__all__ = ["ResourcesConfig", "SearchConfig", "load_search_config", "resolve_ptb_dir", "PTB_ENV"]

#: Environment variable consulted when ``ptb_dir`` is null.
PTB_ENV = "CELLSEARCH_PTB_DIR"


#: Devices a unit can train on: spelling only, without importing torch (see :mod:`cellsearch.devices`); the
#: units may run on other machines, so whether the device exists is the worker's to find out.
_is_device = is_device_name


def _check_storage(url: str) -> None:
    """A database URL the run can reopen from anywhere (see the module docstring)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        # The URL is not echoed: it may hold a password.
        raise ConfigError("storage: not a database URL (e.g. postgresql://USER@HOST/DB or "
                          "sqlite:////absolute/path/run.db; null for SQLite in the run directory)") from None
    backend = parsed.get_backend_name()
    if backend not in _STORAGE_BACKENDS:
        raise ConfigError(f"storage: unsupported database {shown(backend)}; use {' or '.join(_STORAGE_BACKENDS)}")
    if backend == "sqlite":
        database = parsed.database or ""
        if database.startswith("file:"):  # SQLite's URI form, e.g. file:/path/run.db?mode=ro&uri=true
            database = database[len("file:"):]
        if database in ("", ":memory:") or not Path(database).is_absolute():
            raise ConfigError(f"storage: {shown(url)} is not a SQLite file at an absolute path "
                              f"(sqlite:////absolute/path/run.db); null keeps run.db in the run directory")


def _positive(value: Any) -> bool:
    return value is None or value > 0


def _probability(value: float) -> bool:
    return 0.0 <= value <= 1.0


#: Upper bounds on what one unit may ask for: far above any real machine, low enough that the
#: numbers stay meaningful to Ray (which counts in units of 1e-4) and to torch's thread count.
MAX_UNIT_CPUS = 1024
MAX_UNIT_GPUS = 64
_STORAGE_BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class ResourcesConfig:
    """What one unit of work asks Ray for."""

    num_cpus: float = option(1.0, "CPUs per unit; torch uses this many threads",
                             check=lambda v: 0.0001 <= v <= MAX_UNIT_CPUS, rule=f"0.0001 .. {MAX_UNIT_CPUS}")
    num_gpus: float = option(0.0, "GPUs per unit; fractions share a GPU between units",
                             check=lambda v: v == 0 or 0.0001 <= v <= MAX_UNIT_GPUS,
                             rule=f"0 or 0.0001 .. {MAX_UNIT_GPUS}")
    max_retries: int = option(3, "Ray retries of a unit whose worker or node died", check=lambda v: 0 <= v <= 1000,
                              rule="0..1000")


@dataclass(frozen=True)
class SearchConfig:
    """An evolutionary search after Jozefowicz et al. (2015); see the module docstring."""

    tasks: tuple[str, ...] = option(("arithmetic", "xml", "ptb"), "scored tasks, in the order candidates meet them",
                                    check=lambda v: len(v) > 0 and len(set(v)) == len(v),
                                    rule="a non-empty list without repeats")
    budget_profile: Literal["smoke", "small", "medium", "paper"] = option("paper",
                                                                          "training budget profile of every task")
    population_size: int = option(100, "the population is the best N cells by score", check=lambda v: v >= 2,
                                  rule=">= 2")
    settings_per_task: int = option(20, "K: hyperparameter settings per task per evaluation", check=lambda v: v >= 1,
                                    rule=">= 1")
    settings_per_unit: int = option(5, "settings per unit of work (same-shape ones train as one batched model)",
                                    check=lambda v: v >= 1, rule=">= 1")
    initial_cells: tuple[str, ...] = option(("gru", "lstm"), "reference cells the population starts with",
                                            check=lambda v: len(v) > 0 and len(set(v)) == len(v),
                                            rule="a non-empty list without repeats")
    reference_cell: str = option("gru", "scores are ratios to this cell's best (it must be an initial cell)")
    reevaluate_probability: float = option(0.1, "chance that a step re-evaluates a member instead of mutating one",
                                           check=_probability, rule="between 0 and 1")
    memorize_task: str | None = option("memorize", "filter task a candidate meets first (null: no filter)")
    memorize_settings: int = option(1, "settings tried on the memorisation filter", check=lambda v: v >= 1,
                                    rule=">= 1")
    memorize_threshold: float = option(0.95, "memorisation score a candidate must reach", check=_probability,
                                       rule="between 0 and 1")
    early_stop_fraction: float = option(0.9, "a candidate stops when its best on a task is below this fraction of "
                                        "the reference cell's best", check=_probability, rule="between 0 and 1")
    selection: Literal["uniform", "tournament", "aging"] = option(
        "uniform", "parent selection: uniform (paper), tournament or aging (Real et al. 2019)")
    tournament_size: int = option(10, "members drawn per tournament (tournament and aging)", check=lambda v: v >= 1,
                                  rule=">= 1")
    seed_from_parent: int = option(0, "a child's first trials on each task repeat its parent's best N settings",
                                   check=lambda v: v >= 0, rule=">= 0")
    sampler: Literal["random", "tpe"] = option("random", "hyperparameter sampler (the paper used random search)")
    mutation: Mapping[str, Any] = option(None, "cellsearch.MutationConfig keys", factory=dict)
    seed: int = option(0, "run seed; every random stream derives from it", check=lambda v: v >= 0, rule=">= 0")
    max_steps: int | None = option(None, "stop after this many steps (null: unbounded)", check=_positive, rule="> 0")
    max_evaluations: int | None = option(None, "stop starting steps after this many trained settings",
                                         check=_positive, rule="> 0")
    max_wall_clock_s: float | None = option(None, "stop starting steps after this many seconds of this session",
                                            check=_positive, rule="> 0")
    max_in_flight: int | None = option(None, "units in flight at once (null: twice the cluster's unit slots)",
                                       check=_positive, rule="> 0")
    resources: ResourcesConfig = option(None, "Ray resources of one unit", factory=ResourcesConfig)
    device: str = option("cpu", "torch device units train on ('cuda' with num_gpus > 0)", check=_is_device,
                         rule="a torch device such as cpu, cuda or cuda:1")
    batching: BatchingConfig = option(None, "train a unit's same-shape settings as one batched model",
                                      factory=BatchingConfig)
    confirm_seeds: int = option(
        0, "a candidate scoring above 1 is trained again with its best setting and the reference cell's best setting "
        "on this many fresh seeds shared by both (paired), and marked confirmed only when its paired ratio of means "
        "(Fieller's 95% interval) stays above 1 on every task; 0: off (a score above 1 may be noise)",
        check=lambda v: v == 0 or v >= 2, rule="0 or >= 2")
    fidelity: HalvingConfig = option(
        None, "successive halving over a unit's settings: train them to rungs of the budget and keep the best 1/eta "
        "at each (pruned settings end as PRUNED trials); needs settings_per_unit >= 2 and ranks within a unit, so "
        "set settings_per_unit = settings_per_task; off: every setting trains to the full budget",
        factory=HalvingConfig)
    promotion: PromotionConfig = option(
        None, "promotion across candidates (ASHA): a candidate that passed the filter first trains its settings on "
        "every task to a cheap rung, and only the top 1/eta of the candidates measured there go on to the full budget "
        "(the stopped ones end rejected_by 'promotion'); the early stop (early_stop_fraction) still applies at the "
        "full budget", factory=PromotionConfig)
    filter_promotion: FilterPromotionConfig = option(
        None, "promotion through the memorisation filter (ASHA): a candidate trains the filter to a cheap rung first "
        "and trains the whole filter only when its accuracy there is in the top 1/eta of the candidates measured "
        "there (the stopped ones end rejected_by 'filter_promotion'); off: every candidate trains the whole filter",
        factory=FilterPromotionConfig)
    storage: str | None = option(
        None, "SQLAlchemy URL of the run database (null: SQLite in the run directory); a password in it is accepted "
        "with a warning, used for this session and never written anywhere (resume and load_run take it from "
        "PGPASSWORD, ~/.pgpass or $CELLSEARCH_STORAGE_URL), so the run directory can be shared without the secret")
    storage_retry_s: float = option(
        300.0, "seconds a lost database connection (server restart or failover, reset connection, locked SQLite "
        "file) is retried with backoff before the search stops; a restart takes seconds, an outage longer than "
        "five minutes needs a person", check=lambda v: v > 0, rule="> 0")
    min_free_space_mb: float = option(
        100.0, "SQLite: when the database's disk has less free space than this (MB) the search starts nothing new, "
        "lets running units commit and stops (exit 74) before a full disk fails a commit; 0 disables",
        check=lambda v: v >= 0, rule=">= 0")
    ptb_dir: str | None = option(None, f"Penn Treebank directory (null: ${PTB_ENV}); read only, may be anywhere but "
                                 "must exist (a run writes only inside its run directory)")

    def __post_init__(self) -> None:
        from cellsearch import zoo
        from cellsearch.mutation import MutationConfig
        from cellsearch.tasks import task_names

        known_tasks = task_names()
        for key, names in (("tasks", self.tasks),
                           ("memorize_task", (self.memorize_task,) if self.memorize_task else ())):
            unknown = [name for name in names if name not in known_tasks]
            if unknown:
                raise ConfigError(f"{key}: unknown task {', '.join(unknown)}; known: {', '.join(known_tasks)}")
        unknown = [name for name in self.initial_cells if not zoo.known(name)]
        if unknown:
            raise ConfigError(f"initial_cells: unknown cell {', '.join(unknown)}; known: {', '.join(zoo.names())}")
        from_mapping(MutationConfig, dict(self.mutation), prefix="mutation.")
        if self.fidelity.enabled and self.settings_per_unit < 2:
            raise ConfigError("fidelity.enabled: successive halving ranks the settings of one unit; with "
                              "settings_per_unit = 1 nothing would ever be pruned (set it to settings_per_task)")
        if self.reference_cell not in self.initial_cells:
            raise ConfigError(f"reference_cell: {self.reference_cell!r} is not one of initial_cells "
                              f"{list(self.initial_cells)}")
        if self.filter_promotion.enabled and self.memorize_task is None:
            raise ConfigError("filter_promotion.enabled: there is no memorisation filter (memorize_task is null) "
                              "to promote candidates through")
        if self.memorize_task is not None and self.memorize_task in self.tasks:
            raise ConfigError(f"memorize_task: {self.memorize_task!r} is also a scored task")
        if self.storage is not None:
            _check_storage(self.storage)
        if self.ptb_dir is not None and not self.ptb_dir.strip():
            raise ConfigError(f"ptb_dir: empty; use null for ${PTB_ENV}")

    @property
    def all_tasks(self) -> tuple[str, ...]:
        """The filter task (if any) followed by the scored tasks."""
        return ((self.memorize_task,) if self.memorize_task else ()) + self.tasks

    def with_overrides(self, **changes: Any) -> "SearchConfig":
        """A copy with some keys changed (``None`` values are ignored), validated like a file."""
        data = to_mapping(self)
        data.update({k: v for k, v in changes.items() if v is not None})
        return from_mapping(SearchConfig, data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(to_mapping(self), sort_keys=False)


def load_search_config(path: str | Path) -> SearchConfig:
    """Read and validate a search config file."""
    data = load_yaml(path)
    try:
        return from_mapping(SearchConfig, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def resolve_ptb_dir(config: SearchConfig) -> str | None:
    """The PTB directory: the config's ``ptb_dir``, else ``$CELLSEARCH_PTB_DIR``, else the verified copy in the
    per-user cache (``cellsearch data fetch ptb``); a one-line error naming that command if ptb needs one."""
    if config.ptb_dir is not None and not Path(config.ptb_dir).expanduser().is_dir():
        raise UserError(f"ptb_dir: no directory {config.ptb_dir}")
    if "ptb" not in config.all_tasks:
        return config.ptb_dir
    from cellsearch.tasks.ptb import default_data_dir  # numpy only; loaded when a search uses ptb

    path = config.ptb_dir or os.environ.get(PTB_ENV) or str(default_data_dir())
    if not (Path(path).expanduser() / "ptb.train.txt").is_file():
        raise UserError(f"no ptb.train.txt in the PTB directory {path}")
    # Absolute, so that the run directory's config names the same directory when resumed from elsewhere.
    return str(Path(path).expanduser().resolve())
