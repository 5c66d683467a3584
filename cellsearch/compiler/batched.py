"""K cell layers of one cell and one shape as one batched module: stacked weights, one ``baddbmm`` per step group.

Settings of a cell that share a shape (layers, width) differ only in numbers (learning rate, init
scale, clipping, seed). Stacked along a leading *member* dimension, their weights make one model
whose every matrix multiply is a batched one (``torch.baddbmm``) and whose every elementwise op
covers all members at once, so a time step costs about as many kernel launches (and as much Python)
as one model's step, whatever the number of members.

How it reuses the compiler. :func:`~cellsearch.compiler.codegen.build_plan` generates a layer's
step function from whitelisted templates; that function's structure (x projections hoisted over
the whole sequence, one state matmul per step group, ``unbind``/``split`` instead of indexing, the
deferred weight gradient) is exactly what the batched model needs. :func:`batched_source` rewrites
the few *shape* conventions of the generated source for a leading member dimension (rows are
``x.shape[1]``, column blocks are the last dimension, biases broadcast over rows) and
:func:`compile_batched` compiles it in the compiler's namespace with ``addmm`` bound to
``torch.baddbmm``. Every rewrite must match; a generated line of an unknown form raises instead of
compiling something wrong.

Table input (:func:`table_source`): a first layer fed by an embedding can compute its x-only part
(input projections, their activations) once per vocabulary row and gather the rows of the tokens,
which is cheaper when the vocabulary is smaller than ``T * B`` (the character tasks: 30-40 symbols
against 700 positions). :class:`~cellsearch.model.BatchedSequenceModel` does so by default; the step
part is the same code.

Layouts (time-major, like the training loop): an input is ``(K, T, B, input_size)`` or, shared by
all members, ``(T, B, input_size)``; the output is ``(K, T, B, hidden)``; a state is
``(K, num_layers, B, hidden)`` (a tuple of those for cells with several states). Parameters have
the names of :class:`~cellsearch.compiler.CellRNN` with a leading member dimension, so
:meth:`BatchedCellRNN.from_members` / :meth:`BatchedCellRNN.member` convert by name. The whole
batched language model (embedding, these layers, softmax layer) is
:class:`~cellsearch.model.BatchedSequenceModel`, built on this module's helpers
(:func:`stack_members`, :func:`member_state`, :func:`take_members`, :func:`member_dropout`); the
compiler imports nothing from the models or the training loop.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cellsearch.compiler.codegen import _NAMESPACE, SOURCE_NAMES, LayerPlan
from cellsearch.compiler.module import CellLayer, CellRNN, _recorder, dropout_mask
from cellsearch.spec import CellSpec

__all__ = [
    "BatchedCellRNN",
    "batched_source",
    "table_source",
    "compile_batched",
    "compile_table",
    "stack_members",
    "member_state",
    "member_dropout",
    "member_masks",
    "take_members",
    "check_member_count",
    "check_generators",
]

# (pattern, replacement): the generated source's shape conventions and their batched forms. Lines that
# use the removed forms but match none of these are rejected by :func:`batched_source`.
_REWRITES = (
    (re.compile(r"^(\s*v0 = x)\.reshape\(-1, x\.shape\[-1\]\)$"), r"\1.reshape(x.shape[0], -1, x.shape[-1])"),
    (re.compile(r"^(\s*rows = v0)\.shape\[0\]$"), r"\1.shape[1]"),
    (re.compile(r"\.expand\(rows, -1\)"), ".expand(-1, rows, -1)"),
    (re.compile(r"(\.unsafe_split_with_sizes\(sz\[\d+\]), 1\)"), r"\1, -1)"),
    (re.compile(r"(\.unsafe_split\(hidden), 1\)"), r"\1, -1)"),
    (re.compile(r"^(\s*\S.* = .*\bcat\(\(.*\)), 1\)"), r"\1, -1)"),
)
# Forms that mean "the member dimension is not accounted for" if they survive the rewrite.
_UNBATCHED_FORMS = re.compile(r"reshape\(-1, |(?<!\bx)\.shape\[0\]|expand\(rows, |, 1\)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_INDEXED_LOCAL = re.compile(r"^[a-z]\d+(_\d+)?$")


def _check_line(line: str, extra_names: frozenset = frozenset()) -> None:
    if _UNBATCHED_FORMS.search(line):
        raise ValueError(f"batched compiler: unknown form in generated line {line.strip()!r}")
    for name in _IDENTIFIER.findall(line):
        if name not in SOURCE_NAMES and name not in extra_names and not _INDEXED_LOCAL.match(name):
            raise ValueError(f"batched compiler: unexpected name {name!r} in generated line {line.strip()!r}")


def batched_source(source: str) -> str:
    """The generated layer source of :func:`build_plan`, rewritten for a leading member dimension.

    Raises ``ValueError`` when a line still uses an unbatched shape convention after the rewrite or
    names something outside the compiler's vocabulary (the generator changed in a way this module
    does not know; compiling it anyway could give silently wrong numbers).
    """
    lines = []
    for line in source.splitlines():
        for pattern, replacement in _REWRITES:
            line = pattern.sub(replacement, line)
        _check_line(line)
        lines.append(line)
    return "\n".join(lines) + "\n"


_TABLE_NAMES = frozenset({"tokens", "index_select"})
_HEADER = "def layer(x, states, w, b, sz, hidden, time_dim, record):"
_HOISTED_END = re.compile(r"^\s*(o\d+_\d+(, o\d+_\d+)* = |q\d+ = |v\d+, .*= states$)")
_RAW_INPUT_SEQUENCE = re.compile(r"^(\s*q\d+ = )x\.unbind\(time_dim\)$")
_FIXED_LINES = {
    "    lead = x.shape[:-1]": None,
    "    v0 = x.reshape(x.shape[0], -1, x.shape[-1])": "    v0 = x",
    "    rows = v0.shape[1]": "    rows = tokens.shape[-1]",
}


def table_source(source: str) -> str:
    """The batched layer source for an input that is a per-member table read at shared token ids.

    A first layer fed by an embedding computes everything that depends on ``x`` alone (the hoisted
    part: input projections and their activations) once per *vocabulary row* instead of once per
    position, then gathers the rows of the tokens: ``(E @ W)[tokens]`` equals ``E[tokens] @ W`` row
    by row, and a vocabulary smaller than ``T * B`` positions makes it cheaper, in backward too
    (the gradient of the table is an ``index_add`` of the positions' gradients, multiplied once).
    The function takes ``x`` = the table ``(K, vocab, input_size)`` and two more arguments:
    ``lead`` = ``(K, T, B)`` and ``tokens`` = the flat token ids ``(T * B,)``.
    """
    lines = batched_source(source).splitlines()
    if lines[0] != _HEADER:
        raise ValueError(f"batched compiler: unknown header {lines[0]!r}")
    out = [_HEADER[:-2] + ", lead, tokens):"]
    hoisted: list[str] = []
    body = iter(enumerate(lines[1:], start=1))
    for index, line in body:
        if line in _FIXED_LINES:
            if _FIXED_LINES[line] is not None:
                out.append(_FIXED_LINES[line])
            continue
        if _HOISTED_END.match(line):
            rest = lines[index:]
            break
        out.append(line)
        hoisted.extend(name.strip() for name in line.split(" = ", 1)[0].split(","))
    else:
        raise ValueError("batched compiler: no step part in the generated source")
    later = set(_IDENTIFIER.findall("\n".join(rest)))
    # every hoisted value the step part reads, at the positions of the tokens
    out += [f"    {name} = {name}.index_select(1, tokens)" for name in hoisted if name in later and name != "v0"]
    for line in rest:
        out.append(_RAW_INPUT_SEQUENCE.sub(r"\1v0.index_select(1, tokens).reshape(lead + (-1,)).unbind(time_dim)",
                                           line))
    for line in out:
        _check_line(line, _TABLE_NAMES)
    return "\n".join(out) + "\n"


#: The compiler's namespace with the one change a leading batch dimension needs.
_BATCHED_NAMESPACE = {**_NAMESPACE, "addmm": torch.baddbmm}


@lru_cache(maxsize=512)
def _compile_batched_source(source: str) -> Callable:
    namespace = dict(_BATCHED_NAMESPACE)
    code = compile(batched_source(source), "<cellsearch batched cell>", "exec")
    exec(code, namespace)  # noqa: S102 -- source comes only from the compiler's templates, checked above
    return namespace["layer"]


def compile_batched(plan: LayerPlan) -> Callable:
    """The batched layer function of ``plan`` (same signature as the compiler's layer functions)."""
    return _compile_batched_source(plan.source)


@lru_cache(maxsize=512)
def _compile_table_source(source: str) -> Callable:
    namespace = dict(_BATCHED_NAMESPACE)
    code = compile(table_source(source), "<cellsearch batched cell, table input>", "exec")
    exec(code, namespace)  # noqa: S102 -- source comes only from the compiler's templates, checked above
    return namespace["layer"]


def compile_table(plan: LayerPlan) -> Callable:
    """The table-input layer function of ``plan`` (see :func:`table_source`)."""
    return _compile_table_source(plan.source)


def _stack_in_place(module: nn.Module, members: int) -> None:
    """Give every parameter of ``module`` a leading member dimension (values: zeros)."""
    for owner in module.modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            owner.register_parameter(name, nn.Parameter(parameter.new_zeros((members, *parameter.shape))))


def stack_members(batched: nn.Module, members: Sequence[nn.Module]) -> None:
    """Copy the parameters of ``members`` (same names, no member dimension) into ``batched``, stacked."""
    states = [m.state_dict() for m in members]
    with torch.no_grad():
        for name, parameter in batched.named_parameters():
            values = [state[name] for state in states]
            if any(tuple(v.shape) != tuple(parameter.shape[1:]) for v in values):
                raise ValueError(f"member parameter {name!r} has shape {tuple(values[0].shape)}, "
                                 f"expected {tuple(parameter.shape[1:])}")
            parameter.copy_(torch.stack(values))


def member_state(batched: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Member ``index``'s parameters of a batched module, by their unbatched names (views; clone to keep them)."""
    return {name: parameter.detach()[index] for name, parameter in batched.named_parameters()}


def _first_parameter(module: nn.Module) -> torch.Tensor | None:
    """The first parameter of ``module`` (its device and dtype are the module's), or None.

    A cell without linear nodes (``h' = x + h``) at equal input and hidden widths has no weights at all;
    like ``CellRNN``, such a module takes device and dtype from its input, so there is nothing to move.
    """
    return next(module.parameters(), None)


def check_member_count(members: int) -> int:
    """``members``, checked to be a positive integer (the member count of a batched module)."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive integer, got {members!r}")
    return members


class BatchedCellRNN(nn.Module):
    """``members`` independent :class:`~cellsearch.compiler.CellRNN` of one cell and shape, as one module.

    ``output, state = rnn(input, state=None)``: ``input`` is ``(K, T, B, input_size)``, or
    ``(T, B, input_size)`` shared by every member; ``output`` is ``(K, T, B, hidden)``; ``state`` is
    ``(K, num_layers, B, hidden)`` (a tuple in ``spec.states`` order for several states). Time-major
    only. Dropout between layers (training mode) draws member ``k``'s masks from ``generators[k]``
    (like ``CellRNN``; torch's default generator when ``generators`` is None), so that a member sees
    the masks it would see alone. Parameters start at zero: build from trained or initialised
    members with :meth:`from_members`. ``dropout_mode`` and ``layer_norm`` are ``CellRNN``'s; with
    variational dropout member ``k``'s per-sequence masks come from ``generators[k]`` in the order
    ``CellRNN`` draws them.
    """

    def __init__(self, spec: CellSpec, members: int, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, generators: Sequence[torch.Generator] | None = None, *,
                 dropout_mode: str = "standard", layer_norm: bool = False) -> None:
        super().__init__()
        # the template's own initial values are discarded: a private generator leaves the global RNG alone
        template = CellRNN(spec, input_size, hidden_size, num_layers, dropout, generator=torch.Generator(),
                           dropout_mode=dropout_mode, layer_norm=layer_norm)
        template.generator = None
        self.dropout_mode = template.dropout_mode
        self.layer_norm = template.layer_norm
        self.variational = template.variational
        self.masked_plans = template.masked_plans
        self._masked_functions = (tuple(compile_batched(p) for p in self.masked_plans)
                                  if self.masked_plans is not None else None)
        self.members = check_member_count(members)
        self.spec = spec
        self.input_size = template.input_size
        self.hidden_size = template.hidden_size
        self.num_layers = template.num_layers
        self.dropout = template.dropout
        self.plans: tuple[LayerPlan, ...] = template.plans
        self._functions = tuple(compile_batched(p) for p in self.plans)
        self._table_function = compile_table(self.plans[0])
        self.layers = template.layers
        _stack_in_place(self.layers, self.members)
        self.generators = check_generators(generators, self.members)

    @classmethod
    def from_members(cls, rnns: Sequence[CellRNN],
                     generators: Sequence[torch.Generator] | None = None) -> "BatchedCellRNN":
        """One batched module holding the weights of ``rnns`` (same cell, sizes, layers and dropout)."""
        first = rnns[0]
        shape = lambda r: (r.spec.hash, r.input_size, r.hidden_size, r.num_layers, r.dropout,  # noqa: E731
                           r.dropout_mode, r.layer_norm)
        for rnn in rnns[1:]:
            if shape(rnn) != shape(first):
                raise ValueError("BatchedCellRNN.from_members: members must share cell, sizes, layers, dropout "
                                 "(probability and mode) and layer_norm")
        reference = _first_parameter(first)
        batched = cls(first.spec, len(rnns), first.input_size, first.hidden_size, first.num_layers, first.dropout,
                      generators, dropout_mode=first.dropout_mode, layer_norm=first.layer_norm)
        if reference is not None:
            batched.to(device=reference.device, dtype=reference.dtype)
        stack_members(batched, rnns)
        return batched

    def member(self, index: int) -> CellRNN:
        """Member ``index`` as a separate ``CellRNN`` (a copy of its weights)."""
        reference = _first_parameter(self)
        rnn = CellRNN(self.spec, self.input_size, self.hidden_size, self.num_layers, self.dropout,
                      generator=torch.Generator(), dropout_mode=self.dropout_mode, layer_norm=self.layer_norm)
        rnn.generator = None  # like a CellRNN built without one: dropout from the default generator
        if reference is not None:
            rnn.to(device=reference.device, dtype=reference.dtype)
        rnn.load_state_dict(member_state(self, index))
        return rnn

    def forward(self, input: torch.Tensor, state: Any = None,  # noqa: A002
                tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Run the members; with ``tokens`` (T, B), ``input`` is a per-member table ``(K, rows, input_size)``
        and the first layer reads its rows at ``tokens`` (see :func:`table_source`; an embedding's table)."""
        variational = self.variational and self.training
        if tokens is not None:
            if variational:
                raise ValueError("BatchedCellRNN: a table input cannot take variational dropout on the input")
            if (input.dim() != 3 or input.shape[0] != self.members or input.shape[-1] != self.input_size
                    or tokens.dim() != 2):
                raise ValueError(f"BatchedCellRNN: expected a table (K={self.members}, rows, {self.input_size}) "
                                 f"and tokens (T, B), got {tuple(input.shape)} and {tuple(tokens.shape)}")
            first = _with_table(self._table_function, (self.members, *tokens.shape), tokens.reshape(-1))
            batch = tokens.shape[1]
        else:
            first = self._functions[0]
            if input.dim() == 3:
                input = input.unsqueeze(0).expand(self.members, -1, -1, -1)
            if input.dim() != 4 or input.shape[0] != self.members or input.shape[-1] != self.input_size:
                raise ValueError(
                    f"BatchedCellRNN: expected input (K={self.members}, T, B, {self.input_size}) "
                    f"or (T, B, {self.input_size}), got {tuple(input.shape)}"
                )
            batch = input.shape[2]
        initial = self._initial_state(state, batch, input)
        time_dim = 1
        record = _recorder(time_dim, batched=True)
        finals = []
        layer_input = input
        plans, functions = self.plans, (first, *self._functions[1:])
        if variational:
            plans, functions = self.masked_plans, self._masked_functions
        hidden = self.hidden_size
        for index, (layer, plan, function) in enumerate(zip(self.layers, plans, functions)):
            masks = None
            if variational:
                # (K, B, width) per sequence, broadcast over time (dim 1): member k's from generators[k]
                layer_input = layer_input * self._masks((batch, layer_input.shape[-1]), input).unsqueeze(1)
                masks = {self.spec.states[0]: self._masks((batch, hidden), input)}
            weights, biases = _layer_tensors(layer, plan, masks)
            sizes = tuple(tuple(unit * hidden for unit in units) for units in plan.split_units)
            states = tuple(s[:, index] for s in initial)
            output, final = function(layer_input, states, weights, biases, sizes, hidden, time_dim, record)
            finals.append(final)
            if self.dropout and self.training and index < self.num_layers - 1 and not variational:
                output = member_dropout(output, self.dropout, self.generators)
            layer_input = output
        if variational:
            output = output * self._masks((batch, hidden), input).unsqueeze(1)
        stacked = tuple(torch.stack([final[i] for final in finals], 1) for i in range(len(self.spec.states)))
        return output, (stacked[0] if len(stacked) == 1 else stacked)

    def _masks(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return member_masks(shape, self.dropout, like.dtype, like.device, self.generators, self.members)

    def _initial_state(self, state: Any, batch: int, input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(self.spec.states)
        expected = (self.members, self.num_layers, batch, self.hidden_size)
        if state is None:
            zeros = input.new_zeros(expected)
            return tuple(zeros for _ in range(count))
        tensors = (state,) if isinstance(state, torch.Tensor) else tuple(state)
        if len(tensors) != count or any(tuple(t.shape) != expected for t in tensors):
            raise ValueError(f"BatchedCellRNN: state must be {count} tensor(s) of shape {expected}")
        return tensors

    def take(self, indices: Sequence[int]) -> "BatchedCellRNN":
        """A new module with only the members at ``indices`` (weights copied)."""
        return take_members(self, indices, lambda count, generators: BatchedCellRNN(
            self.spec, count, self.input_size, self.hidden_size, self.num_layers, self.dropout, generators,
            dropout_mode=self.dropout_mode, layer_norm=self.layer_norm))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_functions"] = None
        state["_masked_functions"] = None
        state["_table_function"] = None
        state["spec"] = self.spec.to_dict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.spec = CellSpec.from_dict(state["spec"])
        self._functions = tuple(compile_batched(p) for p in self.plans)
        self._table_function = compile_table(self.plans[0])
        self._masked_functions = (tuple(compile_batched(p) for p in self.masked_plans)
                                  if self.masked_plans is not None else None)

    def extra_repr(self) -> str:
        return (f"cell={self.spec.name or self.spec.short_hash}, members={self.members}, input_size={self.input_size}, "
                f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}")


def _with_table(function: Callable, lead: tuple[int, ...], tokens: torch.Tensor) -> Callable:
    def layer(x, states, w, b, sz, hidden, time_dim, record):
        return function(x, states, w, b, sz, hidden, time_dim, record, lead, tokens)

    return layer


def _layer_tensors(layer: CellLayer, plan: LayerPlan,
                   masks: dict[str, torch.Tensor] | None = None) -> tuple[tuple, tuple]:
    """The plan's concatenated matrices ``(K, width, columns)`` and vectors ``(K, 1, columns)``.

    ``masks`` (state -> ``(K, B, hidden)``) fill the plan's ``mask`` slots; they are per row, not
    broadcast over rows, and go in as they are.
    """
    weights = []
    for slots in plan.weights:
        matrices = [layer.node(s.node).weight(s.operand) for s in slots]
        weights.append((matrices[0] if len(matrices) == 1 else torch.cat(matrices, 1)).transpose(1, 2).contiguous())
    vectors = []
    for vector, slots in zip(layer.vectors(plan, masks), plan.vectors):
        vectors.append(vector if slots[0].param == "mask" else vector.unsqueeze(1))
    return tuple(weights), tuple(vectors)


def check_generators(generators: Sequence[torch.Generator] | None, members: int) -> tuple[torch.Generator, ...] | None:
    """``generators`` as a tuple of one per member (or None), checked against the member count."""
    if generators is None:
        return None
    generators = tuple(generators)
    if len(generators) != members:
        raise ValueError(f"expected one generator per member ({members}), got {len(generators)}")
    return generators


def member_dropout(values: torch.Tensor, probability: float,
                   generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Dropout on ``(K, ...)`` with member ``k``'s mask drawn from ``generators[k]``.

    Each mask is drawn as :func:`~cellsearch.compiler.module.inverted_dropout` draws it for a run alone (a
    ``bernoulli_`` of the keep probability over the member's shape, divided by it), so a generator in the state
    of the default generator gives a member exactly the masks it would get alone, on a CPU and on a GPU.
    """
    if generators is None:
        return nn.functional.dropout(values, probability, training=True)
    return values * torch.stack([dropout_mask(values.shape[1:], probability, values.dtype, values.device, g)
                                 for g in generators])


def member_masks(shape: tuple[int, ...], probability: float, dtype: torch.dtype, device: torch.device,
                 generators: Sequence[torch.Generator] | None, members: int) -> torch.Tensor:
    """``(K, *shape)`` dropout masks: member ``k``'s drawn from ``generators[k]`` as ``CellRNN`` draws its own
    (:func:`~cellsearch.compiler.module.dropout_mask`), or all at once from torch's default generator."""
    if generators is None:
        return dropout_mask((members, *shape), probability, dtype, device, None)
    return torch.stack([dropout_mask(shape, probability, dtype, device, g) for g in generators])


def take_members(module: nn.Module, indices: Sequence[int], build: Callable[[int, Any], nn.Module]) -> nn.Module:
    """A batched module with only the members at ``indices``: ``build(count, generators)`` makes it, the
    weights are copied.

    ``module`` has ``generators`` (or None) and, optionally, ``table_lookup``, both carried over.
    """
    indices = [int(i) for i in indices]
    generators = None if module.generators is None else [module.generators[i] for i in indices]
    reference = _first_parameter(module)
    taken = build(len(indices), generators)
    if reference is not None:
        taken.to(device=reference.device, dtype=reference.dtype)
        position = torch.tensor(indices, device=reference.device)
        with torch.no_grad():
            sources = dict(module.named_parameters())
            for name, parameter in taken.named_parameters():
                parameter.copy_(sources[name].index_select(0, position))
    taken.train(module.training)
    if hasattr(module, "table_lookup"):
        taken.table_lookup = module.table_lookup
    return taken
