"""Helpers shared by CLI subcommands."""

from __future__ import annotations

from cellsearch.zoo import resolve_cell

__all__ = ["resolve_cell"]
