"""Helpers shared by CLI subcommands."""

from __future__ import annotations

from pathlib import Path

from cellsearch import zoo
from cellsearch.errors import UserError
from cellsearch.spec import CellSpec


def resolve_cell(name_or_path: str) -> CellSpec:
    """A reference cell by name, or a cell file (.json/.yaml/.yml) by path."""
    if name_or_path in zoo.names():
        return zoo.get(name_or_path)
    path = Path(name_or_path)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"no cell file at {path}")
        return CellSpec.load(path)
    raise UserError(f"{name_or_path!r} is neither a reference cell ({', '.join(zoo.names())}) nor a cell file")
