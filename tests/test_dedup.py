"""Duplicate detection: equivalent graphs share a fingerprint, near misses do not, the deduplicator remembers."""

from __future__ import annotations

import numpy as np
import pytest

from cellsearch import CellSpec, zoo
from cellsearch.dedup import Deduplicator, DuplicateCheck, fingerprint
from cellsearch.mutation import mutate
from cellsearch.spec import COMMUTATIVE, Node


def _lin(*inputs: str, bias: float = 0.0, diag: float = 0.0) -> dict:
    return {"op": "linear", "inputs": list(inputs), "bias": bias, "diag": diag}


def _op(op: str, *inputs: str) -> dict:
    return {"op": op, "inputs": list(inputs)}


def _cell(nodes: dict, outputs: dict | None = None, states=("h",)) -> CellSpec:
    return CellSpec(states=list(states), nodes=nodes, outputs=outputs or {"h": "h_new"})


def _edit(spec: CellSpec, **nodes) -> CellSpec:
    """``spec`` with some nodes replaced or added (None deletes)."""
    data = spec.to_dict()
    for name, node in nodes.items():
        if node is None:
            del data["nodes"][name]
        else:
            data["nodes"][name] = node
    return CellSpec.from_dict(data)


TANH_RNN = _cell({"pre": _lin("x", "h"), "h_new": _op("tanh", "pre")})

EQUIVALENT = {
    "commuted operands": (
        _cell({"a": _lin("x"), "b": _lin("h"), "h_new": _op("mul", "a", "b")}),
        _cell({"a": _lin("x"), "b": _lin("h"), "h_new": _op("mul", "b", "a")}),
    ),
    "commuted linear operands": (TANH_RNN, _cell({"pre": _lin("h", "x"), "h_new": _op("tanh", "pre")})),
    "identity chains": (
        TANH_RNN,
        _cell({"i1": _op("identity", "x"), "i2": _op("identity", "i1"), "pre": _lin("i2", "h"),
               "t": _op("tanh", "pre"), "h_new": _op("identity", "t")}),
    ),
    "activation duplicated under two names": (
        _cell({"pre": _lin("x", "h"), "t": _op("tanh", "pre"), "h_new": _op("mul", "t", "t")}),
        _cell({"pre": _lin("x", "h"), "t": _op("tanh", "pre"), "t2": _op("tanh", "pre"),
               "h_new": _op("mul", "t", "t2")}),
    ),
    "elementwise node duplicated under two names": (
        _cell({"a": _lin("x"), "s": _op("add", "a", "h"), "t": _op("tanh", "s"), "h_new": _op("mul", "s", "t")}),
        _cell({"a": _lin("x"), "s": _op("add", "a", "h"), "s2": _op("add", "h", "a"), "t": _op("tanh", "s2"),
               "h_new": _op("mul", "s", "t")}),
    ),
    "sub of equal operands is zero": (
        TANH_RNN,
        _cell({"pre": _lin("x", "h"), "t": _op("tanh", "pre"), "g": _op("sigmoid", "h"), "zero": _op("sub", "g", "g"),
               "h_new": _op("add", "t", "zero")}),
    ),
    "sub of equal operands, two different zeros": (
        _cell({"pre": _lin("x", "h"), "t": _op("tanh", "pre"), "zero": _op("sub", "x", "x"),
               "h_new": _op("add", "t", "zero")}),
        _cell({"pre": _lin("x", "h"), "t": _op("tanh", "pre"), "zero": _op("sub", "t", "t"),
               "h_new": _op("add", "t", "zero")}),
    ),
    "multiplying by a zero": (
        _cell({"a": _lin("x", "h"), "z": _op("sub", "h", "h"), "m": _op("mul", "a", "z"),
               "h_new": _op("add", "a", "m")}),
        _cell({"a": _lin("x", "h")}, outputs={"h": "a"}),
    ),
    "re-associated sum": (
        _cell({"a": _lin("x"), "b": _lin("h"), "c": _op("tanh", "h"), "ab": _op("add", "a", "b"),
               "h_new": _op("add", "ab", "c")}),
        _cell({"a": _lin("x"), "b": _lin("h"), "c": _op("tanh", "h"), "bc": _op("add", "b", "c"),
               "h_new": _op("add", "a", "bc")}),
    ),
    "identity inside an LSTM, downstream of the gate copies": (
        zoo.get("lstm"),
        _edit(zoo.get("lstm"), c_id=_op("identity", "c_new"), c_act=_op("tanh", "c_id")),
    ),
    "identity inside an LSTM, between a gate copy and its activation": (
        zoo.get("lstm"),
        _edit(zoo.get("lstm"), f_id=_op("identity", "f_pre"), f=_op("sigmoid", "f_id")),
    ),
    "GRU update written two ways": (
        # n + z*(h - n)  ==  z*h + (n - z*n)
        zoo.get("gru"),
        _edit(zoo.get("gru"), zh=_op("mul", "z", "h"), zn=_op("mul", "z", "n"), n_zn=_op("sub", "n", "zn"),
              h_new=_op("add", "zh", "n_zn"), h_minus_n=None, z_gap=None),
    ),
}


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_equivalent_cells_share_a_fingerprint(case):
    first, second = EQUIVALENT[case]
    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(first, use_cache=False) == fingerprint(second, use_cache=False)


def test_functional_pairs_are_not_structural_duplicates():
    # Otherwise the functional level would add nothing over the canonical hash.
    functional = [c for c in EQUIVALENT if not c.startswith("commuted")]
    for case in functional:
        first, second = EQUIVALENT[case]
        assert first.hash != second.hash, case
    for case in ("commuted operands", "commuted linear operands"):
        first, second = EQUIVALENT[case]
        assert first.hash == second.hash


LSTM = zoo.get("lstm")
GRU = zoo.get("gru")

DIFFERENT = {
    "sub operand order": (
        _cell({"a": _lin("x"), "b": _lin("h"), "h_new": _op("sub", "a", "b")}),
        _cell({"a": _lin("x"), "b": _lin("h"), "h_new": _op("sub", "b", "a")}),
    ),
    "bias constant": (TANH_RNN, _cell({"pre": _lin("x", "h", bias=1.0), "h_new": _op("tanh", "pre")})),
    "LSTM forget bias (lstm vs lstm_b)": (LSTM, zoo.get("lstm_b")),
    "diag constant": (
        _cell({"a": _lin("x"), "b": _lin("h", diag=1.0), "h_new": _op("add", "a", "b")}),
        _cell({"a": _lin("x"), "b": _lin("h", diag=0.9), "h_new": _op("add", "a", "b")}),
    ),
    "activation": (TANH_RNN, _cell({"pre": _lin("x", "h"), "h_new": _op("sigmoid", "pre")})),
    "relu vs identity": (
        _cell({"pre": _lin("x", "h"), "h_new": _op("relu", "pre")}),
        _cell({"pre": _lin("x", "h"), "h_new": _op("identity", "pre")}),
    ),
    "one linear used twice vs two copies (separate weights)": (
        _cell({"pre": _lin("x", "h"), "h_new": _op("mul", "pre", "pre")}),
        _cell({"pre": _lin("x", "h"), "pre2": _lin("x", "h"), "h_new": _op("mul", "pre", "pre2")}),
    ),
    "GRU with r and z sharing one gate": (GRU, _edit(GRU, z_pre=None, z=_op("sigmoid", "r_pre"))),
    "LSTM with input and forget gate shared": (LSTM, _edit(LSTM, f_pre=None, f=_op("sigmoid", "i_pre"))),
    "LSTM-b with the forget and output gates' roles swapped": (
        zoo.get("lstm_b"),
        _edit(zoo.get("lstm_b"), fc=_op("mul", "o", "c"), h_new=_op("mul", "f", "c_act")),
    ),
    "states swapped": (LSTM, CellSpec(states=["h", "c"], nodes=LSTM.to_dict()["nodes"],
                                      outputs={"h": "c_new", "c": "h_new"})),
    "linear over a copy of its operand vs one operand": (
        _cell({"t": _op("tanh", "h"), "pre": _lin("x", "t"), "h_new": _op("tanh", "pre")}),
        _cell({"t": _op("tanh", "h"), "t2": _op("tanh", "h"), "p": _lin("t", "t2"), "q": _lin("x"),
               "pre": _op("add", "p", "q"), "h_new": _op("tanh", "pre")}),
    ),
}


@pytest.mark.parametrize("case", list(DIFFERENT))
def test_near_misses_differ(case):
    first, second = DIFFERENT[case]
    assert first.hash != second.hash
    assert fingerprint(first) != fingerprint(second)


def test_reference_cells_all_differ():
    prints = {name: fingerprint(zoo.get(name)) for name in zoo.names()}
    assert len(set(prints.values())) == len(prints)


@pytest.mark.parametrize("name", zoo.names())
def test_every_constant_and_op_of_a_reference_cell_matters(name):
    spec = zoo.get(name)
    base = fingerprint(spec)
    seen = {base}
    for node_name, node in spec.nodes.items():
        if node.op == "linear":
            variants = [Node("linear", node.inputs, node.bias + 0.5, node.diag),
                        Node("linear", node.inputs, node.bias, node.diag + 0.5)]
        elif node.op == "sub":
            variants = [Node("sub", node.inputs[::-1]), Node("add", node.inputs)]
        elif node.op in ("add", "mul"):
            variants = [Node("mul" if node.op == "add" else "add", node.inputs)]
        else:
            variants = [Node("relu" if node.op != "relu" else "tanh", node.inputs)]
        for variant in variants:
            changed = spec.replace(nodes={**spec.nodes, node_name: variant})
            value = fingerprint(changed)
            assert value not in seen, (node_name, variant)
            seen.add(value)


# ---------------------------------------------------------------------- properties on mutated cells
@pytest.fixture(scope="module")
def children() -> list[CellSpec]:
    """Cells 1-12 mutations away from every reference cell (about 130)."""
    out = []
    for index, name in enumerate(zoo.names()):
        rng = np.random.default_rng(77 + index)
        spec = zoo.get(name)
        for _ in range(12):
            spec = mutate(spec, rng).child
            out.append(spec)
    return out


def _fresh(spec: CellSpec, base: str) -> str:
    index = 0
    while f"{base}{index}" in spec.nodes:
        index += 1
    return f"{base}{index}"


def _renamed(spec: CellSpec, rng: np.random.Generator) -> CellSpec:
    """Same graph, new node names, shuffled node order and shuffled commutative operands."""
    names = list(spec.nodes)
    fresh = [f"v{i}" for i in rng.permutation(len(names))]
    mapping = dict(zip(names, fresh)) | {i: i for i in spec.inputs}
    nodes = {}
    for index in rng.permutation(len(names)):
        node = spec.nodes[names[index]]
        inputs = [mapping[i] for i in node.inputs]
        if node.op in COMMUTATIVE:
            inputs = [inputs[i] for i in rng.permutation(len(inputs))]
        nodes[mapping[names[index]]] = ({"op": node.op, "inputs": inputs, "bias": node.bias, "diag": node.diag}
                                        if node.op == "linear" else {"op": node.op, "inputs": inputs})
    return CellSpec(states=spec.states, nodes=nodes, outputs={s: mapping[v] for s, v in spec.outputs.items()})


def _with_identity(spec: CellSpec, rng: np.random.Generator) -> CellSpec:
    """An identity node put between a random node and one of its operands."""
    names = list(spec.nodes)
    target = names[int(rng.integers(len(names)))]
    node = spec.nodes[target]
    slot = int(rng.integers(len(node.inputs)))
    inputs = list(node.inputs)
    nodes = dict(spec.nodes)
    name = _fresh(spec, "ident")
    nodes[name] = Node("identity", (inputs[slot],))
    inputs[slot] = name
    nodes[target] = Node(node.op, tuple(inputs), node.bias, node.diag)
    return spec.replace(nodes=nodes)


def _with_parameter_free_copy(spec: CellSpec, rng: np.random.Generator) -> CellSpec | None:
    """A parameter-free node copied under a new name, with some of its readers moved to the copy."""
    slots = [(user, slot, i) for user, node in spec.nodes.items() for slot, i in enumerate(node.inputs)
             if i in spec.nodes]
    # A node read once would leave its original unused (and pruned): same graph.
    counts = {i: sum(1 for _, _, j in slots if j == i) + sum(1 for v in spec.outputs.values() if v == i)
              for _, _, i in slots}
    # linear and scale nodes hold learned parameters: a copy of one is another parameter, not the same value
    readers = [(user, slot) for user, slot, i in slots if spec.nodes[i].op not in ("linear", "scale") and counts[i] > 1]
    if not readers:
        return None
    user, slot = readers[int(rng.integers(len(readers)))]
    original = spec.nodes[user].inputs[slot]
    nodes = dict(spec.nodes)
    name = _fresh(spec, "copy")
    nodes[name] = spec.nodes[original]
    inputs = list(spec.nodes[user].inputs)
    inputs[slot] = name
    nodes[user] = Node(spec.nodes[user].op, tuple(inputs), spec.nodes[user].bias, spec.nodes[user].diag)
    return spec.replace(nodes=nodes)


def _plus_zero(spec: CellSpec, rng: np.random.Generator) -> CellSpec:
    """The first state's output plus ``sub(v, v)`` for a random value v."""
    values = list(spec.inputs) + list(spec.nodes)
    value = values[int(rng.integers(len(values)))]
    nodes = dict(spec.nodes)
    zero, total = _fresh(spec, "zero"), _fresh(spec, "sum")
    nodes[zero] = Node("sub", (value, value))
    nodes[total] = Node("add", (spec.outputs[spec.output], zero))
    return spec.replace(nodes=nodes, outputs={**spec.outputs, spec.output: total})


def test_renaming_never_changes_the_fingerprint(children):
    rng = np.random.default_rng(0)
    for spec in children:
        renamed = _renamed(spec, rng)
        assert renamed.hash == spec.hash
        assert fingerprint(renamed, use_cache=False) == fingerprint(spec, use_cache=False), spec.to_dict()


@pytest.mark.parametrize("edit", [_with_identity, _with_parameter_free_copy, _plus_zero])
def test_equivalent_edits_of_mutated_cells_share_the_fingerprint(children, edit):
    rng = np.random.default_rng(1)
    changed = 0
    for spec in children:
        other = edit(spec, rng)
        if other is None:
            continue
        assert fingerprint(other) == fingerprint(spec), (edit.__name__, spec.to_dict())
        changed += other.hash != spec.hash
    assert changed > len(children) // 4  # and these were not caught by the canonical hash


def test_fingerprint_of_mutants_differs_from_parent_mostly(children):
    # A mutation changes the function almost always; the few exceptions are real equivalences
    # (e.g. relu(relu(a)) for relu(a)), never the majority.
    same = sum(fingerprint(a) == fingerprint(b) for a, b in zip(children, children[1:]))
    assert same < len(children) // 5


# ---------------------------------------------------------------------- the deduplicator
def test_deduplicator_answers_new_structural_functional():
    dedup = Deduplicator()
    lstm = zoo.get("lstm")
    assert dedup.check(lstm) == DuplicateCheck(is_new=True, kind=None, match=None)
    assert dedup.check(lstm).is_new  # check does not remember
    assert dedup.add(lstm).is_new
    assert len(dedup) == 1 and lstm in dedup
    renamed = _renamed(lstm, np.random.default_rng(3))
    assert dedup.check(renamed) == DuplicateCheck(is_new=False, kind="structural", match=lstm.hash)
    with_identity = EQUIVALENT["identity inside an LSTM, downstream of the gate copies"][1]
    assert dedup.check(with_identity) == DuplicateCheck(is_new=False, kind="functional", match=lstm.hash)
    assert dedup.add(with_identity).kind == "functional"
    # Once added, it is known under its own hash too, still pointing at the first cell with its function.
    assert dedup.check(with_identity) == DuplicateCheck(is_new=False, kind="structural", match=with_identity.hash)
    assert dedup.check(zoo.get("lstm_b")).is_new
    assert zoo.get("gru") not in dedup


def test_deduplicator_rebuilt_from_specs_gives_the_same_answers(children):
    stored, probes = children[::2], children[1::2] + [EQUIVALENT[c][1] for c in EQUIVALENT]
    original = Deduplicator()
    for spec in stored:
        original.add(spec)
    rebuilt = Deduplicator.from_specs(stored)
    assert len(rebuilt) == len(original)
    for spec in probes + stored:
        assert rebuilt.check(spec) == original.check(spec)
    assert all(not original.check(spec).is_new for spec in stored)


def test_fingerprint_rejects_non_specs():
    with pytest.raises(TypeError, match="CellSpec"):
        fingerprint(zoo.get("gru").to_dict())


def test_lazy_exports():
    import cellsearch

    assert cellsearch.Deduplicator is Deduplicator and cellsearch.fingerprint is fingerprint
