"""``cellsearch top RUN_DIR``: the best cells of a search (running, stopped or finished)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("top", help="the best cells of a search")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    parser.add_argument("-n", type=int, default=10, help="how many cells (default 10)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV with every column")
    output.add_argument("--json", action="store_true", help="JSON records with every column")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellsearch.commands.search import print_top
    from cellsearch.errors import UserError
    from cellsearch.results import load_run

    if args.n < 1:
        raise UserError("-n must be at least 1")
    if not (args.csv or args.json):
        print_top(args.run_dir, args.n)
        return 0
    results = load_run(args.run_dir)
    try:
        top = results.top(args.n)
    finally:
        results.close()
    if args.csv:
        top.to_csv(sys.stdout, index=False)
    else:
        print(top.to_json(orient="records", indent=2))
    return 0
