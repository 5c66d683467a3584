"""The mutation engine: a cell in, a reproducible, valid, recorded child out.

:func:`mutate` follows Jozefowicz et al. (2015): draw ``p`` uniformly in [0, 1],
visit every node of the parent (in its deterministic topological order,
:attr:`CellSpec.order`) and, with probability ``p``, apply one transformation
chosen at random (weights in :class:`MutationConfig`) among those that apply to
the node:

``activation``
    an activation node (``tanh``, ``sigmoid``, ``relu``, ``identity``, or a
    one-operand ``linear``, which is the paper's ``Linear(a, v)``) becomes another
    member of the activation set, by default {tanh, sigmoid, relu, Linear(0, v),
    Linear(1, v), Linear(0.9, v), Linear(1.1, v)}; ``Linear(a, v)`` is a
    one-operand ``linear`` with ``diag = a`` and ``bias = 0``.
``elementwise``
    an ``add``/``mul``/``sub`` node becomes another of the three (operand order
    is kept, so ``add(a, b)`` becomes ``sub(a, b)`` = ``a - b``).
``insert``
    a new activation node (drawn from the same set) is put between the node and
    one of its operand slots.
``remove``
    the node is deleted and everything that read it (its users and any state
    output) reads one of its ancestors instead, drawn from all of the node's
    ancestors, inputs included (which is the same set as its operands and their
    ancestors). A ``linear`` user that would then read the same value twice keeps
    one copy: ``W1 a + W2 a`` spans the same functions as ``W a``.
``combine``
    a second node ``A`` is drawn (any other node; the node itself when it is the
    only one); the node is replaced by a new ``add``/``mul``/``sub`` of a random
    ancestor of the node and a random ancestor of ``A`` that is not a descendant
    of the node (its users will read the new node, so a descendant would close
    a cycle). For ``sub`` the node's ancestor comes first; when both draws are the
    same value, ``sub`` (identically zero) is not among the choices.

Two more transformations, off by default (weight 0, so the paper's procedure and every seeded
result are unchanged), move through the peephole LSTMs of Greff et al. (2017); give them a weight
in :class:`OperatorWeights` to switch them on:

``add_peephole``
    a ``linear`` node ``L`` (a gate's pre-activation) becomes ``add(L, scale(v))``: a learned
    per-unit weight times a memory value ``v``, drawn from the cell's states (their previous
    values) and the nodes holding their next values, leaving out ``L`` and its descendants (a
    peephole must not close a cycle). The LSTM's ``p_i * c`` and ``p_o * c'``.
``remove_peephole``
    a ``scale`` node is deleted: an ``add`` that read it is replaced by its other operand (the
    peephole's term disappears from the sum), and any other reader reads the scale's operand.

``one_minus`` (``1 - v``, the coupled gate of Greff's CIFG) may be put in the activation set
(``activations: [..., one_minus]``): then ``activation`` and ``insert`` produce it and the other
transformations remove it as any other activation.

Transformations act on the evolving child, so later ones see earlier ones; nodes
created during a mutation are not visited again, and nodes that no longer reach
an output are dropped as soon as they do. New nodes get fresh, deterministic
names ``m1``, ``m2``, ... (skipping names already used in this mutation).

An attempt is rejected, and the whole procedure repeated with a fresh ``p``,
when it changed nothing (the child's canonical hash equals the parent's), when
the child is invalid (for example ``x`` or a state is no longer read), when it
is degenerate (followed back through time, the output state never depends on
``x`` or on one of the states: ``h' = sigmoid(h)``, or a state that is updated
but never reaches the output; or a node is ``sub(a, a)``, identically zero),
when it has more nodes than ``max_nodes``, or fewer ``linear`` nodes than
``min_linear`` (by default a child must keep at least one learned matrix; the
paper does not say, but a cell without one has nothing to learn in its
recurrence). After ``max_attempts`` rejections
:class:`MutationError` names the parent. The function is pure: the parent is an
immutable :class:`CellSpec` and all randomness comes from the ``rng`` argument,
so the same parent, seed and config give the same child.

The module is kept whole, above the project's usual length: the paper's five
operators share the working graph (``_Draft``), the random draws and the
applicability rules; the rejection checks run on that same draft; and every
operator writes the :class:`Operation` record that :class:`Mutation` keeps, so
the procedure described above reads in one place.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cellsearch.config import ConfigError, option
from cellsearch.errors import UserError
from cellsearch.spec import ACTIVATIONS, ELEMENTWISE, MAX_CONSTANT, ONE_MINUS, SCALE, CellSpec, CellSpecError, Node

__all__ = [
    "OPERATORS",
    "PEEPHOLE_OPERATORS",
    "ALL_OPERATORS",
    "REJECTION_REASONS",
    "MutationConfig",
    "OperatorWeights",
    "Operation",
    "Mutation",
    "MutationError",
    "mutate",
    "lineage",
    "parse_activation",
]

#: Transformation kinds, in the paper's order.
OPERATORS = ("activation", "elementwise", "insert", "remove", "combine")
#: Transformations beyond the paper's, off by default (see the module doc).
PEEPHOLE_OPERATORS = ("add_peephole", "remove_peephole")
ALL_OPERATORS = OPERATORS + PEEPHOLE_OPERATORS
#: Activation-set entries besides the activations and linear(A): ops of one operand without weights.
_UNARY_ENTRIES = (ONE_MINUS,)
#: Why an attempt can be thrown away.
REJECTION_REASONS = ("unchanged", "invalid", "degenerate", "too_large", "too_few_linear")

_LINEAR_FORM = re.compile(r"linear\(\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\)")


class MutationError(UserError):
    """A parent could not be mutated into a valid child within the allowed attempts."""


def parse_activation(text: str) -> Node:
    """The node template for one activation-set entry (operand left empty).

    Entries are ``tanh``, ``sigmoid``, ``relu``, ``identity``, ``one_minus`` or
    ``linear(A)`` (the paper's ``Linear(A, v)``: one matrix with ``A`` on its
    diagonal at init, bias 0). Parsed with a regular expression, never evaluated.
    """
    if not isinstance(text, str):
        raise ConfigError(f"activation {text!r}: expected a string")
    if text in ACTIVATIONS or text in _UNARY_ENTRIES:
        return Node(op=text, inputs=())
    match = _LINEAR_FORM.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"activation {text!r}: expected one of {', '.join(ACTIVATIONS + _UNARY_ENTRIES)} or linear(A) "
            "with a number A"
        )
    diag = float(match.group(1))
    if not math.isfinite(diag) or abs(diag) > MAX_CONSTANT:
        raise ConfigError(f"activation {text!r}: A must be finite and within +-{MAX_CONSTANT:g}")
    return Node(op="linear", inputs=(), diag=diag)


def _valid_activations(values: tuple[str, ...]) -> bool:
    if not values or len(set(values)) != len(values):
        return False
    forms = set()
    for value in values:
        try:
            template = parse_activation(value)
        except ConfigError:
            return False
        forms.add((template.op, template.diag))
    return len(forms) == len(values)


def _non_negative(value: float) -> bool:
    return value >= 0.0


@dataclass(frozen=True)
class OperatorWeights:
    """Relative probability of each transformation among those that apply to a node (0 disables it)."""

    activation: float = option(
        1.0, "the paper draws uniformly among applicable transformations", check=_non_negative, rule=">= 0"
    )
    elementwise: float = option(
        1.0, "the paper draws uniformly among applicable transformations", check=_non_negative, rule=">= 0"
    )
    insert: float = option(
        1.0, "the paper draws uniformly among applicable transformations", check=_non_negative, rule=">= 0"
    )
    remove: float = option(
        1.0, "the paper draws uniformly among applicable transformations", check=_non_negative, rule=">= 0"
    )
    combine: float = option(
        1.0, "the paper draws uniformly among applicable transformations", check=_non_negative, rule=">= 0"
    )
    add_peephole: float = option(
        0.0, "not in the paper: off, so that seeded searches reproduce; > 0 lets evolution add peepholes",
        check=_non_negative, rule=">= 0"
    )
    remove_peephole: float = option(
        0.0, "not in the paper: off, so that seeded searches reproduce; > 0 lets evolution remove peepholes",
        check=_non_negative, rule=">= 0"
    )

    def __post_init__(self) -> None:
        for kind in ALL_OPERATORS:
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"weights.{kind}: {value!r} is out of range (a finite number >= 0)")
        if not any(getattr(self, kind) > 0 for kind in ALL_OPERATORS):
            raise ConfigError("weights: at least one transformation needs a positive weight")


@dataclass(frozen=True)
class MutationConfig:
    """How :func:`mutate` edits cells; the defaults are the paper's procedure."""

    weights: OperatorWeights = option(OperatorWeights(), "uniform over the five transformations, as in the paper")
    activations: tuple[str, ...] = option(
        ("tanh", "sigmoid", "relu", "linear(0)", "linear(1)", "linear(0.9)", "linear(1.1)"),
        "the paper's set; linear(A) is a one-operand linear with A on the diagonal at init",
        check=_valid_activations,
        rule="non-empty, distinct entries from tanh, sigmoid, relu, identity, one_minus, linear(A)",
    )
    elementwise: tuple[str, ...] = option(
        ELEMENTWISE,
        "the paper's {addition, subtraction, multiplication}",
        check=lambda ops: bool(ops) and len(set(ops)) == len(ops) and set(ops) <= set(ELEMENTWISE),
        rule=f"non-empty, distinct entries from {', '.join(ELEMENTWISE)}",
    )
    max_nodes: int = option(
        40,
        "three times the largest reference cell (the LSTM, 13 nodes): room to grow, while the canonical "
        "hash, the fingerprint and training stay cheap and cells stay readable; the paper gives no limit",
        check=lambda n: 1 <= n <= 500,
        rule="1..500",
    )
    reject_degenerate: bool = option(
        True,
        "a child whose output, over time, ignores x or one of the states computes nothing useful "
        "(e.g. h' = sigmoid(h)); rejecting it costs microseconds, training it would cost a run",
    )
    min_linear: int = option(
        1,
        "a cell without a linear node has no learned weights in its recurrence (and a zero parameter "
        "count that cannot be sized to a budget); 0 allows such cells",
        check=lambda n: n >= 0,
        rule=">= 0",
    )
    max_attempts: int = option(
        100,
        "a typical cell needs 1-2 attempts; 100 failures in a row mean the parent or config cannot work",
        check=lambda n: n >= 1,
        rule=">= 1",
    )

    def __post_init__(self) -> None:
        # Direct construction skips from_mapping's checks; repeat the ones that matter.
        if not _valid_activations(tuple(self.activations)):
            raise ConfigError("activations: non-empty, distinct entries from tanh, sigmoid, relu, identity, one_minus, "
                              "linear(A)")
        if (not self.elementwise or not set(self.elementwise) <= set(ELEMENTWISE)
                or len(set(self.elementwise)) != len(self.elementwise)):
            raise ConfigError(f"elementwise: non-empty, distinct entries from {', '.join(ELEMENTWISE)}")
        object.__setattr__(self, "activations", tuple(self.activations))
        object.__setattr__(self, "elementwise", tuple(self.elementwise))
        object.__setattr__(self, "_templates", tuple(parse_activation(a) for a in self.activations))
        object.__setattr__(
            self, "_weight_of", MappingProxyType({k: float(getattr(self.weights, k)) for k in ALL_OPERATORS})
        )

    @property
    def activation_templates(self) -> tuple[Node, ...]:
        """The activation set as node templates (operand left empty)."""
        return self._templates  # type: ignore[attr-defined]

    @property
    def weight_of(self) -> Mapping[str, float]:
        """Operator kind -> weight."""
        return self._weight_of  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=1)
def _default_config() -> MutationConfig:
    # Built once: validating the activation set on every call would cost more than a mutation step.
    return MutationConfig()


# ---------------------------------------------------------------------- records
def _node_from_dict(name: str, data: Any) -> Node:
    if not isinstance(data, Mapping) or "op" not in data or "inputs" not in data:
        raise ValueError(f"operation record: node {name!r} needs 'op' and 'inputs'")
    return Node(
        op=str(data["op"]),
        inputs=tuple(str(i) for i in data["inputs"]),
        bias=float(data.get("bias", 0.0)),
        diag=float(data.get("diag", 0.0)),
    )


def _expression(node: Node) -> str:
    if node.op == "linear":
        constants = []
        if node.diag:
            constants.append(f"diag={node.diag:g}")
        if node.bias:
            constants.append(f"bias={node.bias:g}")
        label = f"linear[{', '.join(constants)}]" if constants else "linear"
        return f"{label}({', '.join(node.inputs)})"
    return f"{node.op}({', '.join(node.inputs)})"


@dataclass(frozen=True)
class Operation:
    """One transformation applied during a mutation.

    ``node`` is the visited node; ``before`` holds it as it was, ``after`` the
    nodes it added or changed (name, :class:`Node` pairs); ``rewired`` is the
    value that the node's users and outputs read afterwards (``remove`` and
    ``combine``), else ``None``.
    """

    kind: str
    node: str
    before: tuple[tuple[str, Node], ...]
    after: tuple[tuple[str, Node], ...]
    rewired: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": self.node,
            "before": {name: node.to_dict() for name, node in self.before},
            "after": {name: node.to_dict() for name, node in self.after},
            "rewired": self.rewired,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Operation":
        if not isinstance(data, Mapping):
            raise ValueError(f"operation record: expected a mapping, got {type(data).__name__}")
        kind = data.get("kind")
        if kind not in ALL_OPERATORS:
            raise ValueError(f"operation record: unknown kind {kind!r}; known: {', '.join(ALL_OPERATORS)}")
        return cls(
            kind=kind,
            node=str(data["node"]),
            before=tuple((n, _node_from_dict(n, d)) for n, d in dict(data.get("before", {})).items()),
            after=tuple((n, _node_from_dict(n, d)) for n, d in dict(data.get("after", {})).items()),
            rewired=None if data.get("rewired") is None else str(data["rewired"]),
        )

    def describe(self) -> str:
        """One line for a lineage view, e.g. ``n: tanh(n_pre) -> relu(n_pre)``."""
        old = dict(self.before).get(self.node)
        old_text = _expression(old) if old is not None else "?"
        if self.kind in ("activation", "elementwise"):
            new = dict(self.after).get(self.node)
            return f"{self.node}: {old_text} -> {_expression(new) if new is not None else '?'}"
        if self.kind == "insert":
            added = [(n, node) for n, node in self.after if n != self.node]
            changed = dict(self.after).get(self.node)
            inserted = ", ".join(f"{n} = {_expression(node)}" for n, node in added)
            return f"{self.node}: inserted {inserted}; {old_text} -> {_expression(changed) if changed else '?'}"
        if self.kind == "remove":
            return f"{self.node} = {old_text} removed; its readers now read {self.rewired}"
        if self.kind == "add_peephole":
            added = ", ".join(f"{n} = {_expression(node)}" for n, node in self.after)
            return f"{self.node}: peephole added ({added}); its readers now read {self.rewired}"
        if self.kind == "remove_peephole":
            dropped = ", ".join(f"{n} = {_expression(node)}" for n, node in self.before)
            return f"peephole {self.node} removed ({dropped}); its readers now read {self.rewired}"
        added = ", ".join(f"{n} = {_expression(node)}" for n, node in self.after)
        return f"{self.node} = {old_text} replaced by {added}"


@dataclass(frozen=True)
class Mutation:
    """A child cell with the record of how it was made from its parent.

    ``attempts`` counts every try including the successful one; ``rejected``
    says why the failed ones were thrown away (see :data:`REJECTION_REASONS`).
    """

    child: CellSpec
    parent_hash: str
    p: float
    operations: tuple[Operation, ...]
    attempts: int
    rejected: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({r: 0 for r in REJECTION_REASONS}))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data; :meth:`from_dict` reads it back (the child's hash is checked)."""
        child = self.child.to_dict()
        child["hash"] = self.child.hash
        return {
            "parent_hash": self.parent_hash,
            "child": child,
            "p": self.p,
            "attempts": self.attempts,
            "rejected": dict(self.rejected),
            "operations": [operation.to_dict() for operation in self.operations],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Mutation":
        operations = cls.operations_from_dict(data)
        rejected = {r: int(dict(data.get("rejected", {})).get(r, 0)) for r in REJECTION_REASONS}
        return cls(
            child=CellSpec.from_dict(data["child"]),
            parent_hash=str(data["parent_hash"]),
            p=float(data["p"]),
            operations=operations,
            attempts=int(data["attempts"]),
            rejected=MappingProxyType(rejected),
        )

    @staticmethod
    def operations_from_dict(data: Mapping[str, Any]) -> tuple[Operation, ...]:
        """The operations of a record :meth:`to_dict` wrote, after checking the record's shape, without rebuilding
        its child cell (what a description of a stored cell's mutation needs: the child is the stored cell)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"mutation record: expected a mapping, got {type(data).__name__}")
        missing = [k for k in ("parent_hash", "child", "p", "attempts", "operations") if k not in data]
        if missing:
            raise ValueError(f"mutation record: missing key(s) {missing}")
        return tuple(Operation.from_dict(o) for o in data["operations"])

    def describe(self) -> str:
        """The operations, one per line, headed by the parent and child hashes."""
        lines = [f"{self.parent_hash[:12]} -> {self.child.short_hash} (p={self.p:.3f}, attempts={self.attempts})"]
        lines += [f"  {operation.kind:<11} {operation.describe()}" for operation in self.operations]
        return "\n".join(lines)


# ---------------------------------------------------------------------- the working graph
class _Draft:
    """The child being edited: plain dicts, so that an attempt validates once, at the end.

    ``readers`` counts, for every value, the operand slots and state outputs
    that read it; a node whose count drops to zero is deleted at once (with
    whatever only it read), so ``nodes`` always holds exactly the live nodes,
    as CellSpec's pruning would leave them.
    """

    def __init__(self, parent: CellSpec, readers: Mapping[str, int]) -> None:
        self.inputs = parent.inputs
        self.nodes: dict[str, Node] = dict(parent.nodes)
        self.outputs: dict[str, str] = dict(parent.outputs)
        self.readers = dict(readers)
        self._used = set(self.readers)
        self._counter = 0

    @staticmethod
    def count_readers(parent: CellSpec) -> dict[str, int]:
        """Reader counts of the parent's values (computed once per :func:`mutate` call)."""
        readers: dict[str, int] = dict.fromkeys(parent.inputs, 0)
        for name, node in parent.nodes.items():
            readers.setdefault(name, 0)
            for operand in node.inputs:
                readers[operand] += 1
        for target in parent.outputs.values():
            readers[target] += 1
        return readers

    def fresh_name(self) -> str:
        while True:
            self._counter += 1
            name = f"m{self._counter}"
            if name not in self._used:
                self._used.add(name)
                return name

    def set(self, name: str, node: Node) -> None:
        """Add or replace a node, keeping the reader counts (nothing is deleted here)."""
        readers = self.readers
        old = self.nodes.get(name)
        if old is not None:
            for operand in old.inputs:
                readers[operand] -= 1
        else:
            readers.setdefault(name, 0)
        for operand in node.inputs:
            readers[operand] += 1
        self.nodes[name] = node

    def delete(self, name: str) -> None:
        """Remove a node nobody reads, and then every node that only it read."""
        node = self.nodes.pop(name)
        del self.readers[name]
        for operand in node.inputs:
            self.readers[operand] -= 1
            if self.readers[operand] == 0 and operand in self.nodes:
                self.delete(operand)

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.nodes[name].inputs)
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            node = self.nodes.get(value)
            if node is not None:
                stack.extend(node.inputs)
        return seen

    def descendants(self, name: str) -> set[str]:
        users: dict[str, list[str]] = {}
        for user, node in self.nodes.items():
            for operand in node.inputs:
                users.setdefault(operand, []).append(user)
        seen: set[str] = set()
        stack = list(users.get(name, ()))
        while stack:
            value = stack.pop()
            if value not in seen:
                seen.add(value)
                stack.extend(users.get(value, ()))
        return seen

    def redirect(self, old: str, new: str) -> None:
        """Make every reader of ``old`` (nodes and state outputs) read ``new``."""
        for user in [u for u, node in self.nodes.items() if old in node.inputs]:
            node = self.nodes[user]
            inputs = tuple(new if operand == old else operand for operand in node.inputs)
            if node.op == "linear":
                inputs = tuple(dict.fromkeys(inputs))  # one matrix per distinct operand
            self.set(user, Node(node.op, inputs, node.bias, node.diag))
        for state, target in self.outputs.items():
            if target == old:
                self.outputs[state] = new
                self.readers[old] -= 1
                self.readers[new] += 1

    def unread_input(self) -> bool:
        """Whether x or a state is no longer read (CellSpec would refuse the cell)."""
        return any(self.readers[value] == 0 for value in self.inputs)

    def degenerate(self) -> bool:
        """Whether the output state, followed back through the recurrence, misses x or some state, or a
        node computes ``a - a`` (identically zero: whatever reads it reads a constant)."""
        if any(node.op == "sub" and node.inputs[0] == node.inputs[1] for node in self.nodes.values()):
            return True
        reads: dict[str, set[str]] = {}
        for state, target in self.outputs.items():
            seen: set[str] = set()
            stack = [target]
            while stack:
                value = stack.pop()
                if value not in seen:
                    seen.add(value)
                    node = self.nodes.get(value)
                    if node is not None:
                        stack.extend(node.inputs)
            reads[state] = {value for value in seen if value in self.inputs}
        output = self.inputs[1]
        reached = set(reads[output])
        pending = [v for v in reached if v in reads]
        while pending:
            for value in reads[pending.pop()]:
                if value not in reached:
                    reached.add(value)
                    if value in reads:
                        pending.append(value)
        return len(reached) != len(self.inputs)


class _Uniforms:
    """Uniform draws in [0, 1) from ``rng``, fetched in blocks: one call into numpy per 64 draws."""

    __slots__ = ("rng", "block", "position")

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.block: list[float] = []
        self.position = 0

    def next(self) -> float:
        if self.position == len(self.block):
            self.block = self.rng.random(64).tolist()
            self.position = 0
        self.position += 1
        return self.block[self.position - 1]

    def index(self, size: int) -> int:
        # floor(u * n): the bias of a 53-bit uniform over a few hundred items is far below anything observable.
        return min(int(self.next() * size), size - 1)


def _pick(draws: _Uniforms, items: Sequence[Any]) -> Any:
    return items[draws.index(len(items))]


def _activation_form(node: Node) -> tuple[str, float] | None:
    """The node's member of the activation set, or None when it is not an activation."""
    if node.op in ACTIVATIONS or node.op in _UNARY_ENTRIES:
        return (node.op, 0.0)
    if node.op == "linear" and len(node.inputs) == 1:
        # A one-operand linear with a bias is still an activation site, just not equal to any Linear(a, v).
        return ("linear", node.diag) if node.bias == 0.0 else ("linear-biased", node.diag)
    return None


def _from_template(template: Node, operand: str) -> Node:
    return Node(template.op, (operand,), 0.0, template.diag)


def _peephole_sources(name: str, draft: _Draft) -> list[str]:
    """What a peephole on linear node ``name`` may read: states and the nodes holding their next values,
    except ``name`` and its descendants (sorted, for reproducible draws)."""
    states = draft.inputs[1:]
    candidates = set(states) | {target for target in draft.outputs.values() if target in draft.nodes}
    forbidden = draft.descendants(name)
    forbidden.add(name)
    return sorted(candidates - forbidden)


def _applicable(node: Node, config: MutationConfig, name: str = "", draft: _Draft | None = None
                ) -> tuple[tuple[str, float], ...]:
    """(kind, weight) of the transformations that can act on ``node``, zero weights left out."""
    weights = config.weight_of
    kinds = []
    if node.op in ELEMENTWISE:
        if any(op != node.op for op in config.elementwise):
            kinds.append("elementwise")
    else:
        form = _activation_form(node)
        if form is not None and any((t.op, t.diag) != form for t in config.activation_templates):
            kinds.append("activation")
    kinds += ("insert", "remove", "combine")
    # after the paper's kinds: with zero weights they drop out and the draws are the paper's
    if weights["add_peephole"] > 0 and node.op == "linear" and draft is not None and _peephole_sources(name, draft):
        kinds.append("add_peephole")
    if weights["remove_peephole"] > 0 and node.op == SCALE:
        kinds.append("remove_peephole")
    return tuple((k, weights[k]) for k in kinds if weights[k] > 0)


def _choose_kind(draws: _Uniforms, kinds: tuple[tuple[str, float], ...]) -> str:
    threshold = draws.next() * sum(weight for _, weight in kinds)
    for kind, weight in kinds:
        threshold -= weight
        if threshold < 0:
            return kind
    return kinds[-1][0]


def _apply(kind: str, name: str, draft: _Draft, draws: _Uniforms, config: MutationConfig) -> Operation:
    node = draft.nodes[name]
    before = ((name, node),)
    if kind == "activation":
        form = _activation_form(node)
        options = [t for t in config.activation_templates if (t.op, t.diag) != form]
        new = _from_template(_pick(draws, options), node.inputs[0])
        draft.set(name, new)
        return Operation(kind, name, before, ((name, new),))
    if kind == "elementwise":
        new = Node(_pick(draws, [op for op in config.elementwise if op != node.op]), node.inputs)
        draft.set(name, new)
        return Operation(kind, name, before, ((name, new),))
    if kind == "insert":
        slot = draws.index(len(node.inputs))
        inserted_name = draft.fresh_name()
        inserted = _from_template(_pick(draws, config.activation_templates), node.inputs[slot])
        inputs = list(node.inputs)
        inputs[slot] = inserted_name
        changed = Node(node.op, tuple(inputs), node.bias, node.diag)
        draft.set(inserted_name, inserted)
        draft.set(name, changed)
        return Operation(kind, name, before, ((inserted_name, inserted), (name, changed)))
    if kind == "add_peephole":
        source = _pick(draws, _peephole_sources(name, draft))
        scale_name, sum_name = draft.fresh_name(), draft.fresh_name()
        scale, total = Node(SCALE, (source,)), Node("add", (name, scale_name))
        draft.set(scale_name, scale)
        draft.readers.setdefault(sum_name, 0)
        draft.redirect(name, sum_name)  # before the sum exists, so that the sum itself keeps reading the node
        draft.set(sum_name, total)
        return Operation(kind, name, before, ((scale_name, scale), (sum_name, total)), rewired=sum_name)
    if kind == "remove_peephole":
        operand = node.inputs[0]
        removed = [before[0]]
        for user in [u for u, n in draft.nodes.items() if name in n.inputs]:
            if user not in draft.nodes:
                continue
            reader = draft.nodes[user]
            if reader.op == "add" and reader.inputs.count(name) == 1:
                other = reader.inputs[1] if reader.inputs[0] == name else reader.inputs[0]
                removed.append((user, reader))
                draft.redirect(user, other)
                draft.delete(user)  # nobody reads the sum now; deleting it may delete the peephole too
        if name in draft.nodes:
            draft.redirect(name, operand)
            draft.delete(name)
        return Operation(kind, name, tuple(removed), (), rewired=operand)
    if kind == "remove":
        target = _pick(draws, sorted(draft.ancestors(name)))
        draft.redirect(name, target)
        draft.delete(name)
        return Operation(kind, name, before, (), rewired=target)
    # combine
    others = [n for n in draft.nodes if n != name] or [name]
    partner = _pick(draws, others)
    left = _pick(draws, sorted(draft.ancestors(name)))
    forbidden = draft.descendants(name)
    forbidden.add(name)
    right = _pick(draws, sorted(draft.ancestors(partner) - forbidden))
    combined_name = draft.fresh_name()
    # a - a is identically zero: with one operand twice, only add (2a) and mul (a*a) make a new function.
    operators = [op for op in config.elementwise if not (op == "sub" and left == right)] or list(config.elementwise)
    combined = Node(_pick(draws, operators), (left, right))
    draft.set(combined_name, combined)
    draft.redirect(name, combined_name)
    draft.delete(name)
    return Operation(kind, name, before, ((combined_name, combined),), rewired=combined_name)


def _attempt(
    parent: CellSpec, readers: Mapping[str, int], rng: np.random.Generator, config: MutationConfig
) -> tuple[float, list[Operation], _Draft]:
    p = float(rng.random())
    # One draw per parent node, made up front, so whether a node is visited does
    # not depend on what happened to the nodes before it.
    visits = rng.random(len(parent.order)) < p
    draws = _Uniforms(rng)
    draft = _Draft(parent, readers)
    operations: list[Operation] = []
    for name, visit in zip(parent.order, visits.tolist()):
        if not visit or name not in draft.nodes:
            continue
        kinds = _applicable(draft.nodes[name], config, name, draft)
        if not kinds:
            continue
        operations.append(_apply(_choose_kind(draws, kinds), name, draft, draws, config))
        if draft.unread_input():
            # No later transformation can read x or a state again: the draft holds
            # only live nodes, so an unread input is nobody's ancestor, and every
            # transformation reads only the node's operands or ancestors. The
            # attempt is lost; stopping now changes no outcome, only saves time.
            break
    return p, operations, draft


def mutate(spec: CellSpec, rng: np.random.Generator, config: MutationConfig | None = None) -> Mutation:
    """A mutated copy of ``spec`` and the record of how it was made.

    ``rng`` supplies every random choice (same state, same child). Raises
    :class:`MutationError` when ``config.max_attempts`` attempts in a row are
    rejected (see :data:`REJECTION_REASONS`).
    """
    if not isinstance(spec, CellSpec):
        raise TypeError(f"mutate() needs a CellSpec, got {type(spec).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"mutate() needs a numpy.random.Generator, got {type(rng).__name__}")
    config = config or _default_config()
    readers = _Draft.count_readers(spec)
    rejected = {reason: 0 for reason in REJECTION_REASONS}
    for attempt in range(1, config.max_attempts + 1):
        p, operations, draft = _attempt(spec, readers, rng, config)
        # Cheap checks on the draft first: most rejections never build a CellSpec.
        if not operations or (draft.nodes == dict(spec.nodes) and draft.outputs == dict(spec.outputs)):
            rejected["unchanged"] += 1
            continue
        if draft.unread_input():
            rejected["invalid"] += 1
            continue
        if config.reject_degenerate and draft.degenerate():
            rejected["degenerate"] += 1
            continue
        if len(draft.nodes) > config.max_nodes:
            rejected["too_large"] += 1
            continue
        if config.min_linear and sum(1 for node in draft.nodes.values() if node.op == "linear") < config.min_linear:
            rejected["too_few_linear"] += 1
            continue
        try:
            child = CellSpec(states=spec.states, nodes=draft.nodes, outputs=draft.outputs)
        except CellSpecError:
            rejected["invalid"] += 1
            continue
        if child.hash == spec.hash:
            rejected["unchanged"] += 1
            continue
        return Mutation(
            child=child,
            parent_hash=spec.hash,
            p=p,
            operations=tuple(operations),
            attempts=attempt,
            rejected=MappingProxyType(rejected),
        )
    reasons = ", ".join(f"{count} {reason}" for reason, count in rejected.items() if count)
    raise MutationError(
        f"cell {spec.hash} could not be mutated into a valid child in {config.max_attempts} attempts ({reasons}); "
        f"check the mutation config (weights, max_nodes={config.max_nodes}, min_linear={config.min_linear})"
    )


def lineage(mutations: Iterable[Mutation]) -> str:
    """The records of a chain of mutations, one block per step, oldest first."""
    return "\n".join(m.describe() for m in mutations)
