"""The cell description: one plain, immutable value that every layer passes around.

A :class:`CellSpec` is a directed acyclic graph over named *inputs* (``x``, the
input at step t, and the previous value of every state, e.g. ``h`` and ``c``)
and named *nodes*, each an operation on earlier values. ``outputs`` maps every
state to the value that becomes its next value; the first state is the layer's
output. The description holds no framework code: the compiler
(:mod:`cellsearch.compiler`) turns it into a PyTorch module.

Operations (see :data:`OPS`):

``linear``
    one or more distinct operands; a learned square matrix per operand, summed,
    plus one learned bias. Carries two initialisation constants: ``bias`` (the
    bias init) and ``diag`` (added to the diagonal of every matrix at init). The
    paper's ``Linear(a, v)`` is ``linear`` over one operand with ``diag = a``.
``tanh``, ``sigmoid``, ``relu``, ``identity``
    elementwise activations of one operand.
``add``, ``mul``
    elementwise sum / product of two operands (commutative).
``sub``
    elementwise difference ``a - b`` of two operands (ordered).
``scale``
    one operand times a learned per-unit weight vector, elementwise (``p * v``; no
    bias): the peephole of Gers & Schmidhuber's LSTM, ``p_i * c`` in the input
    gate. Its vector counts in :meth:`CellSpec.parameter_count`.
``one_minus``
    ``1 - v`` of one operand, without a learned weight (the coupled gate of
    Greff et al.'s CIFG variant, ``f = 1 - i``).

Construction validates and normalises: names must be ASCII identifiers, the
graph acyclic, every op has the right arity, every output is defined, nodes
that reach no output are pruned, and afterwards ``x`` and every state must be
read somewhere. Any violation raises :class:`CellSpecError` naming the node and
the rule, whatever the input (wrong types, unhashable or deeply nested values,
YAML alias bombs: messages show bounded excerpts). Nothing in a spec is ever
evaluated as code. ``name`` is a display label: one line of printable text.

Identity: :attr:`CellSpec.hash` is a canonical SHA-256 of the graph that does
not change when nodes are renamed or when the operands of commutative ops
(``add``, ``mul`` and the operands of a ``linear``) are reordered, and changes
when anything else does. State names do not enter the hash either; states are
identified by position (the first is the output). The serialisation writes each
node as ``op[constants](operands)``, so the ops added later (``scale``,
``one_minus``) appear only in the serialisation of cells that use them: every
cell written with the original ops keeps the hash it always had (the format
version in the hashed text stays 1).

The module is kept whole, above the project's usual length: validation,
normalisation (pruning, the topological order) and the canonical hash are one
contract. The hash is computed once, at construction, from the validated and
pruned graph and its order, and what it ignores is exactly what the rules above
define as the same cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import networkx as nx

from cellsearch import render
from cellsearch.errors import shown

__all__ = [
    "OPS",
    "ACTIVATIONS",
    "ELEMENTWISE",
    "SCALE",
    "ONE_MINUS",
    "LEARNED",
    "INPUT",
    "CellSpec",
    "CellSpecError",
    "Node",
    "MAX_NODES",
]

INPUT = "x"
ACTIVATIONS = ("tanh", "sigmoid", "relu", "identity")
ELEMENTWISE = ("add", "sub", "mul")
#: The learned per-unit weight (a peephole): ``p * v``.
SCALE = "scale"
#: ``1 - v``, no weight.
ONE_MINUS = "one_minus"
COMMUTATIVE = frozenset({"add", "mul", "linear"})
OPS = ("linear",) + ACTIVATIONS + ELEMENTWISE + (SCALE, ONE_MINUS)
#: Ops with learned parameters (the compiler gives each node of these its own module).
LEARNED = frozenset({"linear", SCALE})
#: op -> (minimum operands, maximum operands); None = unbounded
ARITY: Mapping[str, tuple[int, int | None]] = MappingProxyType(
    {"linear": (1, None), **{a: (1, 1) for a in ACTIVATIONS}, **{e: (2, 2) for e in ELEMENTWISE},
     SCALE: (1, 1), ONE_MINUS: (1, 1)}
)
#: Hard cap that protects every layer from hostile or runaway graphs; the mutation
#: engine has its own, much smaller, configurable size limit.
MAX_NODES = 500
MAX_STATES = 8
#: Init constants outside this range make no sense for a recurrent cell and only
#: serve to produce overflow.
MAX_CONSTANT = 100.0
#: A cell's display label: printed by ``show``, written into reports and retrain tables.
MAX_LABEL = 128
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_FORMAT_VERSION = 1


class CellSpecError(ValueError):
    """A cell description broke a rule; the message names the node and the rule."""


@dataclass(frozen=True)
class Node:
    """One operation of a cell. ``bias`` and ``diag`` only mean something for ``linear``."""

    op: str
    inputs: tuple[str, ...]
    bias: float = 0.0
    diag: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "inputs": list(self.inputs)}
        if self.op == "linear":
            if self.bias != 0.0:
                out["bias"] = self.bias
            if self.diag != 0.0:
                out["diag"] = self.diag
        return out


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CellSpecError(
            f"{what} {shown(name)}: names must be ASCII identifiers "
            "(letter or underscore, then letters, digits, underscores; at most 64 characters)"
        )
    return name


def _check_constant(value: Any, node: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CellSpecError(f"node {node!r}: {key} must be a number, got {type(value).__name__}")
    if abs(value) <= MAX_CONSTANT:  # False for NaN; exact for integers of any size
        return float(value)
    raise CellSpecError(f"node {node!r}: {key} must be finite and within +-{MAX_CONSTANT:g}, got {shown(value)}")


def _keys(keys: Iterable[Any]) -> str:
    """Unknown keys for a message: a few, bounded, sorted by their text."""
    texts = sorted(shown(key, 40) for key in itertools.islice(keys, 20))
    return "[" + ", ".join(texts[:5]) + (", ...]" if len(texts) > 5 else "]")


def _make_node(name: str, raw: Any) -> Node:
    if isinstance(raw, Node):
        # Fast path for nodes taken from another spec (the mutation engine's case): same rules,
        # without the round trip through plain data.
        if raw.op in ARITY and isinstance(raw.inputs, tuple) and all(
            type(i) is str and _NAME.fullmatch(i) for i in raw.inputs
        ):
            low, high = ARITY[raw.op]
            if low <= len(raw.inputs) and (high is None or len(raw.inputs) <= high) and (
                raw.op != "linear" or len(set(raw.inputs)) == len(raw.inputs)
            ) and (raw.op == "linear" or (raw.bias == 0.0 and raw.diag == 0.0)) and all(
                type(v) is float and math.isfinite(v) and abs(v) <= MAX_CONSTANT for v in (raw.bias, raw.diag)
            ):
                return raw
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise CellSpecError(f"node {name!r}: expected a mapping with 'op' and 'inputs', got {type(raw).__name__}")
    unknown = set(raw) - {"op", "inputs", "bias", "diag"}
    if unknown:
        raise CellSpecError(f"node {name!r}: unknown key(s) {_keys(unknown)}; allowed: op, inputs, bias, diag")
    op = raw.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise CellSpecError(f"node {name!r}: unknown op {shown(op, 40)}; allowed ops: {', '.join(OPS)}")
    inputs = raw.get("inputs")
    if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)):
        raise CellSpecError(f"node {name!r}: 'inputs' must be a list of names")
    inputs = tuple(_check_name(i, f"node {name!r}: operand") for i in inputs)
    low, high = ARITY[op]
    if len(inputs) < low or (high is not None and len(inputs) > high):
        want = f"exactly {low}" if low == high else f"at least {low}"
        raise CellSpecError(f"node {name!r}: op {op!r} takes {want} operand(s), got {len(inputs)}")
    if op == "linear" and len(set(inputs)) != len(inputs):
        raise CellSpecError(f"node {name!r}: a linear node's operands must be distinct, got {shown(list(inputs))}")
    bias, diag = 0.0, 0.0
    if op == "linear":
        bias = _check_constant(raw.get("bias", 0.0), name, "bias")
        diag = _check_constant(raw.get("diag", 0.0), name, "diag")
    elif "bias" in raw or "diag" in raw:
        raise CellSpecError(f"node {name!r}: only linear nodes take 'bias' and 'diag' constants")
    return Node(op=op, inputs=inputs, bias=bias, diag=diag)


@dataclass(frozen=True, eq=False)
class CellSpec:
    """An immutable, validated recurrent cell description.

    Build it with ``CellSpec(states=..., nodes=..., outputs=...)`` or
    :meth:`from_dict`; equality and hashing use the canonical :attr:`hash`.
    ``name`` is a label for display and does not enter the hash.
    """

    states: tuple[str, ...]
    nodes: Mapping[str, Node]
    outputs: Mapping[str, str]
    name: str | None = None
    _order: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _hash: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        states = self.states
        if isinstance(states, str) or not isinstance(states, (list, tuple)) or not states:
            raise CellSpecError("'states' must be a non-empty list of state names (the first is the output)")
        if len(states) > MAX_STATES:
            raise CellSpecError(f"a cell has at most {MAX_STATES} states, got {len(states)}")
        states = tuple(_check_name(s, "state") for s in states)
        if INPUT in states:
            raise CellSpecError(f"state {INPUT!r}: the name is reserved for the input")
        if len(set(states)) != len(states):
            raise CellSpecError(f"states must be distinct, got {list(states)}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.isprintable()
                                      or not 0 < len(self.name) <= MAX_LABEL):
            raise CellSpecError(f"'name' must be one line of at most {MAX_LABEL} printable characters, "
                                f"got {shown(self.name)}")
        if not isinstance(self.nodes, Mapping):
            raise CellSpecError("'nodes' must be a mapping of node name to {op, inputs}")
        if len(self.nodes) > MAX_NODES:
            raise CellSpecError(f"a cell has at most {MAX_NODES} nodes, got {len(self.nodes)}")
        inputs = (INPUT,) + states
        nodes: dict[str, Node] = {}
        for name, raw in self.nodes.items():
            _check_name(name, "node")
            if name in inputs:
                raise CellSpecError(f"node {name!r}: the name is taken by an input (x or a state)")
            nodes[name] = _make_node(name, raw)
        for name, node in nodes.items():
            for operand in node.inputs:
                if operand not in nodes and operand not in inputs:
                    raise CellSpecError(f"node {name!r}: operand {operand!r} is neither a node nor an input")
        if not isinstance(self.outputs, Mapping):
            raise CellSpecError("'outputs' must map every state to the node holding its next value")
        outputs: dict[str, str] = {}
        for state in self.outputs:
            if state not in states:
                raise CellSpecError(f"output {shown(state)}: not a state of this cell (states: {list(states)})")
        for state in states:
            if state not in self.outputs:
                raise CellSpecError(f"state {state!r}: no output gives its next value")
            target = self.outputs[state]
            if not isinstance(target, str) or (target not in nodes and target not in inputs):
                raise CellSpecError(f"output {state!r}: {shown(target)} is neither a node nor an input")
            outputs[state] = target

        graph = nx.DiGraph()
        graph.add_nodes_from(inputs)
        graph.add_nodes_from(nodes)
        graph.add_edges_from((operand, name) for name, node in nodes.items() for operand in node.inputs)
        # Deterministic topological order (ties by name) gives a stable file layout; the sort
        # also detects cycles. Dead nodes never delay a live one (a live node's ancestors are
        # all live), so filtering the full order gives the order of the pruned graph.
        try:
            full_order = list(nx.lexicographical_topological_sort(graph))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(graph)
            raise CellSpecError(
                f"node {cycle[0][1]!r}: the graph has a cycle ({' -> '.join(e[0] for e in cycle)} -> {cycle[0][0]})"
            ) from None
        # Pruning: a node that reaches no output computes nothing the cell returns.
        # A sink fed by every output finds all live values in one traversal.
        sink = ("outputs",)  # a tuple can never clash with a (string) value name
        graph.add_edges_from((target, sink) for target in outputs.values())
        live = nx.ancestors(graph, sink)
        for name in inputs:
            if name not in live:
                what = "the input" if name == INPUT else "state"
                raise CellSpecError(f"{what} {name!r} is never read by a node that reaches an output")
        order = tuple(n for n in full_order if n in live and n in nodes)
        object.__setattr__(self, "states", states)
        object.__setattr__(self, "nodes", MappingProxyType({n: nodes[n] for n in order}))
        object.__setattr__(self, "outputs", MappingProxyType(outputs))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_hash", _canonical_hash(self))

    # ------------------------------------------------------------------ identity
    @property
    def hash(self) -> str:
        """Canonical SHA-256 hex digest; the cell's identity everywhere."""
        return self._hash

    @property
    def short_hash(self) -> str:
        return self._hash[:12]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CellSpec) and other._hash == self._hash

    def __hash__(self) -> int:
        return hash(self._hash)

    def __reduce__(self):
        # Read-only mappings do not pickle; the plain-data form does, and rebuilding
        # re-validates, so a spec shipped to a worker is as trustworthy as one built locally.
        return (CellSpec.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return f"CellSpec({label}{len(self.nodes)} nodes, states={list(self.states)}, hash={self.short_hash})"

    # ------------------------------------------------------------------ structure
    @property
    def inputs(self) -> tuple[str, ...]:
        """The cell's inputs: ``x`` then the previous value of every state."""
        return (INPUT,) + self.states

    @property
    def order(self) -> tuple[str, ...]:
        """Node names in a deterministic topological order."""
        return self._order

    @property
    def output(self) -> str:
        """The state the layer emits (the first state)."""
        return self.states[0]

    def users(self, name: str) -> tuple[str, ...]:
        """Nodes that read ``name`` as an operand."""
        return tuple(n for n, node in self.nodes.items() if name in node.inputs)

    def ancestors(self, name: str) -> frozenset[str]:
        """Every value (inputs included) that ``name`` depends on."""
        return frozenset(nx.ancestors(self.to_networkx(), name))

    def descendants(self, name: str) -> frozenset[str]:
        return frozenset(nx.descendants(self.to_networkx(), name))

    def parameter_count(self, hidden_size: int) -> int:
        """Learned parameters of one cell of width ``hidden_size`` (matrices, biases and ``scale`` vectors)."""
        total = 0
        for node in self.nodes.values():
            if node.op == "linear":
                total += len(node.inputs) * hidden_size * hidden_size + hidden_size
            elif node.op == SCALE:
                total += hidden_size
        return total

    def replace(self, **changes: Any) -> "CellSpec":
        """A new, validated spec with some fields changed (the original is untouched)."""
        fields = {"states": self.states, "nodes": dict(self.nodes), "outputs": dict(self.outputs), "name": self.name}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"unknown field(s) {sorted(unknown)}")
        fields.update(changes)
        return CellSpec(**fields)

    # ------------------------------------------------------------------ formats
    def to_dict(self) -> dict[str, Any]:
        """The plain-data form (the file format)."""
        out: dict[str, Any] = {"format": _FORMAT_VERSION}
        if self.name:
            out["name"] = self.name
        out["states"] = list(self.states)
        out["nodes"] = {n: node.to_dict() for n, node in self.nodes.items()}
        out["outputs"] = dict(self.outputs)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "CellSpec":
        if not isinstance(data, Mapping):
            raise CellSpecError(f"a cell description must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"format", "name", "states", "nodes", "outputs", "hash"}
        if unknown:
            raise CellSpecError(
                f"unknown top-level key(s) {_keys(unknown)}; allowed: format, name, states, nodes, outputs, hash"
            )
        version = data.get("format", _FORMAT_VERSION)
        # type() as well: True == 1.0 == 1, but only the integer 1 is format 1.
        if type(version) is not int or version != _FORMAT_VERSION:
            raise CellSpecError(
                f"unsupported cell format {shown(version)}; this version reads format {_FORMAT_VERSION}"
            )
        for key in ("states", "nodes", "outputs"):
            if key not in data:
                raise CellSpecError(f"missing top-level key {key!r}")
        spec = cls(states=data["states"], nodes=data["nodes"], outputs=data["outputs"], name=data.get("name"))
        expected = data.get("hash")
        if expected is not None and expected != spec.hash:
            raise CellSpecError(f"the file says hash {shown(expected)} but the cell it describes has hash {spec.hash}")
        return spec

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        """Write the cell as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            text = self.to_json() + "\n"
        elif suffix in (".yaml", ".yml"):
            text = self.to_yaml()
        else:
            raise CellSpecError(f"{path}: unknown cell file type {suffix!r}; use .json, .yaml or .yml")
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CellSpec":
        """Read a cell file written by :meth:`save` or by hand (JSON or YAML, safe loaders only).

        Files are read by :func:`cellsearch.config.read_data_file`: size-capped, safe
        loaders, duplicate keys refused; every problem is a one-line :class:`CellSpecError`.
        """
        from cellsearch.config import read_data_file

        path = Path(path)
        data = read_data_file(path, CellSpecError, "cell file")
        try:
            return cls.from_dict(data)
        except CellSpecError as error:
            raise CellSpecError(f"{path}: {error}") from None
        except RecursionError:
            raise CellSpecError(f"{path}: the description is nested too deeply") from None

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph: input nodes have ``op='input'``; edges carry ``positions`` (operand slots).

        Graph attributes: ``states``, ``outputs`` (state -> value) and ``name``.
        """
        graph = nx.DiGraph(states=list(self.states), outputs=dict(self.outputs), name=self.name)
        for name in self.inputs:
            graph.add_node(name, op="input")
        for name, node in self.nodes.items():
            graph.add_node(name, op=node.op, bias=node.bias, diag=node.diag)
        for name, node in self.nodes.items():
            for position, operand in enumerate(node.inputs):
                if graph.has_edge(operand, name):
                    graph.edges[operand, name]["positions"].append(position)
                else:
                    graph.add_edge(operand, name, positions=[position])
        return graph

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph) -> "CellSpec":
        """Inverse of :meth:`to_networkx`."""
        states = graph.graph.get("states")
        outputs = graph.graph.get("outputs")
        nodes: dict[str, dict[str, Any]] = {}
        for name, attrs in graph.nodes(data=True):
            if attrs.get("op") == "input":
                continue
            slots: dict[int, str] = {}
            for operand, _, edge in graph.in_edges(name, data=True):
                for position in edge.get("positions", [0]):
                    slots[position] = operand
            if sorted(slots) != list(range(len(slots))):
                raise CellSpecError(f"node {name!r}: operand positions {sorted(slots)} are not 0..n-1")
            raw: dict[str, Any] = {"op": attrs.get("op"), "inputs": [slots[i] for i in range(len(slots))]}
            if attrs.get("op") == "linear":
                raw["bias"] = attrs.get("bias", 0.0)
                raw["diag"] = attrs.get("diag", 0.0)
            nodes[name] = raw
        return cls(states=states, nodes=nodes, outputs=outputs, name=graph.graph.get("name"))

    # ------------------------------------------------------------------ rendering
    def equations(self) -> str:
        """The cell written the way the paper writes cells, one assignment per line.

        A ``linear`` node read only by one activation is folded into it, so a gate
        prints as ``z = sigmoid(W_xz x + W_hz h + b_z)``.
        """
        return render.equations(self)

    def to_dot(self) -> str:
        """Graphviz DOT text of the graph."""
        return render.to_dot(self)

    def draw(self, path: str | Path, engine: str = "auto") -> Path:
        """Draw the graph to a PNG file: with Graphviz's ``dot`` where it is installed, else with matplotlib
        (see :func:`cellsearch.render.draw_png`)."""
        return render.draw_png(self, Path(path), engine=engine)


# ---------------------------------------------------------------------- hashing
_MAX_TIE_ORDERINGS = 20_000


def _tree_signatures(spec: CellSpec) -> dict[str, str]:
    """Merkle signature of every value: op, constants and (for commutative ops, sorted) operand signatures."""
    sig: dict[str, str] = {INPUT: "X"}
    for position, state in enumerate(spec.states):
        sig[state] = f"S{position}"
    for name in spec.order:
        node = spec.nodes[name]
        children = [sig[i] for i in node.inputs]
        if node.op in COMMUTATIVE:
            children.sort()
        constants = f"{node.bias!r},{node.diag!r}" if node.op == "linear" else ""
        text = f"{node.op}[{constants}]({','.join(children)})"
        sig[name] = hashlib.sha256(text.encode()).hexdigest()[:32]
    return sig


def _canonical_hash(spec: CellSpec) -> str:
    """SHA-256 of a canonical serialisation of the graph.

    A Merkle hash alone cannot tell a node used twice from two copies of the same
    sub-expression (two ``linear(x)`` nodes have separate weights), so the graph is
    serialised depth-first from the outputs, naming nodes in visiting order and
    writing a revisited node as a back-reference. Operands of commutative ops are
    ordered by their Merkle signature; when several operands tie, every ordering of
    the ties is tried and the smallest serialisation wins, which makes the result
    independent of node names and operand order.
    """
    sig = _tree_signatures(spec)
    tie_groups: list[tuple[str, tuple[int, ...]]] = []  # (node, positions in sorted operand list)
    sorted_operands: dict[str, list[str]] = {}
    for name in spec.order:
        node = spec.nodes[name]
        operands = list(node.inputs)
        if node.op in COMMUTATIVE:
            operands.sort(key=lambda o: sig[o])
            for _, group in itertools.groupby(range(len(operands)), key=lambda i: sig[operands[i]]):
                group = tuple(group)
                # Ties matter only between distinct nodes; equal inputs are interchangeable.
                if len(group) > 1 and len({operands[i] for i in group}) > 1:
                    tie_groups.append((name, group))
        sorted_operands[name] = operands

    def serialise(choice: dict[str, list[str]]) -> str:
        ids: dict[str, int] = {}
        parts: list[str] = []

        def visit(value: str) -> None:
            if value == INPUT or value in spec.states:
                parts.append(sig[value])
                return
            if value in ids:
                parts.append(f"#{ids[value]}")
                return
            ids[value] = len(ids)
            node = spec.nodes[value]
            constants = f"{node.bias!r},{node.diag!r}" if node.op == "linear" else ""
            parts.append(f"{node.op}[{constants}](")
            for operand in choice[value]:
                visit(operand)
                parts.append(",")
            parts.append(")")

        for position, state in enumerate(spec.states):
            parts.append(f"|S{position}=")
            visit(spec.outputs[state])
        return "".join(parts)

    total = 1
    for _, group in tie_groups:
        total *= math.factorial(len(group))
    if total > _MAX_TIE_ORDERINGS:
        raise CellSpecError(
            f"the cell has too many interchangeable copies of identical sub-expressions to canonicalise "
            f"({total} orderings); merge the copies"
        )
    best: str | None = None
    per_group = [list(itertools.permutations(group)) for _, group in tie_groups]
    for combination in itertools.product(*per_group):
        choice = {n: list(ops) for n, ops in sorted_operands.items()}
        for (name, group), permuted in zip(tie_groups, combination):
            base = sorted_operands[name]
            for slot, source in zip(group, permuted):
                choice[name][slot] = base[source]
        text = serialise(choice)
        if best is None or text < best:
            best = text
    assert best is not None
    body = f"cellsearch-v{_FORMAT_VERSION};states={len(spec.states)};{best}"
    return hashlib.sha256(body.encode()).hexdigest()

