"""``cellsearch retrain SOURCE --task TASK``: retrain cells against baselines at the same parameter budget.

SOURCE is ``RUN_DIR:HASH`` (a cell of a search), ``RUN_DIR --top N`` (its N
best cells), a cell file or a reference cell name. Each cell and each baseline
is trained with the task's retrain preset once per seed (a cell's seeds as one
batched model where that pays, unless ``--no-batch``); a checkpoint per run is
written every epoch and running the same command again resumes. The summary
table (mean and spread over seeds per cell) is printed at the end; everything
else is in ``--out`` (see :mod:`cellsearch.retrain`; the flags are :class:`~cellsearch.retrain.RetrainOptions`).
"""

from __future__ import annotations

import argparse

from cellsearch.batching import BatchingConfig
from cellsearch.devices import check_device
from cellsearch.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("retrain", help="retrain cells and baselines with a task's preset, several seeds")
    parser.add_argument("source", metavar="SOURCE", nargs="?",
                        help="RUN_DIR:HASH, RUN_DIR (with --top N), a .json/.yaml cell file or a reference cell name")
    parser.add_argument("--task", required=True, help="task name (memorize, arithmetic, xml, ptb)")
    parser.add_argument("--preset", default="quick",
                        help="retrain preset of the task (retrain_presets in tasks/TASK.yaml; default quick)")
    parser.add_argument("--top", type=int, metavar="N", help="with a run directory: retrain its N best cells")
    parser.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds per cell (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="base seed the training seeds derive from (default 0)")
    parser.add_argument("--baselines", default="gru,lstm_b",
                        help="comma-separated reference cells trained alongside ('' for none; default gru,lstm_b)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default retrain-TASK-PRESET)")
    parser.add_argument("--data-dir", help="data directory for ptb (else $CELLSEARCH_PTB_DIR)")
    parser.add_argument("--in-process", action="store_true", help="run here, one run after another, without Ray")
    parser.add_argument("--workers", type=int, metavar="N", help="CPUs of the embedded Ray instance (default all)")
    parser.add_argument("--address", help="attach to a running Ray cluster (e.g. 'auto'; RAY_ADDRESS also works)")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs (torch threads) per run (default 1)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs per run (fractions share one)")
    parser.add_argument("--device", default="cpu", help="torch device of each run (default cpu)")
    parser.add_argument("--no-batch", action="store_true",
                        help="train each seed as a run of its own instead of a cell's seeds as one batched model "
                             "(where batching pays: always on a GPU, on a CPU when the cells outweigh the softmax)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (one log line per finished run)")
    parser.add_argument("--list-presets", action="store_true", help="list the task's presets and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        from cellsearch.retrain import load_presets

        for name, preset in load_presets(args.task).items():
            print(f"{name:<16} {preset.description}")
        return 0
    from cellsearch.commands._progress import CommandProgress

    # At once, before the seconds of imports, planning and starting Ray: the user sees the command working.
    with CommandProgress("retrain", "runs", enabled=not args.no_progress) as bar:
        return _run(args, bar)


def _run(args: argparse.Namespace, bar) -> int:
    # Imported here, not at the top: every command module is imported to build the parser, and the retrain
    # library imports torch and Ray's executors (seconds), which ``cellsearch --help`` should not wait for.
    from cellsearch.commands._common import user_path
    from cellsearch.retrain import RetrainOptions, resolve_source, retrain, summary_markdown
    from cellsearch.search.executors import attaches

    if args.source is None:
        raise UserError("give a SOURCE: RUN_DIR:HASH, RUN_DIR --top N, a cell file or a reference cell name")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    # Runs on a cluster may train on other machines' devices: there only the spelling is checked here.
    check_device(args.device, here=args.in_process or not attaches(args.address))
    cells = resolve_source(args.source, args.top)
    baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    # absolute against the directory the command ran in (inside a `ray job submit` job a relative one is refused)
    out_dir = user_path(args.out or f"retrain-{args.task}-{args.preset}", "--out")

    started = [False]

    def on_start(done: int, total: int) -> None:
        started[0] = True
        bar.start(total, done, f"{done} finished before" if done else None)

    def on_done(record: dict, done: int, total: int) -> None:
        metrics = record.get("metrics", {})
        shown = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()
                          if key.startswith(("valid_", "test_")) and not key.endswith("_loss"))
        resumed = record.get("resumed_from_epoch")
        note = f", resumed from epoch {resumed}" if resumed is not None else ""
        run = f"{record['label']} seed {record['seed_index']}: {record['status']}"
        detail = f"{run}{', ' + shown if shown else ''} ({record['duration_s']:.0f} s{note})"
        if not started[0]:  # finished by an earlier start: counted in on_start's line
            bar.write(f"retrain: finished before: {detail}")
        elif bar.enabled:
            bar.advance(done, run)
            bar.write(f"[{done}/{total}] {detail}")  # above the bar, which shows the count and the ETA
        else:
            bar.advance(done, detail)

    options = RetrainOptions(
        seeds=args.seeds, base_seed=args.seed, baselines=tuple(baselines), data_dir=args.data_dir,
        in_process=args.in_process, workers=args.workers, address=args.address, cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run, device=args.device, batching=BatchingConfig(enabled=not args.no_batch),
    )
    tick = (lambda event: bar.tick()) if args.in_process and bar.enabled else None
    results = retrain(cells, args.task, args.preset, out_dir, options, progress=tick, on_done=on_done,
                      on_start=on_start)
    bar.close()  # before the table: the finished bar stays above it
    print(summary_markdown(results))
    print(f"results, curves (CSV, PNG), summary (CSV, markdown) and checkpoints in {results.out_dir}")
    return 0
