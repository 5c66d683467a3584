"""Duplicate detection: never spend training time on a cell already tried.

Two levels:

*Structural*: :attr:`CellSpec.hash`, the canonical hash, equal for cells that
differ only in node names and in the operand order of commutative operations.

*Functional*: :func:`fingerprint` runs the cell in numpy (float64) for a few
unrolled steps on fixed pseudo-random probe inputs (``x`` at every step and the
initial value of every state) and hashes every state's value at every step,
after rounding to 26 significant bits so that sums taken in a different order
round to the same thing. The weights of each ``linear`` node are not random
per cell: they are derived from what the node computes,

* the node's constants (``bias``, ``diag``) and the *values* its operands take on
  the first probe step (hashed after rounding), which name the functions the
  operands compute whatever graph computes them, and
* when several ``linear`` nodes compute the same map of the same operands
  (copies, such as the LSTM's gate pre-activations, four ``linear(x, h)``), a
  rank among the copies. Copies are separate learned matrices and must not be
  merged: the LSTM's four gates, or the GRU's ``r`` and ``z``, would otherwise
  collapse into one, and a cell that shares one gate between two uses would
  count as a duplicate of the cell with two gates. The copies are ranked by
  their *sensitivity*: the forward-mode derivative of the next states along a
  fixed direction applied to the copy's value, computed while all copies still
  share weights. That is a property of the function, not of the graph, so the
  ranking does not depend on node names or on how the rest of the cell is
  written (``n + z*(h - n)`` and ``z*h + (n - z*n)`` rank the GRU's gates alike).

The bias constant is added to the node's bias and ``diag`` to its matrix
diagonals, so cells that differ only in initial constants differ. A ``scale``
node (a learned per-unit vector, the peephole) is treated like a one-operand
``linear``: its vector is derived from its operand's value, and copies (the
peepholes of two gates reading the same cell state) are ranked the same way,
so a peephole shared between two gates is not a duplicate of two peepholes.
``one_minus`` is the elementwise ``1 - v``.

What it catches (same fingerprint, with overwhelming probability): renamed
nodes, commuted operands, ``identity`` chains anywhere, parameter-free nodes
(activations, add/sub/mul) duplicated under two names, ``sub`` of equal
operands (a zero wherever it is used: ``add(a, sub(b, b))`` equals ``a``,
``mul(a, sub(b, b))`` equals ``sub(c, c)``), re-associated sums and products
(``(a + b) + c`` and ``a + (b + c)``), ``mul(a, a)`` written through copies of
``a``, and any other identity of the elementwise algebra that holds for all
inputs. Distinct functions differ unless they agree on every probe to 26 bits.

What it does not catch:

* equivalences that hold only for some learned weights, or reparametrisations
  of the same family: ``linear(linear(x))`` spans the same maps as
  ``linear(x)``, ``linear(a, a')`` with ``a'`` a copy of ``a`` spans the same
  maps as ``linear(a)``, and ``sub(a, b)`` with ``b`` a one-operand linear spans
  the same maps as ``add``; these are different parametrisations (and different
  initialisations), so they count as different cells;
* equalities between copies of ``linear`` nodes whose sensitivities tie
  without the copies being interchangeable (ties are broken by name; a tie
  means the copies move the next states identically, so this needs a
  coincidence of the probes); a duplicate could then be missed, never
  invented. The result is cached per canonical hash, so structurally equal
  cells always get the same fingerprint;
* identities of the nonlinearities that hold only on part of the domain
  (``relu(relu(a))`` equals ``relu(a)`` and is caught; ``relu(a)`` and
  ``identity(a)`` differ on negative probes and are told apart, as they should).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np

from cellsearch.spec import INPUT, LEARNED, MAX_STATES, SCALE, CellSpec, Node

__all__ = ["fingerprint", "Deduplicator", "DuplicateCheck", "PROBE_WIDTH", "PROBE_STEPS"]

#: Width of every probe vector; 8 values per row are plenty to separate functions.
PROBE_WIDTH = 8
#: Rows of the probe batch: independent random points at which to compare functions.
PROBE_BATCH = 4
#: Unrolled steps: state feedback reaches the outputs from the second step on.
PROBE_STEPS = 3
#: Significant bits kept when hashing values (about 8 decimal digits).
_BITS = 26
#: Values smaller than this are cancellations of equal terms (rounding noise of a
#: true zero); they count as zero.
_ZERO = 1e-9
_SCALE = float(2**_BITS)
_VERSION = b"cellsearch-fingerprint-v1"


def _probes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(20150706)))
    inputs = rng.standard_normal((PROBE_STEPS, PROBE_BATCH, PROBE_WIDTH))
    states = rng.standard_normal((MAX_STATES, PROBE_BATCH, PROBE_WIDTH))
    direction = rng.standard_normal((PROBE_BATCH, PROBE_WIDTH))
    for array in (inputs, states, direction):
        array.setflags(write=False)
    return inputs, states, direction


_PROBE_INPUTS, _PROBE_STATES, _PROBE_DIRECTION = _probes()


def _digest(*parts: bytes) -> bytes:
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def _quantised(values: np.ndarray) -> bytes:
    """Bytes that are equal for values equal to 26 significant bits (NaN and inf get fixed codes)."""
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=1.25e300, posinf=1e308, neginf=-1e308)
    mantissa, exponent = np.frexp(values)
    scaled = np.rint(mantissa * _SCALE)
    small = np.abs(values) < _ZERO
    if small.any():
        scaled[small] = 0.0
        exponent[small] = 0
    return scaled.tobytes() + exponent.tobytes()


@functools.lru_cache(maxsize=16384)
def _weights(
    key: bytes, rank: int, operand_keys: tuple[bytes, ...], bias: float, diag: float
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The matrices (one per operand, in ``operand_keys`` order) and bias of a linear node with functional ``key``."""
    base = key + rank.to_bytes(4, "little")
    bound = 1.0 / math.sqrt(PROBE_WIDTH)
    matrices = []
    for slot, operand_key in enumerate(operand_keys):
        # Operands with equal keys hold equal values, so which gets which matrix does not matter.
        repeat = operand_keys[:slot].count(operand_key)
        seed = _digest(base, operand_key, repeat.to_bytes(4, "little"))
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
        # Stored transposed: probes are rows, so a linear map is values @ matrix.
        matrix = rng.uniform(-bound, bound, (PROBE_WIDTH, PROBE_WIDTH)) + diag * np.eye(PROBE_WIDTH)
        matrix.setflags(write=False)
        matrices.append(matrix)
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(_digest(base, b"bias"), "little")))
    vector = rng.uniform(-0.5, 0.5, PROBE_WIDTH) + bias
    vector.setflags(write=False)
    return tuple(matrices), vector


@functools.lru_cache(maxsize=16384)
def _scale_vector(key: bytes, rank: int) -> np.ndarray:
    """The per-unit vector of a ``scale`` node with functional ``key`` (its operand's value) and copy ``rank``."""
    seed = _digest(key, rank.to_bytes(4, "little"), b"scale")
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
    # Away from zero and from one: a peephole that vanished or passed its operand unchanged would
    # make the cell equal to a cell without it or with a plain read.
    vector = rng.uniform(0.3, 0.7, PROBE_WIDTH) * rng.choice([-1.0, 1.0], PROBE_WIDTH)
    vector.setflags(write=False)
    return vector


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * values))  # no overflow warning for large negative inputs


_ELEMENTWISE_FUNCTIONS = {
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "relu": lambda v: np.maximum(v, 0.0),
    "identity": lambda v: v,
    "one_minus": lambda v: 1.0 - v,
}


class _Probe:
    """One evaluation of a cell on the probe inputs, with weights derived as the module describes."""

    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        # Nodes with learned parameters (linear and scale): their copies are ranked (see the module doc).
        self.linear = [n for n in spec.order if spec.nodes[n].op in LEARNED]

    def first_step(self, ranks: dict[str, int]) -> tuple[dict[str, np.ndarray], dict[str, bytes], dict]:
        """Values at step 0, the functional key of every linear node, and the weights used."""
        spec = self.spec
        values: dict[str, np.ndarray] = {INPUT: _PROBE_INPUTS[0]}
        for position, state in enumerate(spec.states):
            values[state] = _PROBE_STATES[position]
        value_keys: dict[str, bytes] = {}
        keys: dict[str, bytes] = {}
        weights: dict[str, tuple[list[tuple[str, np.ndarray]], np.ndarray]] = {}
        for name in spec.order:
            node = spec.nodes[name]
            if node.op == SCALE:
                operand = node.inputs[0]
                if operand not in value_keys:
                    value_keys[operand] = _digest(_quantised(values[operand]))
                keys[name] = _digest(b"scale", value_keys[operand])
                weights[name] = _scale_vector(keys[name], ranks.get(name, 0))
                values[name] = values[operand] * weights[name]
                continue
            if node.op != "linear":
                values[name] = _elementwise(node, values)
                continue
            operand_keys = []
            for operand in node.inputs:
                if operand not in value_keys:
                    value_keys[operand] = _digest(_quantised(values[operand]))
                operand_keys.append((value_keys[operand], operand))
            operand_keys.sort(key=lambda pair: pair[0])
            sorted_keys = tuple(k for k, _ in operand_keys)
            key = _digest(b"linear%r,%r" % (node.bias, node.diag), *sorted_keys)
            keys[name] = key
            matrices, bias = _weights(key, ranks.get(name, 0), sorted_keys, node.bias, node.diag)
            weights[name] = (list(zip((o for _, o in operand_keys), matrices)), bias)
            values[name] = _linear(weights[name], values)
        return values, keys, weights

    def sensitivity(self, start: str, values: dict[str, np.ndarray], weights: dict) -> bytes:
        """How the next states change when ``start``'s value moves along a fixed direction (forward-mode derivative).

        A property of the function, not of the graph: copies used in the same
        role get the same signature however the rest of the cell is written.
        """
        spec = self.spec
        tangents: dict[str, np.ndarray] = {start: _PROBE_DIRECTION}
        for name in spec.order[spec.order.index(start) + 1:]:
            node = spec.nodes[name]
            moved = [tangents.get(i) for i in node.inputs]
            if all(t is None for t in moved):
                continue
            op = node.op
            if op == "linear":
                total = 0.0
                for operand, matrix in weights[name][0]:
                    if operand in tangents:
                        total = total + tangents[operand] @ matrix
                tangents[name] = total
                continue
            if op == SCALE:
                tangents[name] = moved[0] * weights[name]
                continue
            zero = np.zeros_like(values[name])
            first = zero if moved[0] is None else moved[0]
            if op in ("add", "sub", "mul"):
                second = zero if moved[1] is None else moved[1]
                if op == "add":
                    tangents[name] = first + second
                elif op == "sub":
                    tangents[name] = first - second
                else:
                    tangents[name] = first * values[node.inputs[1]] + values[node.inputs[0]] * second
            elif op == "tanh":
                tangents[name] = first * (1.0 - values[name] ** 2)
            elif op == "sigmoid":
                tangents[name] = first * values[name] * (1.0 - values[name])
            elif op == "relu":
                tangents[name] = first * (values[node.inputs[0]] > 0.0)
            elif op == "one_minus":
                tangents[name] = -first
            else:  # identity
                tangents[name] = first
        zero = np.zeros_like(_PROBE_DIRECTION)
        return _digest(_quantised(np.stack([tangents.get(spec.outputs[state], zero) for state in spec.states])))

    def settle_ranks(self) -> tuple[dict[str, np.ndarray], dict]:
        """Give copies of a linear node distinct ranks, ordered by how each copy is used.

        Copies are found by equal functional keys and, while they all hold rank 0,
        have equal weights and values, so their sensitivities compare uses alone.
        Copies whose operands depend on other, still unranked copies wait for a
        later pass: ranking those changes what they read.
        """
        ranks: dict[str, int] = {}
        settled: set[str] = set()
        for _ in range(len(self.linear) + 1):
            values, keys, weights = self.first_step(ranks)
            groups: dict[bytes, list[str]] = {}
            for name in self.linear:
                groups.setdefault(keys[name], []).append(name)
            pending = [members for members in groups.values() if len(members) > 1 and not settled.issuperset(members)]
            if not pending:
                break
            waiting = {name for members in pending for name in members}
            ready = [
                members for members in pending
                if not any(self._ancestors(name) & (waiting - set(members)) for name in members)
            ] or pending
            for members in ready:
                signatures = {name: self.sensitivity(name, values, weights) for name in members}
                # A tie means the copies play the same role, so either order gives the same function.
                for rank, name in enumerate(sorted(members, key=lambda n: (signatures[n], n))):
                    ranks[name] = rank
                settled.update(members)
        return values, weights

    def _ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.spec.nodes[name].inputs)
        while stack:
            value = stack.pop()
            if value not in seen:
                seen.add(value)
                node = self.spec.nodes.get(value)
                if node is not None:
                    stack.extend(node.inputs)
        return seen

    def run(self) -> str:
        spec = self.spec
        values, weights = self.settle_ranks()
        outputs = []
        for step in range(PROBE_STEPS):
            if step:
                previous = values
                values = {INPUT: _PROBE_INPUTS[step]}
                for state in spec.states:
                    values[state] = previous[spec.outputs[state]]
                for name in spec.order:
                    node = spec.nodes[name]
                    if node.op == "linear":
                        values[name] = _linear(weights[name], values)
                    elif node.op == SCALE:
                        values[name] = values[node.inputs[0]] * weights[name]
                    else:
                        values[name] = _elementwise(node, values)
            outputs.extend(values[spec.outputs[state]] for state in spec.states)
        quantised = _quantised(np.stack(outputs))
        return hashlib.blake2b(_VERSION + b";states=%d;" % len(spec.states) + quantised, digest_size=20).hexdigest()


def _linear(weights: tuple[list[tuple[str, np.ndarray]], np.ndarray], values: dict[str, np.ndarray]) -> np.ndarray:
    matrices, bias = weights
    total = bias
    for operand, matrix in matrices:
        total = total + values[operand] @ matrix
    return total


def _elementwise(node: Node, values: dict[str, np.ndarray]) -> np.ndarray:
    op = node.op
    if op == "add":
        return values[node.inputs[0]] + values[node.inputs[1]]
    if op == "mul":
        return values[node.inputs[0]] * values[node.inputs[1]]
    if op == "sub":
        return values[node.inputs[0]] - values[node.inputs[1]]
    return _ELEMENTWISE_FUNCTIONS[op](values[node.inputs[0]])


#: Fingerprints by canonical hash. Keyed by the hash string, not the spec, so that
#: the cache does not keep cells alive; a memo of a pure function, safe to share.
_CACHE: collections.OrderedDict[str, str] = collections.OrderedDict()
_CACHE_SIZE = 100_000


def fingerprint(spec: CellSpec, *, use_cache: bool = True) -> str:
    """A hex digest equal for cells that compute the same function (see the module docstring).

    Deterministic on a machine, across processes. Another machine (a different
    BLAS or vectorised ``tanh``) may differ in the last bits, which the rounding
    to 26 bits absorbs except with tiny probability; fingerprints are meant to be
    recomputed (``Deduplicator.from_specs``), not stored and compared across
    machines. Cached per canonical hash, so structurally equal cells always
    share it; ``use_cache=False`` recomputes it from this spec's own graph.
    """
    if not isinstance(spec, CellSpec):
        raise TypeError(f"fingerprint() needs a CellSpec, got {type(spec).__name__}")
    if use_cache:
        cached = _CACHE.get(spec.hash)
        if cached is not None:
            _CACHE.move_to_end(spec.hash)
            return cached
    with np.errstate(all="ignore"):
        value = _Probe(spec).run()
    if use_cache:
        _CACHE[spec.hash] = value
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


@dataclass(frozen=True)
class DuplicateCheck:
    """The answer of :meth:`Deduplicator.check`.

    ``kind`` is ``'structural'`` (same canonical hash), ``'functional'`` (same
    fingerprint, different hash) or ``None`` for a new cell; ``match`` is the
    hash of the cell seen first.
    """

    is_new: bool
    kind: Literal["structural", "functional"] | None = None
    match: str | None = None


class Deduplicator:
    """Remembers the cells seen so far, by canonical hash and by fingerprint.

    ``check`` answers without remembering; ``add`` remembers (and returns what
    ``check`` would have said). A functional duplicate that is added is
    remembered under its own hash too, pointing at the first cell with its
    fingerprint.
    """

    def __init__(self) -> None:
        self._hashes: dict[str, str] = {}  # canonical hash -> hash of the first cell with that function
        self._fingerprints: dict[str, str] = {}  # fingerprint -> hash of the first cell with it

    @classmethod
    def from_specs(cls, specs: Iterable[CellSpec]) -> "Deduplicator":
        """A deduplicator that has seen ``specs`` in this order (e.g. the cells stored for a run)."""
        deduplicator = cls()
        for spec in specs:
            deduplicator.add(spec)
        return deduplicator

    def __len__(self) -> int:
        """Number of distinct canonical hashes seen."""
        return len(self._hashes)

    def __contains__(self, spec: object) -> bool:
        return isinstance(spec, CellSpec) and self.check(spec).kind is not None

    def check(self, spec: CellSpec) -> DuplicateCheck:
        """Whether ``spec`` is new, or a structural or functional duplicate of a cell seen before."""
        if spec.hash in self._hashes:
            return DuplicateCheck(is_new=False, kind="structural", match=spec.hash)
        first = self._fingerprints.get(fingerprint(spec))
        if first is not None:
            return DuplicateCheck(is_new=False, kind="functional", match=first)
        return DuplicateCheck(is_new=True)

    def add(self, spec: CellSpec) -> DuplicateCheck:
        """Remember ``spec``; returns its status before it was added."""
        result = self.check(spec)
        if result.kind != "structural":
            first = self._fingerprints.setdefault(fingerprint(spec), spec.hash)
            self._hashes[spec.hash] = first
        return result
