"""``cellsearch calibrate --task TASK --out DIR``: a fidelity study (how well budgets rank cells).

Trains the reference cells plus mutated cells under several budgets with the same settings and
seeds, then writes tables, a plot and a one-screen summary (see :mod:`cellsearch.calibration`).
The same command, or ``--resume DIR``, continues an interrupted study.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cellsearch.errors import UserError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fidelity study: how well budgets rank cells compared with a longer budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the reference cells and mutated cells under several budgets (same settings and seeds) "
        "and report, per budget, its cost and how well it ranks the cells compared with the longest budget.",
        epilog="budgets: --budget NAME uses the task profile NAME as shipped; --budget NAME=PROFILE,KEY=VALUE,... "
        "changes budget keys (max_epochs, steps_per_epoch, max_steps, patience, decay_epochs, eval_tokens, ...),\n"
        "the default setting (learning_rate=5, init_scale=1, ...) or a hyperparameter list (space.learning_rate=2|5).\n"
        "Budgets that differ only in max_steps/max_epochs (whole epochs) share one run per cell and seed.")
    parser.add_argument("--task", help="task name (memorize, arithmetic, xml, ptb) or task file")
    parser.add_argument("--out", metavar="DIR", help="study directory (tables, plot, study.db)")
    parser.add_argument("--config", metavar="FILE", help="study config (YAML); flags below override its keys")
    parser.add_argument("--resume", metavar="DIR", help="continue the study in DIR with its stored design")
    parser.add_argument("--budget", dest="budgets", action="append", default=[], metavar="SPEC",
                        help="a budget under study (repeatable; see below)")
    parser.add_argument("--reference-budget", metavar="NAME", help="budget the others are compared with "
                        "(default: the one with the most steps)")
    parser.add_argument("--cells", metavar="A,B,...", help="reference cells (default: every zoo cell)")
    parser.add_argument("--cell-file", dest="cell_files", action="append", default=[], metavar="FILE",
                        help="a further cell from a file (repeatable)")
    parser.add_argument("--mutated", type=int, metavar="N", help="mutated cells drawn from the seed (default 19)")
    parser.add_argument("--seeds", type=int, metavar="S", help="training seeds per cell and setting (default 3)")
    parser.add_argument("--random-settings", type=int, metavar="K", help="random settings per budget (default 0)")
    parser.add_argument("--no-default-setting", action="store_true", help="train only the random settings")
    parser.add_argument("--seed", type=int, help="study seed (default 0)")
    parser.add_argument("--data-dir", help="Penn Treebank directory for ptb (else $CELLSEARCH_PTB_DIR, else the copy "
                        "`cellsearch data fetch ptb` cached)")
    parser.add_argument("--device", help="torch device of the units (default cpu)")
    parser.add_argument("--workers", type=int, metavar="N", help="CPUs of the embedded Ray instance "
                        "(default: all of this machine's)")
    parser.add_argument("--address", metavar="ADDR", help="attach to a running Ray cluster ('auto' or host:port)")
    parser.add_argument("--in-process", action="store_true", help="train here, one unit at a time, without Ray")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per unit)")
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from cellsearch.calibration.config import StudyConfig, parse_budget
    from cellsearch.calibration.study import load_config_file
    from cellsearch.search.config import PTB_ENV

    base = load_config_file(args.config).to_dict() if args.config else {}
    changes = {}
    if args.task:
        changes["task"] = args.task
    if args.budgets:
        changes["budgets"] = [parse_budget(text).to_dict() for text in args.budgets]
    for key, value in (("reference_budget", args.reference_budget), ("mutated_cells", args.mutated),
                       ("seeds", args.seeds), ("random_settings", args.random_settings), ("seed", args.seed),
                       ("device", args.device)):
        if value is not None:
            changes[key] = value
    if args.cells:
        changes["zoo_cells"] = [name.strip() for name in args.cells.split(",") if name.strip()]
    if args.cell_files:
        changes["cell_files"] = [str(Path(path).resolve()) for path in args.cell_files]
    if args.no_default_setting:
        changes["default_setting"] = False
    data = {**base, **changes}
    if "task" not in data:
        raise UserError("--task is required (or a --config with task:)")
    if not data.get("budgets"):
        from cellsearch.tasks import get_task

        profiles = [p for p in get_task(data["task"]).profiles if p not in ("smoke", "paper")] \
            if data["task"] != "ptb" else ["small"]
        data["budgets"] = [{"name": p, "profile": p} for p in profiles]
    if data["task"] == "ptb" or str(data["task"]).endswith("ptb.yaml"):
        from cellsearch.tasks.ptb import default_data_dir  # the verified cached copy, else a one-line error

        directory = args.data_dir or data.get("ptb_dir") or os.environ.get(PTB_ENV) or str(default_data_dir())
        if not (Path(directory).expanduser() / "ptb.train.txt").is_file():
            raise UserError(f"the ptb task needs the Penn Treebank: no ptb.train.txt in {directory} (give --data-dir, "
                            f"set {PTB_ENV}, or run `cellsearch data fetch ptb`)")
        data["ptb_dir"] = str(Path(directory).expanduser().resolve())
    return StudyConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    from cellsearch.commands._progress import CommandProgress

    # At once, before the seconds of imports, planning and starting Ray: the user sees the command working.
    with CommandProgress("calibrate", "units", enabled=not args.no_progress) as bar:
        return _run(args, bar)


def _run(args: argparse.Namespace, bar) -> int:
    from cellsearch.calibration.study import StudyStore, plan_study
    from cellsearch.search.run import ensure_writable

    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.in_process and (args.address or args.workers):
        raise UserError("--in-process runs here: it takes neither --address nor --workers")
    if args.device is not None:
        from cellsearch.devices import check_device
        from cellsearch.search.executors import attaches

        # a cluster's workers may have devices this machine lacks: there only the spelling is checked
        check_device(args.device, here=args.in_process or not attaches(args.address))
    from cellsearch.tasks import get_task

    locks: list = []  # the study directory's lock, held until the study ends however it ends
    try:
        if args.resume:
            if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
                raise UserError("--resume DIR and --out name different directories; give one of them")
            out = Path(args.resume)
            if not (out / "study.db").is_file():
                raise UserError(f"{out} holds no fidelity study (no study.db); start one with --out {out}")
            locks.append(_lock(out))
            store = StudyStore(out)
            config = store.config
            task = get_task(config.task, data_dir=config.ptb_dir)
            plan = _stored_plan(store, config, task)
        else:
            if not args.out:
                raise UserError("--out DIR is required (or --resume DIR)")
            out = Path(args.out)
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out} is a file, not a directory")
            config = _config(args)
            # everything is checked (task, budgets, cells) before the study directory is touched
            task = get_task(config.task, data_dir=config.ptb_dir)
            plan = plan_study(config, task)
            from cellsearch.search.executors import attaches, check_cluster

            if not args.in_process and attaches(args.address):
                check_cluster(args.address)  # a dead address fails in bounded time, before the directory exists
            ensure_writable(out)
            locks.append(_lock(out))
            store = StudyStore(out, config)
            plan = _stored_plan(store, config, task)
        return _run_locked(args, out, config, task, store, plan, bar)
    finally:
        for lock in locks:
            lock.release()


def _lock(out: Path):
    """One study driver per directory (see :mod:`cellsearch.search.lock`); study.db lies inside it."""
    from cellsearch.search.lock import acquire

    return acquire(out, f"the study directory {out}", command="cellsearch calibrate")


def _run_locked(args: argparse.Namespace, out: Path, config, task, store, plan, bar) -> int:
    from cellsearch.calibration.analysis import analyse, summary_text, write_outputs
    from cellsearch.calibration.study import pending_units, run_study

    log = bar.write  # above the bar, or plain lines with --no-progress
    group_text = ", ".join(f"{g.name} ({'+'.join(g.members)})" for g in plan.groups)
    log(f"calibrate {config.task}: {len(plan.cells)} cells x {len(plan.groups)} run group(s) [{group_text}] x "
        f"{len(plan.groups[0].settings)} setting(s) x {config.seeds} seed(s) -> {out}")
    executor = _executor(args, config) if pending_units(plan, store) else None  # no Ray start for nothing

    def progress(done: int, total: int) -> None:
        if bar.total is None:  # the first call: the units recorded by earlier starts
            bar.start(total, done, f"{done} done before" if done else None)

    try:
        outcome = run_study(plan, store, executor, progress=progress, log=log,
                            on_unit=lambda what, done, total: bar.advance(done, what))
    finally:
        bar.close()  # before the tables: the finished bar stays above them
    tables = analyse(plan, store, task)
    write_outputs(tables, out)
    print(summary_text(tables))
    print(f"\n{outcome.units_run} unit(s) trained now, {outcome.units_done_before} before; tables in {out}")
    if outcome.unit_errors:
        log(f"{outcome.unit_errors} unit(s) failed with an error (recorded as status 'error'; see runs.csv)")
    if outcome.system_failures:
        log(f"{outcome.system_failures} unit(s) lost their worker; run the same command again to train them")
        return 1
    return 0


def _stored_plan(store, config, task):
    """The plan with the budgets and cells the study began with (stored on its first start)."""
    from cellsearch.calibration.study import plan_study, resolve_budgets

    resolved = store.resolved_budgets()
    if resolved is None:
        resolved = resolve_budgets(config, task)
        store.save_resolved_budgets(resolved)
    elif resolved != resolve_budgets(config, task):
        print("note: the task file's profiles changed since this study began; it keeps the budgets it began with",
              file=sys.stderr)
    return plan_study(config, task, resolved, store.stored_cells() or None)


def _executor(args: argparse.Namespace, config):
    from cellsearch.calibration.study import calibration_unit
    from cellsearch.search.executors import RayExecutor, SerialExecutor
    from cellsearch.tasks import get_task

    def load(name: str):
        return get_task(name, data_dir=config.ptb_dir)

    if args.in_process:
        return SerialExecutor(load, unit_function=calibration_unit)
    try:
        return RayExecutor(load, config.resources, address=args.address, num_cpus=args.workers,
                           unit_function=calibration_unit)
    except UserError:
        raise  # already one line (ClusterUnreachable says where and why)
    except ConnectionError as error:
        raise UserError(f"cannot attach to the Ray cluster at {args.address or 'RAY_ADDRESS'}: {error}") from None
