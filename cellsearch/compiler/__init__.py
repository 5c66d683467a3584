"""The compiler from :class:`~cellsearch.spec.CellSpec` to a fast PyTorch module.

``CellRNN(spec, input_size, hidden_size, ...)`` is called like ``nn.GRU``; see
:mod:`cellsearch.compiler.module` for parameters, names and initialisation, and
:mod:`cellsearch.compiler.codegen` for how a cell becomes code.
"""

from cellsearch.compiler.codegen import LayerPlan, build_plan
from cellsearch.compiler.module import CellLayer, CellRNN, LinearNode

__all__ = ["CellRNN", "CellLayer", "LinearNode", "LayerPlan", "build_plan"]
