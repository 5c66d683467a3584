"""``cellsearch search CONFIG``: start an evolutionary search (see :mod:`cellsearch.search`)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cellsearch.config import describe

__all__ = ["register", "run", "ProgressBar", "add_execution_arguments", "check_execution_arguments", "run_search",
           "print_top", "default_run_dir"]


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``search`` and ``resume``: where units run and how long the search is."""
    parser.add_argument("--workers", type=int, metavar="N",
                        help="CPUs of the embedded local Ray instance (default: all of this machine's)")
    parser.add_argument("--address", metavar="ADDR",
                        help="attach to a running Ray cluster ('auto' or host:port; RAY_ADDRESS works too)")
    parser.add_argument("--executor", choices=("ray", "serial"), default="ray",
                        help="'serial' runs units in this process, one at a time (debugging)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="search steps to run in all (overrides the config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def check_execution_arguments(args: argparse.Namespace) -> None:
    """Refuse bad execution options before anything is written, and a dead cluster address in bounded time.

    ``--workers 0`` would start a Ray instance without CPUs that never runs a unit. An unreachable
    ``--address``/``RAY_ADDRESS`` is found here, before the run directory exists, so the same command
    works unchanged once the cluster is up (:func:`cellsearch.search.executors.check_cluster`).
    """
    from cellsearch.errors import UserError

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.executor == "ray":
        from cellsearch.search.executors import attaches, check_cluster

        if attaches(args.address):
            check_cluster(args.address)


def register(subparsers: argparse._SubParsersAction) -> None:
    from cellsearch.search.config import SearchConfig

    parser = subparsers.add_parser(
        "search", help="start an evolutionary search", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start an evolutionary search described by a YAML config (see search_configs/).",
        epilog="config keys:\n" + describe(SearchConfig))
    parser.add_argument("config", help="search config file (YAML)")
    parser.add_argument("--run-dir", metavar="DIR", help="run directory (default runs/<config name>-<UTC time>)")
    parser.add_argument("--storage", metavar="URL", help="SQLAlchemy URL of the run database (default: SQLite in "
                        "the run directory)")
    parser.add_argument("--seed", type=int, help="run seed (overrides the config)")
    add_execution_arguments(parser)
    parser.set_defaults(func=run)


class ProgressBar:
    """A tqdm bar over search steps with units, in-flight count, cells evaluated and best score."""

    def __init__(self, total: int | None, initial: int, enabled: bool = True):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                         disable=not enabled, file=sys.stderr, smoothing=0.1)
        self._started = time.monotonic()
        self._units_at_start: int | None = None

    def __call__(self, progress) -> None:
        if self._units_at_start is None:
            # The rate counts from the first report, after Ray and the data sets are up.
            self._units_at_start = progress.units_done
            self._started = time.monotonic()
        self._bar.update(progress.steps_done - self._bar.n)
        minutes = max(time.monotonic() - self._started, 1e-9) / 60
        best = "-" if math.isnan(progress.best_score) else f"{progress.best_score:.3f}"
        self._bar.set_postfix_str(
            f"units {progress.units_done} done/{progress.in_flight} running "
            f"({(progress.units_done - self._units_at_start) / minutes:.1f}/min), "
            f"cells evaluated {progress.cells_evaluated}, best {best}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def print_top(run_dir: Path, n: int = 10) -> None:
    """The top-``n`` table printed at the end of ``search`` and ``resume``."""
    from cellsearch.results import load_run

    results = load_run(run_dir)
    try:
        top = results.top(n)
        reference = results.reference_best()
    finally:
        results.close()
    print(f"\ntop {min(n, len(top))} cells (score = min over tasks of best / current {results.config.reference_cell} "
          f"best; {results.config.reference_cell} best: "
          + ", ".join(f"{task} perplexity {1 / value:.1f}" if task == "ptb" and value > 0
                      else f"{task} {value:.4f}" for task, value in reference.items()) + ")")
    if top.empty:
        print("(no cell has been evaluated on every task yet)")
        return
    # each task's best metric (PTB as people read it: perplexity)
    per_task = ["perplexity_ptb" if t == "ptb" else f"metric_{t}" for t in results.tasks]
    columns = ["short_hash", "name", "status", "step_created", "nodes", *per_task, "score"]
    if top["confirmed"].notna().any():  # a run with confirm_seeds: the paired re-evaluation of cells above 1
        columns += ["confirmed", "confirm_ratio", "confirm_low", "confirm_high"]
    table = top[columns].assign(name=top["name"].fillna("-"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


#: Exit status of a search that ran to its end but cannot report success: units lost after every retry (they
#: re-run on resume; EX_TEMPFAIL), or a reference cell without a score (EX_SOFTWARE: no score means anything).
LOST_UNITS_EXIT = 75
NO_REFERENCE_EXIT = 70


def run_search(config, storage, run_dir: Path, args: argparse.Namespace, executor=None) -> int:
    """Drive a created or reopened run to its end and print the summary (shared with ``resume``).

    ``executor``: one made (and its cluster checked) before the run directory was created; else made here.
    The exit status says whether the search can report success (see :func:`cellsearch.search.run.run_outcome`):
    0, 130 (stopped), :data:`LOST_UNITS_EXIT`, :data:`NO_REFERENCE_EXIT`, or the status of the error that
    stopped it (the database's, :class:`~cellsearch.search.executors.ClusterBroken`'s).
    """
    from cellsearch.search.executors import ClusterBroken
    from cellsearch.search.run import drive, make_executor, run_outcome
    from cellsearch.search.storage import StorageError

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    counts = storage.counts()
    bar = ProgressBar(config.max_steps, counts["search_steps_done"], enabled=not args.no_progress)
    try:
        if executor is None:
            executor = make_executor(config, args.executor, workers=args.workers, address=args.address)
        progress, stop_mode = drive(config, storage, executor, on_progress=bar, log=log)
        broken = getattr(executor, "broken", None)  # the driver may have stopped waiting before it was raised
        if broken is not None:
            raise broken
        outcome = run_outcome(config, storage) if stop_mode is None else None
    except (StorageError, ClusterBroken) as error:
        # The database or the cluster stopped the search (low space, failed write, unreachable; nodes that cannot
        # run units): one line and its own status.
        bar.close()
        remedy = getattr(error, "remedy", "once every node can run units")
        print(f"cellsearch {args.command}: stopped: {error}; resume with `cellsearch resume {run_dir}` "
              f"{remedy}", file=sys.stderr)
        return error.exit_status
    finally:
        bar.close()
        storage.close()
    print(f"run directory: {run_dir}")
    errors = f" ({outcome.errors} failed with an error, scored 0)" if outcome is not None and outcome.errors else ""
    print(f"steps {progress.steps_done}, units {progress.units_done}, evaluations {progress.evaluations}{errors}, "
          f"cells evaluated {progress.cells_evaluated}")
    if config.filter_promotion.enabled:
        print(f"candidates measured at the filter's rung: {progress.filter_rung_measured}, promoted through the "
              f"whole filter: {progress.filter_promoted}")
    if config.promotion.enabled:
        print(f"candidates measured at the promotion rung: {progress.rung_measured}, promoted to the "
              f"full budget: {progress.promoted}")
    if config.confirm_seeds:
        print(f"candidates above {config.reference_cell} when evaluated: {progress.beat_reference}, confirmed on "
              f"fresh paired seeds: {progress.confirmed}")
    elif progress.beat_reference:
        print(f"candidates above {config.reference_cell} when evaluated: {progress.beat_reference} (not confirmed: "
              f"a score above 1 may be noise; confirm_seeds re-evaluates such candidates on fresh paired seeds)")
    print_top(run_dir)
    if stop_mode is not None:
        print(f"\nstopped before the end; continue with: cellsearch resume {run_dir}")
        return 130
    if outcome.lost_units:
        # lost to system failures after every retry (a node lost again and again): not results, and not done
        print(f"cellsearch {args.command}: incomplete: {outcome.lost_units} units could not run after every retry "
              f"(lost workers or nodes, see the log above); they re-run with `cellsearch resume {run_dir}`",
              file=sys.stderr)
        return LOST_UNITS_EXIT
    if outcome.reference_missing:
        print(f"cellsearch {args.command}: failed: the reference cell {config.reference_cell} has no score on "
              f"{', '.join(outcome.reference_missing)} (every evaluation of it failed or scored 0), so no cell's "
              f"score means anything; see the errors above and `cellsearch show`", file=sys.stderr)
        return NO_REFERENCE_EXIT
    return 0


def run(args: argparse.Namespace) -> int:
    from cellsearch.commands._common import in_ray_job, user_path
    from cellsearch.errors import UserError
    from cellsearch.search.config import load_search_config
    from cellsearch.search.executors import attaches
    from cellsearch.search.run import create_run, make_executor, task_loader

    config = load_search_config(args.config).with_overrides(storage=args.storage, seed=args.seed,
                                                            max_steps=args.max_steps)
    check_execution_arguments(args)
    run_dir_given = user_path(args.run_dir, "--run-dir") if args.run_dir else None
    if run_dir_given is None and in_ray_job():
        raise UserError("give --run-dir with an absolute path: this command runs as a Ray job, and the default "
                        "runs/... would land in the job's working directory, a temporary copy that Ray deletes")
    executor = None
    if args.executor == "ray" and attaches(args.address):
        # Attach and check every node (cellsearch version, token) before anything is created: a refused cluster
        # leaves no run directory behind. The tasks are read from the config create_run resolves below.
        resolved: dict[str, object] = {}
        executor = make_executor(config, args.executor, address=args.address,
                                 load_task=lambda name: task_loader(resolved["config"])(name))
    try:
        if run_dir_given is not None:
            run_dir = run_dir_given
            config, storage = create_run(config, run_dir)
        else:
            run_dir, made = default_run_dir(Path(args.config).stem, parent=user_path("runs", "runs/"))
            try:
                config, storage = create_run(config, run_dir)
            except BaseException:
                for directory in made:  # a refused start leaves no empty run directory (nor runs/) behind
                    try:
                        directory.rmdir()
                    except OSError:
                        break
                raise
    except BaseException:
        if executor is not None:
            executor.close()
        raise
    if executor is not None:
        resolved["config"] = config
    print(f"run directory: {run_dir}", file=sys.stderr)
    return run_search(config, storage, run_dir, args, executor=executor)


def default_run_dir(stem: str, now: datetime | None = None, parent: Path = Path("runs")) -> tuple[Path, list[Path]]:
    """A new ``runs/<stem>-<UTC time>`` (``-2``, ``-3``, ... when taken), claimed by creating it.

    ``mkdir`` is atomic: two searches started in the same second get different directories. Returns the
    directory and the directories created (innermost first), which a refused start removes again.
    """
    from cellsearch.errors import UserError

    base = f"{stem}-{(now or datetime.now(timezone.utc)).strftime('%Y%m%d-%H%M%S')}"
    made = []
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
            made.append(parent)
        except FileExistsError:
            pass
        except OSError as error:
            raise UserError(f"cannot create {parent}: {error.strerror or error}") from None
    for number in range(1, 1000):
        candidate = parent / (base if number == 1 else f"{base}-{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(f"cannot create the run directory {candidate}: {error.strerror or error}") from None
        return candidate, [candidate, *made]
    raise UserError(f"{parent} already holds 999 runs named {base}; give --run-dir")
