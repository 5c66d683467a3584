"""``cellsearch resume RUN_DIR``: continue a stopped or killed search where it left off."""

from __future__ import annotations

import argparse

from cellsearch.commands.search import add_execution_arguments, check_execution_arguments, run_search


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "resume", help="continue a stopped or killed search",
        description="Continue the search in RUN_DIR: committed evaluations are kept, unfinished units re-run, "
                    "the population and random streams continue. --max-steps extends a finished search.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory made by `cellsearch search`")
    add_execution_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellsearch.commands._common import user_path
    from cellsearch.search.run import open_run

    check_execution_arguments(args)
    run_dir = user_path(args.run_dir, "RUN_DIR")  # the same directory for the lock, the database and Ray's workers
    config, storage = open_run(run_dir, max_steps=args.max_steps)
    return run_search(config, storage, run_dir, args)
