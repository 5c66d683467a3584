"""Subcommands of the ``cellsearch`` CLI, one module each (see :mod:`cellsearch.cli`)."""
