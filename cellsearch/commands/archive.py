"""``cellsearch archive RUN_DIR OUT_DIR``: a small, read-only copy of a run that every reader accepts."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "archive", help="write a small read-only copy of a run (for results directories: top, show, report read it)",
        description="Copy a run's own tables (cells, steps, units, evaluations with learning curves, population, "
                    "promotions; not Optuna's) into OUT_DIR/run.db, a SQLite file, with the run's config.yaml, "
                    "versions.json and run.json. Every reader works on the copy wherever it is moved or cloned "
                    "(cellsearch top/show/export/report, cellsearch.load_run); a search cannot be resumed from "
                    "it. Works on SQLite and PostgreSQL runs, finished or running.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory for the archive (missing, empty or an earlier "
                        "archive)")
    parser.add_argument("--force", action="store_true", help="replace an OUT_DIR that is not an earlier archive")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellsearch.results import load_run

    results = load_run(args.run_dir)
    try:
        target = results.archive(args.out_dir, force=args.force)
        evaluations, cells = len(results.evaluations()), len(results.cells())
    finally:
        results.close()
    size = (target / "run.db").stat().st_size
    print(f"{target}: {cells} cells, {evaluations} evaluations, run.db {size / 1e6:.2f} MB")
    return 0
