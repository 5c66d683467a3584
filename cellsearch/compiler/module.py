"""``CellRNN``: a compiled cell as a drop-in replacement for ``nn.GRU`` / ``nn.LSTM``.

Parameters (per layer ``l``, per linear node, per operand; names are the spec's)::

    layers.{l}.node_{NODE}.weight_{OPERAND}   shape (hidden, width of OPERAND)
    layers.{l}.node_{NODE}.bias               shape (hidden,)
    layers.0.input_projection.weight_x        shape (hidden, input_size)   (see below)
    layers.0.input_projection.bias            shape (hidden,)

and :meth:`CellRNN.weight` / :meth:`CellRNN.bias` reach them as
``rnn.weight(layer, node, operand)``. Matrices follow ``nn.Linear``: a node computes
``sum_operand operand @ weight.T + bias``.

Input width. Every operand is ``hidden_size`` wide, except in the first layer when
``input_size != hidden_size``: there a linear node's ``weight_x`` reads the raw input,
shape ``(hidden, input_size)`` (this is how ``nn.GRU``'s ``weight_ih_l0`` maps exactly), and
the cell's non-linear reads of ``x`` (``mut1``'s ``tanh(x)``, ``mut2``'s ``x + ...``, or a
state set to ``x``) read a learned projection ``input_projection`` of the input to the
hidden width. That projection exists only in cells that need it. An ``identity`` of ``x``
counts as a non-linear read.

Speed (see :mod:`cellsearch.compiler.codegen` for the plan): everything that depends on ``x``
alone is computed for the whole sequence before the time loop, with the ``x`` part and bias of
every other linear node; a step does one ``addmm`` per group of linear nodes that read the same
state-dependent operands (one for ``gru`` and ``lstm``). The step matrices' gradients are not
accumulated step by step: the loop uses them detached and :class:`_DeferredWeightGrad` computes
each in one large multiply in backward. Double backward (``create_graph=True``) is therefore not
supported and raises.

Initialisation (:meth:`CellRNN.reset_parameters`): every matrix and bias uniform in
``[-s/sqrt(hidden), s/sqrt(hidden)]`` with init scale ``s``; then each linear node's ``diag``
constant is added to the main diagonal of each of its matrices and its ``bias`` constant is
added to its bias (so ``lstm_b``'s forget bias starts near 1). The input projection gets
the uniform draw only.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from cellsearch import zoo
from cellsearch.compiler.codegen import PROJECTED_INPUT, LayerPlan, build_plan, compile_plan
from cellsearch.spec import INPUT, CellSpec

__all__ = ["CellRNN", "CellLayer", "LinearNode"]

_NODE_PREFIX = "node_"
_WEIGHT_PREFIX = "weight_"


class LinearNode(nn.Module):
    """The parameters of one linear node: ``weight_{operand}`` per operand and ``bias``.

    The prefixes keep spec names apart from ``nn.Module``'s own attributes: a node or operand
    called ``forward`` or ``training`` is harmless.
    """

    def __init__(self, operand_widths: Sequence[tuple[str, int]], hidden_size: int, diag: float, bias: float) -> None:
        super().__init__()
        self.operands = tuple(name for name, _ in operand_widths)
        self.diag_init = diag
        self.bias_init = bias
        for operand, width in operand_widths:
            self.register_parameter(_WEIGHT_PREFIX + operand, nn.Parameter(torch.empty(hidden_size, width)))
        self.bias = nn.Parameter(torch.empty(hidden_size))

    def weight(self, operand: str) -> nn.Parameter:
        if operand not in self.operands:
            raise KeyError(f"operand {operand!r} is not read by this node (operands: {list(self.operands)})")
        return self._parameters[_WEIGHT_PREFIX + operand]


class CellLayer(nn.Module):
    """One layer: a :class:`LinearNode` per linear node of the spec (``node_{NAME}``)."""

    def __init__(self, spec: CellSpec, input_size: int, hidden_size: int, plan: LayerPlan) -> None:
        super().__init__()
        self.node_names = tuple(n for n, node in spec.nodes.items() if node.op == "linear")
        for name in self.node_names:
            node = spec.nodes[name]
            widths = [(o, input_size if o == INPUT else hidden_size) for o in node.inputs]
            self.add_module(_NODE_PREFIX + name, LinearNode(widths, hidden_size, node.diag, node.bias))
        self.input_projection = (LinearNode([(INPUT, input_size)], hidden_size, 0.0, 0.0)
                                 if plan.projects_input else None)

    def node(self, name: str) -> LinearNode:
        if name == PROJECTED_INPUT:
            if self.input_projection is None:
                raise KeyError("this layer has no input projection")
            return self.input_projection
        if name not in self.node_names:
            raise KeyError(f"no linear node {name!r} in this cell (linear nodes: {list(self.node_names)})")
        return self._modules[_NODE_PREFIX + name]  # type: ignore[return-value]

    def linear_nodes(self) -> list[LinearNode]:
        nodes = [self.node(n) for n in self.node_names]
        return nodes + ([self.input_projection] if self.input_projection is not None else [])


class _DeferredWeightGrad(torch.autograd.Function):
    """Identity on the carrier; computes the step matrices' gradients in one multiply each.

    Inside the time loop the step matrices are used detached, so autograd does not compute
    (and accumulate) a small ``(width, batch) @ (batch, columns)`` weight gradient per step.
    The carrier enters every step's ``addmm`` as its added input, so its gradient is exactly
    the per-step gradient of the group's pre-activations, stacked over time; with the operands
    the loop recorded, the weight gradient is one large, efficient multiply.
    The operand lists are filled by the loop after this node is created and read in backward;
    the loop stores them detached, so that they do not tie the graph into a reference cycle.
    Backward is once-differentiable: a double backward through a compiled cell raises.
    With ``batched`` the carrier has a leading member dimension ``(K, rows, columns)`` and each
    step matrix ``(K, width, columns)`` gets its gradient from one batched multiply
    (:mod:`cellsearch.compiler.batched`).
    """

    @staticmethod
    def forward(ctx, carrier, operand_lists, time_dim, batched, *weights):  # type: ignore[override]
        ctx.operand_lists = operand_lists
        ctx.time_dim = time_dim
        ctx.batched = batched
        return carrier.view_as(carrier)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        lead = (grad.shape[0],) if ctx.batched else ()
        grad_rows = grad.reshape(lead + (-1, grad.shape[-1]))
        weight_grads = []
        for operands, needed in zip(ctx.operand_lists, ctx.needs_input_grad[4:]):
            if needed:
                stacked = torch.stack(operands, ctx.time_dim)
                # (columns, width) then transposed back: the concatenated (columns, width) matrix gets a
                # contiguous gradient, so each node's rows reach its parameter without a copy
                rows = stacked.reshape(lead + (-1, stacked.shape[-1]))
                weight_grads.append(torch.matmul(grad_rows.transpose(-1, -2), rows).transpose(-1, -2))
            else:
                weight_grads.append(None)
        return (grad, None, None, None, *weight_grads)


def _recorder(time_dim: int, batched: bool = False):
    def record(carrier, operand_lists, weights):
        if torch.compiler.is_compiling():
            # torch.compile traces a Function's backward when it is applied, before the loop fills the
            # lists: a compiled graph keeps the weights attached and AOTAutograd derives their gradients
            return carrier, weights
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            carrier = _DeferredWeightGrad.apply(carrier, operand_lists, time_dim, batched, *weights)
            return carrier, tuple(w.detach() for w in weights)
        return carrier, weights

    return record


class CellRNN(nn.Module):
    """A multi-layer recurrent network of the cell ``spec``, called like ``nn.GRU``.

    ``output, state = rnn(input, state=None)``: ``input`` is ``(T, B, input_size)``
    (``(B, T, input_size)`` with ``batch_first``, or unbatched ``(T, input_size)``); ``output``
    holds the first state of the last layer at every step; ``state`` is ``(num_layers, B,
    hidden_size)`` for one-state cells and a tuple of those in ``spec.states`` order otherwise
    (like ``nn.LSTM``'s ``(h, c)``). A missing initial state is zeros. Dropout with
    probability ``dropout`` is applied to the output of every layer but the last, in training
    mode only, as in ``nn.GRU``.

    ``generator`` (a ``torch.Generator``), when given, draws the initial weights and the
    dropout masks (on the generator's device, then moved); without it, torch's default
    generator is used, as ``nn.GRU`` does.
    """

    def __init__(
        self,
        spec: CellSpec,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        batch_first: bool = False,
        init_scale: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(spec, CellSpec):
            raise TypeError(f"spec must be a CellSpec, got {type(spec).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if (isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real)
                or not math.isfinite(init_scale) or init_scale < 0):
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale!r}")
        input_size, hidden_size, num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.spec = spec
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.init_scale = float(init_scale)
        self.generator = generator
        inner = build_plan(spec, project_input=False)
        first = build_plan(spec, project_input=True) if input_size != hidden_size else inner
        self.plans = (first,) + (inner,) * (num_layers - 1)
        self._functions = tuple(compile_plan(p) for p in self.plans)
        self.layers = nn.ModuleList(
            CellLayer(spec, input_size if i == 0 else hidden_size, hidden_size, plan)
            for i, plan in enumerate(self.plans)
        )
        self.reset_parameters(init_scale)

    def __getstate__(self) -> dict:
        # Compiled functions do not pickle; they are rebuilt from the spec (Ray, torch.save, deepcopy).
        # CellSpec holds read-only mappings that do not pickle; its plain-data form does.
        state = self.__dict__.copy()
        state["_functions"] = None
        state["spec"] = self.spec.to_dict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.spec = CellSpec.from_dict(state["spec"])
        self._functions = tuple(compile_plan(p) for p in self.plans)

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``nn.GRU`` (the compiled layer needs no flat weight buffer)."""

    # ------------------------------------------------------------------ parameters
    def weight(self, layer: int, node: str, operand: str) -> nn.Parameter:
        """The matrix of linear node ``node`` for ``operand`` in ``layer`` (shape (hidden, width))."""
        return self.layers[layer].node(node).weight(operand)

    def bias(self, layer: int, node: str) -> nn.Parameter:
        """The bias of linear node ``node`` in ``layer``."""
        return self.layers[layer].node(node).bias

    def reset_parameters(self, init_scale: float | None = None, generator: torch.Generator | None = None) -> None:
        """Uniform in [-s/sqrt(H), s/sqrt(H)], then the spec's diagonal and bias constants (see module doc)."""
        scale = self.init_scale if init_scale is None else float(init_scale)
        generator = generator if generator is not None else self.generator
        bound = scale / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for layer in self.layers:
                for node in layer.linear_nodes():
                    for operand in node.operands:
                        matrix = node.weight(operand)
                        matrix.copy_(_uniform(matrix, bound, generator))
                        matrix.diagonal().add_(node.diag_init)
                    node.bias.copy_(_uniform(node.bias, bound, generator))
                    node.bias.add_(node.bias_init)

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:  # noqa: A002
        if input.dim() not in (2, 3):
            raise ValueError(f"CellRNN: expected a 2-D (unbatched) or 3-D input, got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"CellRNN: input has {input.shape[-1]} features, expected input_size={self.input_size}")
        unbatched = input.dim() == 2
        batch_dim = 0 if self.batch_first else 1
        if unbatched:
            input = input.unsqueeze(batch_dim)
        time_dim = 1 - batch_dim
        if input.shape[time_dim] == 0:
            raise ValueError("CellRNN: the input sequence is empty")
        batch = input.shape[batch_dim]
        initial = self._initial_state(state, batch, unbatched, input)
        hidden = self.hidden_size
        record = _recorder(time_dim)
        finals: list[tuple[torch.Tensor, ...]] = []
        layer_input = input
        for index, (layer, plan, function) in enumerate(zip(self.layers, self.plans, self._functions)):
            weights, biases = self._layer_tensors(layer, plan)
            sizes = tuple(tuple(unit * hidden for unit in units) for units in plan.split_units)
            states = tuple(s[index] for s in initial)
            output, final = function(layer_input, states, weights, biases, sizes, hidden, time_dim, record)
            finals.append(final)
            if self.dropout and self.training and index < self.num_layers - 1:
                output = self._dropout(output)
            layer_input = output
        stacked = tuple(torch.stack([final[i] for final in finals]) for i in range(len(self.spec.states)))
        if unbatched:
            output = output.squeeze(batch_dim)
            stacked = tuple(s.squeeze(1) for s in stacked)
        return output, (stacked[0] if len(stacked) == 1 else stacked)

    def _layer_tensors(self, layer: CellLayer, plan: LayerPlan) -> tuple[tuple, tuple]:
        weights = []
        for slots in plan.weights:
            matrices = [layer.node(s.node).weight(s.operand) for s in slots]
            weights.append((matrices[0] if len(matrices) == 1 else torch.cat(matrices)).t())
        biases = []
        for names in plan.biases:
            vectors = [layer.node(n).bias for n in names]
            biases.append(vectors[0] if len(vectors) == 1 else torch.cat(vectors))
        return tuple(weights), tuple(biases)

    def _initial_state(self, state: Any, batch: int, unbatched: bool, input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(self.spec.states)
        expected = (self.num_layers, self.hidden_size) if unbatched else (self.num_layers, batch, self.hidden_size)
        if state is None:
            zeros = input.new_zeros((self.num_layers, batch, self.hidden_size))
            return tuple(zeros for _ in range(count))
        tensors = ((state,) if isinstance(state, torch.Tensor)
                   else tuple(state) if isinstance(state, (tuple, list)) else None)
        if tensors is None or len(tensors) != count or not all(isinstance(t, torch.Tensor) for t in tensors):
            want = "a tensor" if count == 1 else f"a tuple of {count} tensors ({', '.join(self.spec.states)})"
            raise ValueError(f"CellRNN: state must be {want}")
        for name, tensor in zip(self.spec.states, tensors):
            if tuple(tensor.shape) != expected:
                raise ValueError(f"CellRNN: state {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        return tuple(t.unsqueeze(1) if unbatched else t for t in tensors)

    def _dropout(self, output: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return nn.functional.dropout(output, self.dropout, training=True)
        keep = 1.0 - self.dropout
        mask = torch.empty(output.shape, dtype=output.dtype, device=self.generator.device)
        mask.bernoulli_(keep, generator=self.generator)
        return output * mask.to(output.device).div_(keep)

    def extra_repr(self) -> str:
        name = self.spec.name or self.spec.short_hash
        return (
            f"cell={name}, input_size={self.input_size}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )

    # ------------------------------------------------------------------ from torch
    @classmethod
    def from_torch(cls, module: nn.Module) -> "CellRNN":
        """The reference cell matching ``module`` (``nn.GRU`` -> ``gru``, ``nn.LSTM`` -> ``lstm``), with its weights.

        Same input and hidden sizes, layers, dropout, ``batch_first``, dtype and device. The
        two biases of PyTorch map to the one bias of each linear node (their sum), except
        ``gru``'s candidate, whose ``n_x`` and ``n_h`` nodes take ``b_in`` and ``b_hn``.
        """
        if isinstance(module, nn.GRU):
            spec, gates = zoo.get("gru"), _GRU_GATES
        elif isinstance(module, nn.LSTM):
            spec, gates = zoo.get("lstm"), _LSTM_GATES
            if module.proj_size:
                raise ValueError("CellRNN.from_torch: nn.LSTM with proj_size is not supported")
        else:
            raise TypeError(f"CellRNN.from_torch expects nn.GRU or nn.LSTM, got {type(module).__name__}")
        if module.bidirectional:
            raise ValueError("CellRNN.from_torch: bidirectional modules are not supported")
        reference = module.weight_ih_l0
        rnn = cls(spec, module.input_size, module.hidden_size, module.num_layers, module.dropout, module.batch_first)
        rnn.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for index in range(module.num_layers):
                input_weights = getattr(module, f"weight_ih_l{index}").chunk(len(gates), 0)
                hidden_weights = getattr(module, f"weight_hh_l{index}").chunk(len(gates), 0)
                if module.bias:
                    input_biases = getattr(module, f"bias_ih_l{index}").chunk(len(gates), 0)
                    hidden_biases = getattr(module, f"bias_hh_l{index}").chunk(len(gates), 0)
                else:
                    input_biases = hidden_biases = tuple(torch.zeros_like(w[:, 0]) for w in input_weights)
                for gate, (x_node, h_node) in enumerate(gates):
                    if x_node == h_node:
                        rnn.weight(index, x_node, "x").copy_(input_weights[gate])
                        rnn.weight(index, x_node, "h").copy_(hidden_weights[gate])
                        rnn.bias(index, x_node).copy_(input_biases[gate] + hidden_biases[gate])
                    else:
                        rnn.weight(index, x_node, "x").copy_(input_weights[gate])
                        rnn.bias(index, x_node).copy_(input_biases[gate])
                        rnn.weight(index, h_node, "h").copy_(hidden_weights[gate])
                        rnn.bias(index, h_node).copy_(hidden_biases[gate])
        return rnn


#: PyTorch's gate order -> (node reading x, node reading h) in the reference cells.
_GRU_GATES = (("r_pre", "r_pre"), ("z_pre", "z_pre"), ("n_x", "n_h"))
_LSTM_GATES = (("i_pre", "i_pre"), ("f_pre", "f_pre"), ("g_pre", "g_pre"), ("o_pre", "o_pre"))


def _uniform(like: torch.Tensor, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    values = torch.empty(like.shape, dtype=like.dtype, device=device)
    values.uniform_(-bound, bound, generator=generator)
    return values
