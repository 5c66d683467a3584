"""Error types that mean "bad input from the user", shown by the CLI as one line without a traceback.

:func:`shown` formats an untrusted value for such a message: bounded in depth,
items and characters, so that a hostile file (a YAML alias bomb, a list nested
100,000 deep, a 10,000-digit integer) can neither hang nor crash the code that
reports it.
"""

from __future__ import annotations

import datetime
import reprlib
from typing import Any

__all__ = ["UserError", "shown"]


class UserError(Exception):
    """Raised for bad input that is not a cell description or a config (a missing file, a bad name)."""


class _BoundedRepr(reprlib.Repr):
    def repr_int(self, value: int, level: int) -> str:
        # repr() of an int beyond 4300 digits raises ValueError; the size is what matters here.
        if value.bit_length() > 128:
            return f"<{value.bit_length()}-bit integer>"
        return super().repr_int(value, level)

    def repr_instance(self, value: Any, level: int) -> str:
        # Scalars from parsers render as themselves; anything else is named, not rendered (its
        # repr could be huge or run arbitrary code).
        if isinstance(value, (float, complex, bool, type(None), datetime.date)):
            return repr(value)[: self.maxother]
        if isinstance(value, (bytes, bytearray)):
            return repr(bytes(value[: self.maxstring]))
        return f"<{type(value).__name__}>"


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 4
_REPR.maxset = _REPR.maxfrozenset = 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 40, 40


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, nesting and item counts, on one line (for error messages)."""
    text = _REPR.repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
