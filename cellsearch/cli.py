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
import signal
import sys
import threading

__all__ = ["main", "build_parser"]


class Terminated(BaseException):
    """SIGTERM before a command installs its own handler (the search driver does): stop cleanly."""


def _on_terminate(signum, frame):
    raise Terminated


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The library's "bad input" errors, shown as one line (here, so that errors.py imports nothing back)."""
    from cellsearch.config import ConfigError
    from cellsearch.errors import UserError
    from cellsearch.spec import CellSpecError

    return (UserError, CellSpecError, ConfigError)


def build_parser() -> argparse.ArgumentParser:
    from cellsearch import commands

    parser = argparse.ArgumentParser(
        prog="cellsearch", description="Evolutionary search for recurrent cell architectures."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{module.name}").register(subparsers)
    return parser


def _one_line(message: str) -> str:
    """The message with control characters escaped: a file or path name cannot break it into lines."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in message)


def main(argv: list[str] | None = None) -> int:
    # Imports take seconds on a loaded machine: a Ctrl-C or SIGTERM during them, too, ends with one line.
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous_terminate = signal.signal(signal.SIGTERM, _on_terminate) if in_main_thread else None
    command = "cellsearch"
    try:
        errors = _user_error_types()
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"cellsearch {args.command}"
        try:
            return int(args.func(args) or 0)
        except errors as error:
            print(f"{command}: error: {_one_line(str(error))}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_terminate)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
