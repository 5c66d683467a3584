"""Error types that mean "bad input from the user", shown by the CLI as one line without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Raised for bad input that is not a cell description or a config (a missing file, a bad name)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from cellsearch.config import ConfigError
    from cellsearch.spec import CellSpecError

    return (UserError, CellSpecError, ConfigError)
