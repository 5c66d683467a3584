"""The ``cellsearch`` command: a thin layer over the library.

Each subcommand lives in its own module under :mod:`cellsearch.commands`,
exposing ``register(subparsers)``, which adds its parser and sets ``func`` (a
callable taking the parsed arguments and returning an exit code). Library errors
that mean bad input (:class:`~cellsearch.errors.UserError` and its kin) print one
clear line, not a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from cellsearch import commands
from cellsearch.errors import user_error_types

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellsearch", description="Evolutionary search for recurrent cell architectures."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_error_types() as error:
        print(f"cellsearch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
