"""``CellRNN``: a compiled cell as a drop-in replacement for ``nn.GRU`` / ``nn.LSTM``.

Parameters (per layer ``l``, per linear node, per operand; names are the spec's)::

    layers.{l}.node_{NODE}.weight_{OPERAND}   shape (hidden, width of OPERAND)
    layers.{l}.node_{NODE}.bias               shape (hidden,)
    layers.{l}.node_{NODE}.gain               shape (hidden,)   (layer_norm=True only)
    layers.{l}.node_{SCALE_NODE}.weight       shape (hidden,)   (a ``scale`` node: the peephole)
    layers.0.input_projection.weight_x        shape (hidden, input_size)   (see below)
    layers.0.input_projection.bias            shape (hidden,)

and :meth:`CellRNN.weight` / :meth:`CellRNN.bias` / :meth:`CellRNN.scale` reach them as
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
the uniform draw only. ``scale`` vectors are drawn from the same uniform, after every linear
node of the layer; layer-norm gains start at 1.

Regularisers (both off by default, and then the module computes exactly what it did without them):

* ``layer_norm=True`` (Ba, Kiros & Hinton, 2016): every linear node of the cell computes
  ``gain * normalise(sum_operand W_operand operand) + bias``, where ``normalise`` takes each
  example's ``hidden`` values of the node to mean 0 and variance 1 (epsilon 1e-5). The node's
  bias is the shift after normalisation (so its ``bias`` constant, e.g. ``lstm_b``'s forget bias,
  keeps its meaning) and ``gain`` (one per unit, init 1) is a new parameter. The input projection
  is not normalised.
* ``dropout_mode="variational"`` (Gal & Ghahramani, 2016): in training mode, with probability
  ``dropout``, one mask per sequence (per batch row), drawn at the start of ``forward`` and reused
  at every time step, on every layer's input (the module's input included), on the first state
  where the cell's linear nodes read it, directly or through ``identity`` (the recurrent weights;
  the state carried on through elementwise ops is not dropped, so nothing is erased from memory),
  and on the last layer's output. Masks are drawn layer by layer (input, then state) and the
  output's last. In eval mode nothing is dropped. ``dropout_mode="standard"`` is ``nn.GRU``'s: a
  fresh mask per element of the output of every layer but the last.
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
from cellsearch.spec import INPUT, SCALE, CellSpec

__all__ = ["CellRNN", "CellLayer", "LinearNode", "ScaleNode", "DROPOUT_MODES", "inverted_dropout"]

#: ``standard``: nn.GRU's dropout between layers; ``variational``: per-sequence masks (see the module doc).
DROPOUT_MODES = ("standard", "variational")

_NODE_PREFIX = "node_"
_WEIGHT_PREFIX = "weight_"


class LinearNode(nn.Module):
    """The parameters of one linear node: ``weight_{operand}`` per operand and ``bias``.

    The prefixes keep spec names apart from ``nn.Module``'s own attributes: a node or operand
    called ``forward`` or ``training`` is harmless.
    """

    def __init__(self, operand_widths: Sequence[tuple[str, int]], hidden_size: int, diag: float, bias: float,
                 layer_norm: bool = False) -> None:
        super().__init__()
        self.operands = tuple(name for name, _ in operand_widths)
        self.diag_init = diag
        self.bias_init = bias
        for operand, width in operand_widths:
            self.register_parameter(_WEIGHT_PREFIX + operand, nn.Parameter(torch.empty(hidden_size, width)))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        # registered only with layer normalisation, so that plain models keep their state dicts
        self.gain = nn.Parameter(torch.ones(hidden_size)) if layer_norm else None

    def weight(self, operand: str) -> nn.Parameter:
        if operand not in self.operands:
            raise KeyError(f"operand {operand!r} is not read by this node (operands: {list(self.operands)})")
        return self._parameters[_WEIGHT_PREFIX + operand]


class ScaleNode(nn.Module):
    """The parameter of one ``scale`` node: ``weight``, one value per unit (the peephole)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))


class CellLayer(nn.Module):
    """One layer: a :class:`LinearNode` per linear node and a :class:`ScaleNode` per scale node (``node_{NAME}``)."""

    def __init__(self, spec: CellSpec, input_size: int, hidden_size: int, plan: LayerPlan) -> None:
        super().__init__()
        self.node_names = tuple(n for n, node in spec.nodes.items() if node.op == "linear")
        self.scale_names = tuple(n for n, node in spec.nodes.items() if node.op == SCALE)
        for name in self.node_names:
            node = spec.nodes[name]
            widths = [(o, input_size if o == INPUT else hidden_size) for o in node.inputs]
            self.add_module(_NODE_PREFIX + name,
                            LinearNode(widths, hidden_size, node.diag, node.bias, layer_norm=plan.layer_norm))
        for name in self.scale_names:
            self.add_module(_NODE_PREFIX + name, ScaleNode(hidden_size))
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

    def scale_node(self, name: str) -> ScaleNode:
        if name not in self.scale_names:
            raise KeyError(f"no scale node {name!r} in this cell (scale nodes: {list(self.scale_names)})")
        return self._modules[_NODE_PREFIX + name]  # type: ignore[return-value]

    def linear_nodes(self) -> list[LinearNode]:
        nodes = [self.node(n) for n in self.node_names]
        return nodes + ([self.input_projection] if self.input_projection is not None else [])

    def vectors(self, plan: LayerPlan, masks: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """The vector arguments ``b`` of ``plan``'s layer function (see :class:`~.codegen.VectorSlot`).

        ``masks``: state name -> the per-sequence dropout mask of that state (``mask`` slots).
        """
        out = []
        for slots in plan.vectors:
            parts = [self._vector(slot.node, slot.param, masks) for slot in slots]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, -1))
        return tuple(out)

    def _vector(self, node: str, param: str, masks: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if param == "bias":
            return self.node(node).bias
        if param == "gain":
            return self.node(node).gain
        if param == "zero":
            return torch.zeros_like(self.node(node).bias)
        if param == "scale":
            return self.scale_node(node).weight
        if param == "mask" and masks is not None:
            return masks[node]
        raise KeyError(f"no vector {param!r} for {node!r}")


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
        dropout_mode: str = "standard",
        layer_norm: bool = False,
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
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {dropout_mode!r}")
        if not isinstance(layer_norm, bool):
            raise ValueError(f"layer_norm must be True or False, got {layer_norm!r}")
        input_size, hidden_size, num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.spec = spec
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.init_scale = float(init_scale)
        self.generator = generator
        self.dropout_mode = dropout_mode
        self.layer_norm = layer_norm
        self.plans = _plans(spec, input_size, hidden_size, num_layers, layer_norm, state_mask=False)
        self._functions = tuple(compile_plan(p) for p in self.plans)
        # variational dropout's step functions read the first state through a mask; built only when used
        self.masked_plans = (_plans(spec, input_size, hidden_size, num_layers, layer_norm, state_mask=True)
                             if self.variational else None)
        self._masked_functions = (tuple(compile_plan(p) for p in self.masked_plans)
                                  if self.masked_plans is not None else None)
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
        state["_masked_functions"] = None
        state["spec"] = self.spec.to_dict()
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("dropout_mode", "standard")  # pickled before the regularisers existed
        state.setdefault("layer_norm", False)
        state.setdefault("masked_plans", None)
        self.__dict__.update(state)
        self.spec = CellSpec.from_dict(state["spec"])
        self._functions = tuple(compile_plan(p) for p in self.plans)
        self._masked_functions = (tuple(compile_plan(p) for p in self.masked_plans)
                                  if self.masked_plans is not None else None)

    @property
    def variational(self) -> bool:
        """Whether this module drops with per-sequence masks (``dropout_mode='variational'`` and ``dropout > 0``)."""
        return self.dropout_mode == "variational" and self.dropout > 0

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``nn.GRU`` (the compiled layer needs no flat weight buffer)."""

    # ------------------------------------------------------------------ parameters
    def weight(self, layer: int, node: str, operand: str) -> nn.Parameter:
        """The matrix of linear node ``node`` for ``operand`` in ``layer`` (shape (hidden, width))."""
        return self.layers[layer].node(node).weight(operand)

    def bias(self, layer: int, node: str) -> nn.Parameter:
        """The bias of linear node ``node`` in ``layer``."""
        return self.layers[layer].node(node).bias

    def scale(self, layer: int, node: str) -> nn.Parameter:
        """The per-unit vector of scale node ``node`` in ``layer`` (shape (hidden,))."""
        return self.layers[layer].scale_node(node).weight

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
                    if node.gain is not None:
                        node.gain.fill_(1.0)
                # after every linear node: cells without scale nodes draw exactly what they always drew
                for name in layer.scale_names:
                    vector = layer.scale_node(name).weight
                    vector.copy_(_uniform(vector, bound, generator))

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
        variational = self.variational and self.training
        plans, functions = ((self.masked_plans, self._masked_functions) if variational
                            else (self.plans, self._functions))
        for index, (layer, plan, function) in enumerate(zip(self.layers, plans, functions)):
            masks = None
            if variational:
                # one mask per sequence, reused at every step: (batch, width) broadcast over time
                layer_input = layer_input * self._mask((batch, layer_input.shape[-1]), input).unsqueeze(time_dim)
                masks = {self.spec.states[0]: self._mask((batch, hidden), input)}
            weights = self._layer_weights(layer, plan)
            biases = layer.vectors(plan, masks)
            sizes = tuple(tuple(unit * hidden for unit in units) for units in plan.split_units)
            states = tuple(s[index] for s in initial)
            output, final = function(layer_input, states, weights, biases, sizes, hidden, time_dim, record)
            finals.append(final)
            if self.dropout and self.training and index < self.num_layers - 1 and not variational:
                output = self._dropout(output)
            layer_input = output
        if variational:
            output = output * self._mask((batch, hidden), input).unsqueeze(time_dim)
        stacked = tuple(torch.stack([final[i] for final in finals]) for i in range(len(self.spec.states)))
        if unbatched:
            output = output.squeeze(batch_dim)
            stacked = tuple(s.squeeze(1) for s in stacked)
        return output, (stacked[0] if len(stacked) == 1 else stacked)

    def _layer_weights(self, layer: CellLayer, plan: LayerPlan) -> tuple:
        weights = []
        for slots in plan.weights:
            matrices = [layer.node(s.node).weight(s.operand) for s in slots]
            weights.append((matrices[0] if len(matrices) == 1 else torch.cat(matrices)).t())
        return tuple(weights)

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

    def _mask(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A dropout mask (kept values scaled by 1/keep) of ``shape``, from ``generator`` when there is one."""
        return dropout_mask(shape, self.dropout, like.dtype, like.device, self.generator)

    def _dropout(self, output: torch.Tensor) -> torch.Tensor:
        return inverted_dropout(output, self.dropout, self.generator)

    def extra_repr(self) -> str:
        name = self.spec.name or self.spec.short_hash
        return (
            f"cell={name}, input_size={self.input_size}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
            + (f", dropout_mode={self.dropout_mode}" if self.dropout_mode != "standard" else "")
            + (", layer_norm=True" if self.layer_norm else "")
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


def _plans(spec: CellSpec, input_size: int, hidden_size: int, num_layers: int, layer_norm: bool,
           state_mask: bool) -> tuple[LayerPlan, ...]:
    inner = build_plan(spec, project_input=False, layer_norm=layer_norm, state_mask=state_mask)
    first = (build_plan(spec, project_input=True, layer_norm=layer_norm, state_mask=state_mask)
             if input_size != hidden_size else inner)
    return (first,) + (inner,) * (num_layers - 1)


def inverted_dropout(values: torch.Tensor, probability: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Dropout in training: ``values`` times a mask drawn as one ``bernoulli_`` of the keep probability over
    their shape (from ``generator``, else torch's default generator of their device), divided by it.

    On the CPU that is the draw ``nn.functional.dropout`` makes. On CUDA its fused kernel draws other numbers
    from the same generator, so the single-run modules draw through this function on every device: a member
    of a batched model (:func:`~cellsearch.compiler.batched.member_dropout`, a generator continuing the
    default one) then gets on a GPU too the masks it gets alone.
    """
    if generator is None and values.device.type == "cpu":
        return nn.functional.dropout(values, probability, training=True)  # the same draw, one kernel
    return values * dropout_mask(values.shape, probability, values.dtype, values.device, generator)


def dropout_mask(shape: tuple[int, ...], probability: float, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(1 - p) / (1 - p) of ``shape``: drawn on the generator's device (then moved), or with torch's
    default generator on ``device`` when there is none."""
    keep = 1.0 - probability
    mask = torch.empty(shape, dtype=dtype, device=generator.device if generator is not None else device)
    mask.bernoulli_(keep, generator=generator)
    return mask.div_(keep).to(device)


def _uniform(like: torch.Tensor, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    values = torch.empty(like.shape, dtype=like.dtype, device=device)
    values.uniform_(-bound, bound, generator=generator)
    return values
