"""cellsearch: evolutionary search for recurrent cell architectures.

After Jozefowicz, Zaremba & Sutskever, "An Empirical Exploration of Recurrent
Network Architectures" (ICML 2015). The currency of every layer is the immutable
:class:`CellSpec`; :mod:`cellsearch.zoo` holds the reference cells.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["CellSpec", "CellSpecError", "Node", "zoo", "__version__"]

# Everything loads on first use: `import cellsearch` stays fast (torch, Ray and Optuna are heavy), and the
# CLI can catch a Ctrl-C that arrives while its imports are still running.
_LAZY = {
    "CellSpec": ("cellsearch.spec", "CellSpec"),
    "CellSpecError": ("cellsearch.spec", "CellSpecError"),
    "Node": ("cellsearch.spec", "Node"),
    "CellRNN": ("cellsearch.compiler", "CellRNN"),
    "mutate": ("cellsearch.mutation", "mutate"),
    "Mutation": ("cellsearch.mutation", "Mutation"),
    "MutationConfig": ("cellsearch.mutation", "MutationConfig"),
    "Deduplicator": ("cellsearch.dedup", "Deduplicator"),
    "fingerprint": ("cellsearch.dedup", "fingerprint"),
    "train_and_evaluate": ("cellsearch.training", "train_and_evaluate"),
    "get_task": ("cellsearch.tasks", "get_task"),
    "load_run": ("cellsearch.results", "load_run"),
    "load_model": ("cellsearch.training.checkpoint", "load_model"),
}


def __getattr__(name: str):
    import importlib

    if name == "zoo":
        return importlib.import_module("cellsearch.zoo")
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'cellsearch' has no attribute {name!r}")
