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
    parser.add_argument("--force", action="store_true", help="replace an OUT_DIR that is not an earlier export")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cellsearch.errors import UserError
    from cellsearch.outputs import replaced_directory
    from cellsearch.results import load_run

    if args.top < 1:
        raise UserError("--top must be at least 1")
    target = Path(args.out_dir)
    results = load_run(args.run_dir)
    try:
        top = results.top(args.top)
        # written next to OUT_DIR, then swapped in whole: an earlier export is replaced, never mixed with this one
        with replaced_directory(target, "cellsearch export", "export directory", force=args.force) as staging:
            names = []
            for rank, row in enumerate(top.itertuples(index=False), start=1):
                name = f"{rank:02d}-{row.short_hash}.{args.format}"
                results.spec(row.cell_hash).save(staging / name)
                names.append((name, row.score))
    finally:
        results.close()
    for name, score in names:
        print(f"{target / name}  score {score:.4f}")
    if top.empty:
        print("no cell has been evaluated on every task yet; nothing exported")
    return 0
