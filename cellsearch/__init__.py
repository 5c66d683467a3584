"""cellsearch: evolutionary search for recurrent cell architectures.

After Jozefowicz, Zaremba & Sutskever, "An Empirical Exploration of Recurrent
Network Architectures" (ICML 2015). The currency of every layer is the immutable
:class:`CellSpec`; :mod:`cellsearch.zoo` holds the reference cells.
"""

from __future__ import annotations

from cellsearch import zoo
from cellsearch.spec import CellSpec, CellSpecError, Node

__version__ = "0.1.0"
__all__ = ["CellSpec", "CellSpecError", "Node", "zoo", "__version__"]

# Heavier parts (torch, Ray, Optuna) load on first use, so that `import cellsearch`
# and `cellsearch show` stay fast.
_LAZY = {
    "CellRNN": ("cellsearch.compiler", "CellRNN"),
    "mutate": ("cellsearch.mutation", "mutate"),
    "Mutation": ("cellsearch.mutation", "Mutation"),
    "MutationConfig": ("cellsearch.mutation", "MutationConfig"),
    "Deduplicator": ("cellsearch.dedup", "Deduplicator"),
    "fingerprint": ("cellsearch.dedup", "fingerprint"),
    "train_and_evaluate": ("cellsearch.training", "train_and_evaluate"),
    "get_task": ("cellsearch.tasks", "get_task"),
    "load_run": ("cellsearch.results", "load_run"),
    "load_model": ("cellsearch.checkpoint", "load_model"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'cellsearch' has no attribute {name!r}")
