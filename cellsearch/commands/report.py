"""``cellsearch report RUN_DIR [--retrain DIR] [--out DIR]``: an offline HTML report of a search.

See :mod:`cellsearch.report` for what the folder holds.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write an HTML report (with PNG and CSV files) of a search")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="search run directory")
    parser.add_argument("--retrain", metavar="DIR", help="also show this retrain output directory")
    parser.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR/report)")
    parser.add_argument("--top", type=int, default=10, help="cells in the page's leaderboard (default 10)")
    parser.add_argument("--drawn", type=int, default=5, help="top cells drawn with equations (default 5)")
    parser.add_argument("--lineages", type=int, default=3, help="best cells whose lineage is traced (default 3)")
    parser.add_argument("--force", action="store_true", help="replace an --out folder that is not an earlier report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per step)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellsearch.commands._progress import CommandProgress

    # At once, before the imports and the reading of the run: the user sees the command working.
    with CommandProgress("report", "steps", enabled=not args.no_progress, description="reading the run") as bar:
        from cellsearch.report import write_report

        def progress(what: str, done: int, total: int) -> None:
            if done == 0:
                bar.start(total)
            else:
                bar.advance(done, what)

        report = write_report(args.run_dir, args.out, args.retrain, top=args.top, drawn=args.drawn,
                              lineages=args.lineages, force=args.force, progress=progress)
    print(f"report written to {report.index} ({len(report.files)} files)")
    return 0
