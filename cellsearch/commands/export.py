"""``cellsearch export RUN_DIR --top N OUT_DIR``: spec files of a search's best cells."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write the best cells of a search as spec files")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory for the spec files")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="how many cells (default 10)")
    parser.add_argument("--format", choices=("json", "yaml"), default="json", help="spec file format")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellsearch.errors import UserError
    from cellsearch.outputs import output_directory
    from cellsearch.results import load_run

    if args.top < 1:
        raise UserError("--top must be at least 1")
    results = load_run(args.run_dir)
    try:
        top = results.top(args.top)
        out_dir = output_directory(Path(args.out_dir), "export directory")
        for rank, row in enumerate(top.itertuples(index=False), start=1):
            path = out_dir / f"{rank:02d}-{row.short_hash}.{args.format}"
            results.spec(row.hash).save(path)
            print(f"{path}  score {row.score:.4f}")
    finally:
        results.close()
    if top.empty:
        print("no cell has been evaluated on every task yet; nothing exported")
    return 0
