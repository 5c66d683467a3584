"""From a :class:`~cellsearch.spec.CellSpec` to the Python source of one layer's forward pass.

The plan (:func:`build_plan`) splits a cell into two parts:

* the **hoisted** part: every value that depends on ``x`` alone (``x`` itself, and
  nodes whose operands are all ``x``-only), plus the ``x``-only operands of every
  other ``linear`` node. It runs once over the whole sequence, so each group of
  projections of the same operands is one matrix multiply over ``T * B`` rows.
* the **step** part: the rest, run once per time step. Linear nodes that read the
  same state-dependent operands at the same dependency *stage* form a group whose
  matrices are concatenated, so a step does one matrix multiply per group (one in
  all for ``gru`` and ``lstm``). The ``x`` part and the bias of those nodes are
  computed by the hoisted part as a *carrier* tensor that enters the step multiply
  as ``addmm``'s added input. Nodes that read values computed mid-step (``gru_cho``'s
  projection of ``r * h``) form groups of a later stage.

Per-step slices are taken with ``unbind`` and block outputs are cut with ``split``
(``unsafe_split``: no view bookkeeping, which is safe because the generated code never
writes in place), never by indexing a tensor inside the time loop (indexing makes
backward build a full-size zero gradient per slice). Activations that read whole column
blocks of a group's result (the sigmoid gates of an LSTM) are applied once to the block,
and two patterns become one op each: ``p + z*(q - p)`` (the GRU update) is ``lerp`` and
``p + u*v`` is ``addcmul``. Linear nodes whose operand sets differ (``mut3``'s ``z`` reads
``tanh(h)``, its ``r`` reads ``h``) are separate multiplies of the same stage.

Peepholes, layer normalisation, recurrent dropout. A ``scale`` node (a learned per-unit vector)
is ``mul(v, u)`` with its vector bound before the loop; ``one_minus`` is :func:`one_minus`. With
``layer_norm`` every linear node's output is normalised over its ``hidden`` units and then scaled
by a learned gain and shifted by the node's bias (Ba et al., 2016): the pre-normalisation sums
carry no bias (the plan asks for zero vectors in its place), and each step group's columns are
normalised block by block in one call (:func:`block_layer_norm`) right after the group's
multiply, before any activation. With ``state_mask`` the linear nodes' reads of the first state
(the recurrent weights) read it times a per-sequence mask (variational dropout, Gal & Ghahramani
2016); the state itself, as elementwise ops carry it on, is not dropped.

Security: the generated source is assembled only from the fixed templates in this
module, filled with integers (variable indices, argument positions). No node or
state name, op string or constant from a spec ever enters the source: values are
called ``v0``, ``v1``, ..., ops are looked up in :data:`ELEMENTWISE_TEMPLATES` (a
spec op that is not a key there cannot be compiled), constants live only in
parameter initialisation, and the code is compiled with a namespace that holds the
few torch functions the templates name and nothing else (no builtins).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from cellsearch.spec import INPUT, SCALE, CellSpec

__all__ = ["LayerPlan", "VectorSlot", "build_plan", "compile_plan", "block_layer_norm", "PROJECTED_INPUT",
           "ELEMENTWISE_TEMPLATES", "SOURCE_NAMES", "LAYER_NORM_EPS"]

#: Internal name of the learned input projection ``input_size -> hidden_size`` used by the
#: first layer's non-linear reads of ``x``; the ``:`` makes it impossible as a spec name.
PROJECTED_INPUT = "x:projected"

#: The only way an op reaches generated code: a whitelisted template with positional holes.
ELEMENTWISE_TEMPLATES = {
    "tanh": "tanh({0})",
    "sigmoid": "sigmoid({0})",
    "relu": "relu({0})",
    "add": "add({0}, {1})",
    "sub": "sub({0}, {1})",
    "mul": "mul({0}, {1})",
    "one_minus": "one_minus({0})",
}
#: A ``scale`` node: its operand times its vector (``u`` local or ``b[k]``, filled in by the plan).
SCALE_TEMPLATE = "mul({0}, {1})"
#: Layer normalisation's epsilon (PyTorch's default for ``nn.LayerNorm``).
LAYER_NORM_EPS = 1e-5
#: Fused forms of common patterns (see :func:`_combine_elementwise`).
COMBINED_TEMPLATES = {"lerp": "lerp({0}, {1}, {2})", "addcmul": "addcmul({0}, {1}, {2})"}
_ACTIVATION_RANK = {"sigmoid": 0, "tanh": 1, "relu": 2}  # column-block order inside a step group

def one_minus(values: torch.Tensor) -> torch.Tensor:
    """``1 - values`` (a function, so that no number but an integer index ever appears in generated source)."""
    return torch.rsub(values, 1)


def block_layer_norm(values: torch.Tensor, hidden: int, gain: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Layer normalisation of every ``hidden``-wide column block of ``values`` (one linear node each).

    ``values`` is ``(..., rows, blocks * hidden)``; each block of each row is normalised to mean 0 and
    variance 1 (biased variance, epsilon :data:`LAYER_NORM_EPS`), then multiplied by ``gain`` and shifted
    by ``shift`` (both ``blocks * hidden`` wide, broadcast over rows).
    """
    blocks = values.unflatten(-1, (-1, hidden))
    normed = torch.nn.functional.layer_norm(blocks, (hidden,), eps=LAYER_NORM_EPS).flatten(-2)
    return torch.addcmul(shift, normed, gain)


#: The namespace the generated code runs in: every free name the templates use.
_NAMESPACE = {
    "__builtins__": {},
    "zip": zip,
    "addmm": torch.addmm,
    "cat": torch.cat,
    "stack": torch.stack,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "one_minus": one_minus,
    "norm": block_layer_norm,
    "lerp": torch.lerp,
    "addcmul": torch.addcmul,
}
#: Every identifier that may appear in generated source besides indexed locals (``v12``, ``g3``...).
SOURCE_NAMES = frozenset(_NAMESPACE) | frozenset(
    {
        "def", "for", "in", "return", "layer",
        "x", "states", "w", "b", "sz", "hidden", "time_dim", "record", "lead", "rows", "outs",
        "detach", "reshape", "shape", "unsafe_split", "unsafe_split_with_sizes", "unbind", "expand", "append",
    }
)


@dataclass(frozen=True)
class LinearSlot:
    """One column block of a concatenated matrix: ``node``'s matrix for ``operand`` (spec names)."""

    node: str
    operand: str


@dataclass(frozen=True)
class VectorSlot:
    """One ``hidden``-wide block of a vector argument ``b[k]``: ``param`` of ``node``.

    ``param``: ``bias`` (a linear node's bias), ``scale`` (a scale node's vector), ``gain`` (a linear
    node's layer-norm gain), ``zero`` (zeros in place of a bias that layer normalisation adds after
    normalising) or ``mask`` (the per-sequence dropout mask of the state ``node``, not a parameter).
    """

    node: str
    param: str


@dataclass(frozen=True)
class LayerPlan:
    """What a compiled layer needs besides its source: how to assemble weights, biases and split sizes.

    ``weights[k]`` lists, for the k-th concatenated matrix ``w[k]``, the ``(node, operand)`` matrices
    stacked along the output dimension (the module passes ``cat(...).t()``). ``vectors[k]`` lists the
    blocks (:class:`VectorSlot`) that make ``b[k]``, concatenated. ``split_units[k]`` are block widths
    in units of ``hidden_size``.
    ``source`` is the generated function (for inspection and the tests).
    """

    source: str
    weights: tuple[tuple[LinearSlot, ...], ...]
    vectors: tuple[tuple[VectorSlot, ...], ...]
    split_units: tuple[tuple[int, ...], ...]
    step_groups: int
    hoisted_groups: int
    projects_input: bool
    layer_norm: bool = False
    state_mask: bool = False


@dataclass
class _Group:
    stage: int
    operands: tuple[str, ...]  # resolved values, one per matrix slot
    columns: list[str]  # linear nodes in column order
    slots: dict[str, tuple[str, ...]]  # node -> its spec operand name for each slot


class _Emitter:
    """Accumulates generated lines; only ever formats integers and fixed templates."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.weights: list[tuple[LinearSlot, ...]] = []
        self.vectors: list[tuple[VectorSlot, ...]] = []
        self.splits: list[tuple[int, ...]] = []

    def line(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def weight(self, slots: tuple[LinearSlot, ...]) -> int:
        self.weights.append(slots)
        return len(self.weights) - 1

    def vector(self, slots: tuple[VectorSlot, ...]) -> int:
        self.vectors.append(slots)
        return len(self.vectors) - 1

    def split(self, units: tuple[int, ...]) -> int:
        self.splits.append(units)
        return len(self.splits) - 1


def _rewrite(spec: CellSpec, project_input: bool) -> tuple[dict, dict[str, str], list[str]]:
    """The cell as ``name -> (op, operands)`` with identity nodes folded away.

    With ``project_input`` every non-linear read of ``x`` reads :data:`PROJECTED_INPUT` (a linear
    node over the raw input) instead, while linear nodes keep reading the raw input with their own
    ``(hidden, input_size)`` matrices; an identity of ``x`` counts as a non-linear read. Returns the
    nodes (``name -> (op, resolved operands, spec operand names)``), the resolved output of every
    state, and the node order.
    """
    alias: dict[str, str] = {}

    def resolve(value: str) -> str:
        return alias.get(value, value)

    nodes: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
    order: list[str] = []
    uses_projection = False
    for name, node in spec.nodes.items():
        if node.op == "identity":
            target = resolve(node.inputs[0])
            if project_input and target == INPUT:
                # identity is a non-linear read: it passes on the hidden-width projection
                target = PROJECTED_INPUT
                uses_projection = True
            alias[name] = target
            continue
        resolved = tuple(resolve(i) for i in node.inputs)
        if project_input and node.op != "linear":
            uses_projection |= INPUT in resolved
            resolved = tuple(PROJECTED_INPUT if r == INPUT else r for r in resolved)
        # (op, resolved operands, spec operand names) -- the latter name the parameters.
        nodes[name] = (node.op, resolved, node.inputs)
        order.append(name)
    outputs = {}
    for state in spec.states:
        target = resolve(spec.outputs[state])
        if project_input and target == INPUT:
            target = PROJECTED_INPUT
            uses_projection = True
        outputs[state] = target
    if uses_projection:
        nodes = {PROJECTED_INPUT: ("linear", (INPUT,), (INPUT,)), **nodes}
        order.insert(0, PROJECTED_INPUT)
    return nodes, outputs, order


def build_plan(spec: CellSpec, project_input: bool, layer_norm: bool = False, state_mask: bool = False) -> LayerPlan:
    """Plan and generate one layer of ``spec``.

    ``project_input`` is true for a first layer whose input width differs from the hidden width;
    ``layer_norm`` normalises every linear node's output; ``state_mask`` multiplies the linear
    nodes' reads of the first state by a mask (see the module doc).
    """
    nodes, outputs, order = _rewrite(spec, project_input)
    # bias in the sums, or zeros with the bias added after layer normalisation
    pre_norm = "zero" if layer_norm else "bias"

    def biases(names) -> tuple[VectorSlot, ...]:
        # the input projection is not a node of the cell and is never normalised
        return tuple(VectorSlot(n, "bias" if n == PROJECTED_INPUT else pre_norm) for n in names)

    def norm_vectors(names) -> tuple[int, int]:
        return (emit.vector(tuple(VectorSlot(n, "gain") for n in names)),
                emit.vector(tuple(VectorSlot(n, "bias") for n in names)))

    scale_vector: dict[str, int] = {}  # scale node -> index of its vector in b
    position = {value: i for i, value in enumerate((INPUT, *spec.states, *order))}
    variable = {value: f"v{i}" for value, i in position.items()}

    def by_position(value: str) -> int:
        return position[value]

    hoisted = {INPUT}
    for name in order:
        if all(o in hoisted for o in nodes[name][1]):
            hoisted.add(name)
    users: dict[str, list[str]] = {v: [] for v in position}
    for name in order:
        for operand in nodes[name][1]:
            users[operand].append(name)
    output_values = set(outputs.values())

    # ---- step part: stages and groups
    stage = {value: 0 for value in (*spec.states, *hoisted)}
    step_groups: dict[tuple, _Group] = {}
    node_group: dict[str, _Group] = {}
    hoisted_slots: dict[str, tuple[tuple[str, str], ...]] = {}  # mixed linear node -> ((resolved, spec operand), ...)
    for name in order:
        if name in hoisted:
            continue
        op, resolved, spec_operands = nodes[name]
        if op != "linear":
            stage[name] = max(stage[o] for o in resolved)
            continue
        pairs = sorted(zip(resolved, spec_operands), key=lambda p: (by_position(p[0]), p[1]))
        step_pairs = tuple(p for p in pairs if p[0] not in hoisted)
        hoisted_slots[name] = tuple(p for p in pairs if p[0] in hoisted)
        matmul_stage = max(stage[o] for o, _ in step_pairs)
        stage[name] = matmul_stage + 1
        key = (matmul_stage, tuple(o for o, _ in step_pairs))
        group = step_groups.setdefault(key, _Group(matmul_stage, key[1], [], {}))
        group.columns.append(name)
        group.slots[name] = tuple(s for _, s in step_pairs)
        node_group[name] = group

    # Column order: nodes read by the same activation side by side, so that one call covers them.
    fused: dict[str, str] = {}  # linear node -> the activation node computed on its column block
    for name in node_group:
        for user in users[name]:
            if nodes[user][0] in _ACTIVATION_RANK and user not in hoisted:
                fused[name] = user
                break

    def column_rank(name: str) -> tuple[int, int]:
        activation = nodes[fused[name]][0] if name in fused else None
        return (_ACTIVATION_RANK.get(activation, len(_ACTIVATION_RANK)), by_position(name))

    groups = sorted(step_groups.values(), key=lambda g: (g.stage, by_position(g.columns[0])))
    for group in groups:
        group.columns.sort(key=column_rank)

    # ---- hoisted part: stages, then groups of projections of the same x-only operands
    hoisted_stage = {INPUT: 0}
    for name in order:
        if name in hoisted:
            op, resolved, _ = nodes[name]
            base = max(hoisted_stage[o] for o in resolved)
            hoisted_stage[name] = base + 1 if op == "linear" else base
    # runs: consecutive columns of a step group that take their carrier from the same hoisted group
    carrier_runs: list[list[tuple[tuple | None, list[str]]]] = []
    hoisted_groups: dict[tuple, list[tuple[str, object]]] = {}  # key -> segments
    hoisted_slot_names: dict[tuple, dict[str, tuple[str, ...]]] = {}
    for index, group in enumerate(groups):
        runs: list[tuple[tuple | None, list[str]]] = []
        for name in group.columns:
            pairs = hoisted_slots[name]
            key = (max(hoisted_stage[o] for o, _ in pairs), tuple(o for o, _ in pairs)) if pairs else None
            if runs and runs[-1][0] == key:
                runs[-1][1].append(name)
            else:
                runs.append((key, [name]))
            if key is not None:
                hoisted_slot_names.setdefault(key, {})[name] = tuple(s for _, s in pairs)
        for run_index, (key, names) in enumerate(runs):
            if key is not None:
                hoisted_groups.setdefault(key, []).append(("run", (index, run_index)))
        carrier_runs.append(runs)
    for name in order:
        if name in hoisted and nodes[name][0] == "linear":
            _, resolved, spec_operands = nodes[name]
            pairs = sorted(zip(resolved, spec_operands), key=lambda p: (by_position(p[0]), p[1]))
            key = (max(hoisted_stage[o] for o, _ in pairs), tuple(o for o, _ in pairs))
            hoisted_groups.setdefault(key, []).append(("node", name))
            hoisted_slot_names.setdefault(key, {})[name] = tuple(s for _, s in pairs)

    emit = _Emitter()
    emit.line(0, "def layer(x, states, w, b, sz, hidden, time_dim, record):")
    emit.line(1, "lead = x.shape[:-1]")
    emit.line(1, f"{variable[INPUT]} = x.reshape(-1, x.shape[-1])")
    emit.line(1, f"rows = {variable[INPUT]}.shape[0]")

    # hoisted emission, stage by stage
    segment_variable: dict[tuple[int, int], str] = {}
    hoisted_keys = sorted(hoisted_groups, key=lambda k: (k[0], min(by_position(o) for o in k[1])))
    max_hoisted_stage = max(hoisted_stage.values())
    emitted = {INPUT}
    for current in range(max_hoisted_stage + 1):
        for name in order:
            if (name in hoisted and name not in emitted and nodes[name][0] != "linear"
                    and hoisted_stage[name] == current):
                op, resolved, _ = nodes[name]
                if op == SCALE:
                    scale_vector[name] = emit.vector((VectorSlot(name, "scale"),))
                    text = SCALE_TEMPLATE.format(variable[resolved[0]], f"b[{scale_vector[name]}]")
                else:
                    text = ELEMENTWISE_TEMPLATES[op].format(*(variable[o] for o in resolved))
                emit.line(1, f"{variable[name]} = " + text)
                emitted.add(name)
        for number, key in enumerate(hoisted_keys):
            if key[0] != current:
                continue
            segments = hoisted_groups[key]
            columns: list[str] = []
            units: list[int] = []
            targets: list[str] = []
            normalised: list[str] = []  # whole hoisted linear nodes, normalised after the split
            for kind, item in segments:
                if kind == "run":
                    names = carrier_runs[item[0]][item[1]][1]
                    columns += names
                    units.append(len(names))
                    targets.append(f"s{item[0]}_{item[1]}")
                    segment_variable[item] = targets[-1]
                else:
                    columns.append(item)
                    units.append(1)
                    # a raw name first: the table rewrite gathers every hoisted name once
                    if layer_norm and item != PROJECTED_INPUT:
                        targets.append(f"n{position[item]}")
                        normalised.append(item)
                    else:
                        targets.append(variable[item])
                    emitted.add(item)
            slot_names = hoisted_slot_names[key]
            result = f"h{number}"
            bias = emit.vector(biases(columns))
            for slot, operand in enumerate(key[1]):
                weight = emit.weight(tuple(LinearSlot(n, slot_names[n][slot]) for n in columns))
                added = f"b[{bias}]" if slot == 0 else result
                emit.line(1, f"{result} = addmm({added}, {variable[operand]}, w[{weight}])")
            if len(targets) == 1:
                emit.line(1, f"{targets[0]} = {result}")
            else:
                emit.line(1, f"{', '.join(targets)} = "
                          f"{result}.unsafe_split_with_sizes(sz[{emit.split(tuple(units))}], 1)")
            for item in normalised:
                gain, shift = norm_vectors((item,))
                emit.line(1, f"{variable[item]} = norm(n{position[item]}, hidden, b[{gain}], b[{shift}])")

    # carriers: the x part plus bias of each step group, as one (rows, width) tensor per group
    operand_lists: list[list[str]] = []
    for index, (group, runs) in enumerate(zip(groups, carrier_runs)):
        pieces = []
        for run_index, (key, names) in enumerate(runs):
            if key is None:
                pieces.append(f"b[{emit.vector(biases(names))}].expand(rows, -1)")
            else:
                pieces.append(segment_variable[(index, run_index)])
        carrier = pieces[0] if len(pieces) == 1 else f"cat(({', '.join(pieces)}), 1)"
        lists = [f"o{index}_{slot}" for slot in range(len(group.operands))]
        operand_lists.append(lists)
        weights = [emit.weight(tuple(LinearSlot(n, group.slots[n][slot]) for n in group.columns))
                   for slot in range(len(group.operands))]
        emit.line(1, f"{', '.join(lists)} = {', '.join('[]' for _ in lists)}")
        emit.line(
            1,
            f"c{index}, ({''.join(f'k{index}_{slot}, ' for slot in range(len(weights)))}) = "
            f"record({carrier}, ({''.join(f'{name}, ' for name in lists)}), ({''.join(f'w[{k}], ' for k in weights)}))",
        )
        emit.line(1, f"c{index} = c{index}.reshape(lead + (-1,)).unbind(time_dim)")

    # hoisted values that the step part reads directly, as per-step sequences
    step_reads = set()
    for name in order:
        if name not in hoisted and nodes[name][0] != "linear":
            step_reads |= {o for o in nodes[name][1] if o in hoisted}
    step_reads |= {v for v in output_values if v in hoisted}
    sequences = sorted(step_reads, key=by_position)
    for value in sequences:
        source = "x" if value == INPUT else f"{variable[value]}.reshape(lead + (-1,))"
        emit.line(1, f"q{position[value]} = {source}.unbind(time_dim)")

    state_variables = [variable[s] for s in spec.states]
    emit.line(1, f"{''.join(v + ', ' for v in state_variables)}= states")
    emit.line(1, "outs = []")
    # vectors the loop reads, bound to locals before it (inserted here once the loop is written)
    bindings_at = len(emit.lines)
    loop_vectors: list[int] = []

    def loop_vector(slots: tuple[VectorSlot, ...]) -> str:
        loop_vectors.append(emit.vector(slots))
        return f"u{loop_vectors[-1]}"

    masked = spec.states[0]
    reads = dict(variable)  # what a linear node's matrix reads for each value
    if state_mask and any(masked in group.operands for group in groups):
        reads[masked] = f"r{position[masked]}"
    loop_variables = [f"e{i}" for i in range(len(groups))] + [variable[v] for v in sequences]
    loop_sequences = [f"c{i}" for i in range(len(groups))] + [f"q{position[v]}" for v in sequences]
    if not loop_sequences:  # a live cell always reads x inside the step; CellSpec guarantees it
        raise AssertionError("cell has no per-step input")
    emit.line(1, f"for {''.join(v + ', ' for v in loop_variables)}in zip({', '.join(loop_sequences)}):")
    if reads[masked] != variable[masked]:
        emit.line(2, f"{reads[masked]} = mul({variable[masked]}, {loop_vector((VectorSlot(masked, 'mask'),))})")

    combined, absorbed = _combine_elementwise(nodes, order, hoisted, users, output_values)
    done = set(spec.states) | hoisted | absorbed
    max_stage = max(stage.values())
    for current in range(max_stage + 1):
        for name in order:
            if name in done or nodes[name][0] == "linear" or stage[name] != current:
                continue
            if name in combined:
                template, operands = combined[name]
                text = template.format(*(variable[o] for o in operands))
            elif nodes[name][0] == SCALE:
                vector = loop_vector((VectorSlot(name, "scale"),))
                text = SCALE_TEMPLATE.format(variable[nodes[name][1][0]], vector)
            else:
                text = ELEMENTWISE_TEMPLATES[nodes[name][0]].format(*(variable[o] for o in nodes[name][1]))
            emit.line(2, f"{variable[name]} = " + text)
            done.add(name)
        for index, group in enumerate(groups):
            if group.stage != current:
                continue
            for slot, operand in enumerate(group.operands):
                # detached: the lists live on the deferred-gradient node; graph tensors would make a cycle
                emit.line(2, f"{operand_lists[index][slot]}.append({reads[operand]}.detach())")
                added = f"e{index}" if slot == 0 else f"g{index}"
                emit.line(2, f"g{index} = addmm({added}, {reads[operand]}, k{index}_{slot})")
            if layer_norm:
                gain = loop_vector(tuple(VectorSlot(n, "gain") for n in group.columns))
                shift = loop_vector(tuple(VectorSlot(n, "bias") for n in group.columns))
                emit.line(2, f"g{index} = norm(g{index}, hidden, {gain}, {shift})")
            # blocks: one per activation kind, in column order
            blocks: list[tuple[str | None, list[str]]] = []
            for name in group.columns:
                activation = nodes[fused[name]][0] if name in fused else None
                if blocks and blocks[-1][0] == activation:
                    blocks[-1][1].append(name)
                else:
                    blocks.append((activation, [name]))
            block_variables = [f"g{index}"] if len(blocks) == 1 else [f"g{index}_{i}" for i in range(len(blocks))]
            if len(blocks) > 1:
                units = emit.split(tuple(len(names) for _, names in blocks))
                emit.line(2, f"{', '.join(block_variables)} = g{index}.unsafe_split_with_sizes(sz[{units}], 1)")
            for block_variable, (activation, names) in zip(block_variables, blocks):
                raw_needed = [n for n in names if n in output_values or any(u != fused.get(n) for u in users[n])]
                if raw_needed:
                    _bind(emit, block_variable, [variable[n] for n in names])
                done.update(names)
                if activation is not None:
                    activated = f"a{block_variable[1:]}"
                    emit.line(2, f"{activated} = " + ELEMENTWISE_TEMPLATES[activation].format(block_variable))
                    _bind(emit, activated, [variable[fused[n]] for n in names])
                    done.update(fused[n] for n in names)
    new_states = [variable[outputs[s]] for s in spec.states]
    emit.line(2, f"{''.join(v + ', ' for v in state_variables)}= {''.join(v + ', ' for v in new_states)}")
    emit.line(2, f"outs.append({state_variables[0]})")
    emit.line(1, f"return stack(outs, time_dim), ({''.join(v + ', ' for v in state_variables)})")
    emit.lines[bindings_at:bindings_at] = [f"    u{k} = b[{k}]" for k in loop_vectors]
    return LayerPlan(
        source="\n".join(emit.lines) + "\n",
        weights=tuple(emit.weights),
        vectors=tuple(emit.vectors),
        split_units=tuple(emit.splits),
        step_groups=len(groups),
        hoisted_groups=len(hoisted_groups),
        projects_input=PROJECTED_INPUT in nodes,
        layer_norm=layer_norm,
        state_mask=reads[masked] != variable[masked],
    )


def _combine_elementwise(nodes: dict, order: list[str], hoisted: set[str], users: dict, output_values: set[str]):
    """Fewer ops per step: ``p + z*(q - p)`` becomes ``lerp(p, q, z)`` and ``p + u*v`` becomes ``addcmul``.

    Only intermediate values read once (by the pattern) and not a state's output are absorbed.
    Returns ``node -> (template, operands)`` for the combined nodes and the set of absorbed nodes.
    """

    def single_use(value: str, op: str, user: str) -> bool:
        return (
            value in nodes
            and value not in hoisted
            and nodes[value][0] == op
            and users[value] == [user]
            and value not in output_values
        )

    combined: dict[str, tuple[str, tuple[str, ...]]] = {}
    absorbed: set[str] = set()
    for name in order:
        op, operands, _ = nodes[name]
        if name in hoisted or op != "add":
            continue
        for base, product in (operands, operands[::-1]):
            if product in absorbed or base in absorbed or not single_use(product, "mul", name):
                continue
            factors = nodes[product][1]
            for weight, difference in (factors, factors[::-1]):
                if (single_use(difference, "sub", product) and nodes[difference][1][1] == base
                        and difference not in absorbed):
                    combined[name] = (COMBINED_TEMPLATES["lerp"], (base, nodes[difference][1][0], weight))
                    absorbed |= {product, difference}
                    break
            else:
                combined[name] = (COMBINED_TEMPLATES["addcmul"], (base, *factors))
                absorbed.add(product)
            break
    return combined, absorbed


def _bind(emit: _Emitter, block: str, targets: list[str]) -> None:
    """Name each ``hidden``-wide column slice of ``block``."""
    if len(targets) == 1:
        emit.line(2, f"{targets[0]} = {block}")
    else:
        emit.line(2, f"{', '.join(targets)} = {block}.unsafe_split(hidden, 1)")


@lru_cache(maxsize=512)
def compile_source(source: str) -> Callable:
    """Compile generated source (never spec text) in a namespace of whitelisted torch functions."""
    namespace = dict(_NAMESPACE)
    code = compile(source, "<cellsearch compiled cell>", "exec")
    exec(code, namespace)  # noqa: S102 -- source comes only from this module's templates
    return namespace["layer"]


def compile_plan(plan: LayerPlan) -> Callable:
    return compile_source(plan.source)
