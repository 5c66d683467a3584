"""``cellsearch show NAME_OR_FILE``: equations, parameter count and hash of a cell."""

from __future__ import annotations

import argparse

from cellsearch.commands._common import resolve_cell


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("show", help="print a cell's equations, parameter count and hash")
    parser.add_argument("cell", help="reference cell name (see `cellsearch show --list`) or a .json/.yaml cell file")
    parser.add_argument("--hidden-size", type=int, default=128, help="width for the parameter count (default 128)")
    parser.add_argument("--png", metavar="PATH", help="also draw the cell to this PNG file")
    parser.add_argument("--dot", action="store_true", help="print Graphviz DOT text instead of equations")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = resolve_cell(args.cell)
    if args.dot:
        print(spec.to_dot(), end="")
        return 0
    print(f"cell:       {spec.name or args.cell}")
    print(f"hash:       {spec.hash}")
    print(f"states:     {', '.join(spec.states)} (output: {spec.output})")
    print(f"nodes:      {len(spec.nodes)}")
    print(f"parameters: {spec.parameter_count(args.hidden_size):,} per layer at hidden size {args.hidden_size}")
    print()
    print(spec.equations())
    if args.png:
        print(f"\ndrawing:    {spec.draw(args.png)}")
    return 0
