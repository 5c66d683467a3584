"""``cellsearch show NAME_OR_FILE`` or ``cellsearch show RUN_DIR HASH``.

With one argument: equations, parameter count and hash of a reference cell or a
cell file. With a run directory and a cell hash (or a unique prefix of it): the
cell's equations, its lineage (parents back to a seed cell, with the mutation
that made each) and its per-task results in that search.
"""

from __future__ import annotations

import argparse

from cellsearch.commands._common import resolve_cell


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("show", help="print a cell's equations, parameter count and hash "
                                   "(or, with RUN_DIR HASH, a searched cell's lineage and results)")
    parser.add_argument("cell", help="reference cell name, a .json/.yaml cell file, or a search run directory")
    parser.add_argument("hash", nargs="?", help="with a run directory: the cell's hash (or a unique prefix)")
    parser.add_argument("--hidden-size", type=int, default=128, help="width for the parameter count (default 128)")
    parser.add_argument("--png", metavar="PATH", help="also draw the cell to this PNG file")
    parser.add_argument("--dot", action="store_true", help="print Graphviz DOT text instead of equations")
    parser.set_defaults(func=run)


def _print_spec(spec, label: str, args: argparse.Namespace) -> None:
    print(f"cell:       {label}")
    print(f"hash:       {spec.hash}")
    print(f"states:     {', '.join(spec.states)} (output: {spec.output})")
    print(f"nodes:      {len(spec.nodes)}")
    print(f"parameters: {spec.parameter_count(args.hidden_size):,} per layer at hidden size {args.hidden_size}")
    print()
    print(spec.equations())
    if args.png:
        print(f"\ndrawing:    {spec.draw(args.png)}")


def run(args: argparse.Namespace) -> int:
    if args.png:
        from cellsearch.outputs import output_file

        output_file(args.png, "drawing")  # before anything is printed: a bad path is the whole answer
    if args.hash is not None:
        return _show_searched(args)
    spec = resolve_cell(args.cell)
    if args.dot:
        print(spec.to_dot(), end="")
        return 0
    _print_spec(spec, spec.name or args.cell, args)
    return 0


def _show_searched(args: argparse.Namespace) -> int:
    import math

    from cellsearch.results import load_run

    results = load_run(args.cell)
    try:
        cell_hash = results.resolve_hash(args.hash)
        spec = results.spec(cell_hash)
        if args.dot:
            print(spec.to_dot(), end="")
            return 0
        cells = results.cells().set_index("cell_hash")
        row = cells.loc[cell_hash]
        _print_spec(spec, row["name"] if isinstance(row["name"], str) else row["short_hash"], args)
        status = row["status"] + (f" (by {row['rejected_by']})" if isinstance(row["rejected_by"], str) else "")
        print(f"\nstatus:     {status}, created at step {row['step_created']}")
        print(f"score:      {row['score']:.4f}" if not math.isnan(row["score"]) else "score:      - (not evaluated "
              "on every task)")
        print(f"\nresults (ratio = best / current best of {results.config.reference_cell}):")
        mine = results.evaluations(cell_hash=cell_hash)  # this cell's rows only, not the whole run's
        summary = mine.groupby("task").agg(settings=("metric", "size"), best=("metric", "max"),
                                           median=("metric", "median"),
                                           ok=("status", lambda s: int((s == "ok").sum())))
        summary["ratio"] = [row.get(f"ratio_{task}", float("nan")) for task in summary.index]
        print(summary.to_string(float_format=lambda v: f"{v:.4f}") if not summary.empty else "(no evaluations)")
        print("\nlineage (newest first):")
        for ancestor in results.lineage(cell_hash, cells=cells.reset_index()).itertuples(index=False):
            made = ancestor.mutation_detail if isinstance(ancestor.parent_hash, str) else "initial cell"
            score = "-" if math.isnan(ancestor.score) else f"{ancestor.score:.4f}"
            label = ancestor.name if isinstance(ancestor.name, str) else ancestor.short_hash
            print(f"  {label:<14} step {ancestor.step_created:<5} score {score:<8} {made}")
    finally:
        results.close()
    return 0

