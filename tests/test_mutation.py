"""The mutation engine: every child valid, compilable, reproducible and recorded; parents untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsearch import CellSpec, zoo
from cellsearch.config import ConfigError, from_mapping
from cellsearch.mutation import (
    OPERATORS,
    Mutation,
    MutationConfig,
    MutationError,
    lineage,
    mutate,
    parse_activation,
)

CHAINS_PER_CELL = 10
CHAIN_LENGTH = 20
COMPILED_CHAINS_PER_CELL = 2


def _chain(start: CellSpec, seed: int, length: int = CHAIN_LENGTH, config: MutationConfig | None = None):
    rng = np.random.default_rng(seed)
    spec = start
    for _ in range(length):
        mutation = mutate(spec, rng, config)
        yield spec, mutation
        spec = mutation.child


@pytest.fixture(scope="module")
def recorded_chains() -> list[tuple[str, CellSpec, Mutation, str]]:
    """(reference cell, parent, mutation, the parent as JSON just before it was mutated) for
    CHAINS_PER_CELL chains of CHAIN_LENGTH mutations from every reference cell."""
    out = []
    for index, name in enumerate(zoo.names()):
        for chain in range(CHAINS_PER_CELL):
            rng = np.random.default_rng(1000 * index + chain)
            parent = zoo.get(name)
            for _ in range(CHAIN_LENGTH):
                before = json.dumps(parent.to_dict(), sort_keys=True)
                mutation = mutate(parent, rng)
                out.append((name, parent, mutation, before))
                parent = mutation.child
    return out


@pytest.fixture(scope="module")
def chains(recorded_chains) -> list[tuple[str, CellSpec, Mutation]]:
    return [(name, parent, mutation) for name, parent, mutation, _ in recorded_chains]


def test_chains_give_valid_children_within_limits(chains):
    config = MutationConfig()
    assert len(chains) == len(zoo.names()) * CHAINS_PER_CELL * CHAIN_LENGTH
    for name, parent, mutation in chains:
        child = mutation.child
        assert isinstance(child, CellSpec)
        assert child.hash != parent.hash, name
        assert mutation.parent_hash == parent.hash
        assert 1 <= len(child.nodes) <= config.max_nodes
        assert any(node.op == "linear" for node in child.nodes.values())
        # a - a is identically zero (seen in a reference run before it was rejected as degenerate).
        assert not any(node.op == "sub" and node.inputs[0] == node.inputs[1] for node in child.nodes.values())
        assert child.states == parent.states
        assert 0.0 <= mutation.p <= 1.0
        assert mutation.operations
        assert mutation.attempts == 1 + sum(mutation.rejected.values())


def test_every_operator_fires(chains):
    kinds = Counter(op.kind for _, _, mutation in chains for op in mutation.operations)
    assert set(kinds) == set(OPERATORS), kinds
    # Each of the five should be a real share of the work, not a once-in-a-while event.
    assert min(kinds.values()) > 0.05 * sum(kinds.values()), kinds


def test_children_round_trip_through_the_file_format(chains, tmp_path):
    for index, (_, _, mutation) in enumerate(chains):
        child = mutation.child
        again = CellSpec.from_dict(json.loads(json.dumps(child.to_dict())))
        assert again.hash == child.hash and again.to_dict() == child.to_dict()
        if index % 15 == 0:  # YAML files are slow to parse; one child in 15 (147) is plenty
            for suffix in (".json", ".yaml"):
                path = child.save(tmp_path / f"child{suffix}")
                loaded = CellSpec.load(path)
                assert loaded.hash == child.hash and loaded.to_dict() == child.to_dict()


def test_mutation_records_round_trip_as_json(chains):
    for _, _, mutation in chains[::3]:
        data = json.loads(json.dumps(mutation.to_dict()))
        again = Mutation.from_dict(data)
        assert again.child.hash == mutation.child.hash
        assert again.operations == mutation.operations
        assert again.to_dict() == mutation.to_dict()
        assert again.describe() == mutation.describe()


def test_children_compile_and_run_forward_and_backward():
    from cellsearch import CellRNN

    hidden = 4
    generator = torch.Generator().manual_seed(0)
    compiled = 0
    for index, name in enumerate(zoo.names()):
        for chain in range(COMPILED_CHAINS_PER_CELL):
            for _, mutation in _chain(zoo.get(name), seed=50_000 + 100 * index + chain):
                child = mutation.child
                torch.manual_seed(compiled)
                rnn = CellRNN(child, input_size=hidden, hidden_size=hidden)
                inputs = (0.5 * torch.randn(3, 2, hidden, generator=generator)).requires_grad_()
                output, state = rnn(inputs)
                states = state if isinstance(state, tuple) else (state,)
                assert len(states) == len(child.states)
                loss = output.sum() + sum(s.sum() for s in states)
                loss.backward()
                assert torch.isfinite(output).all(), child.to_dict()
                assert all(torch.isfinite(s).all() for s in states)
                assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
                for parameter in rnn.parameters():
                    assert parameter.grad is None or torch.isfinite(parameter.grad).all()
                compiled += 1
    assert compiled == len(zoo.names()) * COMPILED_CHAINS_PER_CELL * CHAIN_LENGTH


@settings(max_examples=200, deadline=None, derandomize=True)
@given(name=st.sampled_from(zoo.names()), seed=st.integers(0, 2**63 - 1), steps=st.integers(1, 4))
def test_same_seed_same_child_and_parent_untouched(name, seed, steps):
    parent = zoo.get(name)
    for _, mutation in _chain(parent, seed, length=steps):
        pass
    before = parent.to_dict()
    first = mutate(mutation.child, np.random.default_rng(seed))
    second = mutate(mutation.child, np.random.default_rng(seed))
    assert first.to_dict() == second.to_dict()
    assert first.child.to_dict() == second.child.to_dict()
    assert parent.to_dict() == before and parent.hash == zoo.get(name).hash


def test_parents_never_modified(recorded_chains):
    for _, parent, _, before in recorded_chains:
        assert json.dumps(parent.to_dict(), sort_keys=True) == before
    for name in zoo.names():
        assert zoo.get(name).to_dict() == CellSpec.from_dict(dict(zoo.REFERENCE_CELLS[name], name=name)).to_dict()


_CROSS_PROCESS = """
import hashlib, json, numpy as np
from cellsearch import zoo
from cellsearch.mutation import mutate
from cellsearch.dedup import fingerprint
digest = hashlib.sha256()
for index, name in enumerate(zoo.names()):
    spec = zoo.get(name)
    rng = np.random.default_rng(index)
    for _ in range(15):
        mutation = mutate(spec, rng)
        spec = mutation.child
        digest.update(json.dumps(mutation.to_dict(), sort_keys=True).encode())
        digest.update(fingerprint(spec, use_cache=False).encode())
print(digest.hexdigest())
"""


@pytest.mark.slow
def test_same_children_and_fingerprints_in_another_process():
    # Python randomises set and str-hash order per process; nothing may depend on it.
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        result = subprocess.run([sys.executable, "-c", _CROSS_PROCESS], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout.strip())
    assert len(outputs) == 1


# ---------------------------------------------------------------------- each operator
def _only(kind: str, **extra) -> MutationConfig:
    weights = {k: (1.0 if k == kind else 0.0) for k in OPERATORS}
    return from_mapping(MutationConfig, {"weights": weights, **extra})


def _first_operations(kind: str, count: int = 300):
    """The first operation of ``count`` single-operator mutations, with the parent it was applied to."""
    config = _only(kind)
    # tanh_rnn has no add/mul/sub node for the elementwise operator to work on.
    names = [n for n in zoo.names() if kind != "elementwise" or n != "tanh_rnn"]
    seen = []
    for index in range(count):
        name = names[index % len(names)]
        parent = zoo.get(name)
        mutation = mutate(parent, np.random.default_rng(index), config)
        assert {op.kind for op in mutation.operations} == {kind}
        seen.append((parent, mutation.operations[0], mutation))
    return seen


ACTIVATION_FORMS = {("tanh", 0.0), ("sigmoid", 0.0), ("relu", 0.0), ("linear", 0.0), ("linear", 1.0), ("linear", 0.9),
                    ("linear", 1.1)}


def _form(node):
    return (node.op, node.diag)


def test_activation_operator_swaps_one_activation_for_another():
    for parent, op, _ in _first_operations("activation"):
        old = parent.nodes[op.node]
        assert dict(op.before) == {op.node: old}
        # one_minus (lstm_cifg's coupled gate) is an activation site like identity, in the set or not
        assert old.op in ("tanh", "sigmoid", "relu", "identity", "one_minus") or (
            old.op == "linear" and len(old.inputs) == 1)
        new = dict(op.after)[op.node]
        assert _form(new) in ACTIVATION_FORMS and _form(new) != _form(old)
        assert new.inputs == old.inputs and new.bias == 0.0


def test_elementwise_operator_swaps_add_mul_sub_keeping_operands():
    for parent, op, _ in _first_operations("elementwise"):
        old = parent.nodes[op.node]
        new = dict(op.after)[op.node]
        assert old.op in ("add", "mul", "sub") and new.op in ("add", "mul", "sub") and new.op != old.op
        assert new.inputs == old.inputs


def test_insert_operator_puts_an_activation_before_one_operand():
    for parent, op, _ in _first_operations("insert"):
        old = parent.nodes[op.node]
        after = dict(op.after)
        (inserted_name,) = set(after) - {op.node}
        assert inserted_name not in parent.nodes and inserted_name not in parent.inputs
        inserted, changed = after[inserted_name], after[op.node]
        assert _form(inserted) in ACTIVATION_FORMS
        slots = [i for i, (a, b) in enumerate(zip(old.inputs, changed.inputs)) if a != b]
        assert len(slots) == 1 and changed.inputs[slots[0]] == inserted_name
        assert inserted.inputs == (old.inputs[slots[0]],)
        assert (changed.op, changed.bias, changed.diag) == (old.op, old.bias, old.diag)


def test_remove_operator_rewires_users_to_an_ancestor():
    for parent, op, mutation in _first_operations("remove"):
        assert op.rewired in parent.ancestors(op.node)
        assert op.after == ()
        if len(mutation.operations) == 1:
            assert op.node not in mutation.child.nodes


def test_combine_operator_replaces_a_node_without_cycles():
    for parent, op, mutation in _first_operations("combine"):
        (new_name, new), = op.after
        assert op.rewired == new_name and new_name not in parent.nodes
        assert new.op in ("add", "mul", "sub")
        left, right = new.inputs
        assert left in parent.ancestors(op.node)
        assert right not in parent.descendants(op.node) and right != op.node
        if len(mutation.operations) == 1:
            assert new_name in mutation.child.nodes or any(v == new_name for v in mutation.child.outputs.values())


def test_describe_names_what_changed(chains):
    for _, _, mutation in chains[:50]:
        text = mutation.describe()
        assert mutation.parent_hash[:12] in text and mutation.child.short_hash in text
        for op in mutation.operations:
            assert op.node in op.describe()
    assert lineage(m for _, _, m in chains[:3]).count("\n") >= 2


# ---------------------------------------------------------------------- config and errors
def test_size_limit_is_respected():
    config = from_mapping(MutationConfig, {"max_nodes": 14})
    lstm = zoo.get("lstm")
    grew, too_large = False, 0
    for seed in range(200):
        mutation = mutate(lstm, np.random.default_rng(seed), config)
        assert len(mutation.child.nodes) <= 14
        grew |= len(mutation.child.nodes) == 14
        too_large += mutation.rejected["too_large"]
    assert grew
    assert too_large > 0  # the record says why attempts were thrown away


def test_custom_activation_set():
    config = from_mapping(MutationConfig, {"activations": ["relu", "linear(-0.5)"],
                                           "weights": {"elementwise": 0, "remove": 0, "combine": 0}})
    for seed in range(100):
        mutation = mutate(zoo.get("gru"), np.random.default_rng(seed), config)
        for op in mutation.operations:
            for name, node in op.after:
                if name != op.node or op.kind == "activation":
                    assert _form(node) in {("relu", 0.0), ("linear", -0.5)}


def test_parse_activation():
    assert parse_activation("tanh").op == "tanh"
    assert parse_activation("linear(1.1)").diag == 1.1
    assert parse_activation("linear( -2e-1 )").diag == -0.2
    for bad in ("softmax", "linear(x)", "linear(1)+1", "linear()", "linear(1e9)", "__import__('os')"):
        with pytest.raises(ConfigError):
            parse_activation(bad)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"weights": {"insert": -1}}, "weights.insert"),
        ({"weights": {"shuffle": 1}}, "weights.shuffle"),
        ({"weights": {k: 0 for k in OPERATORS}}, "weights"),
        ({"activations": ["tanh", "softmax"]}, "activations"),
        ({"activations": []}, "activations"),
        ({"activations": ["linear(1)", "linear(1.0)"]}, "activations"),
        ({"elementwise": ["add", "div"]}, "elementwise"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_nodes": "40"}, "max_nodes"),
        ({"probability": 0.5}, "probability"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_mapping(MutationConfig, data)


def test_config_round_trips_through_plain_data():
    from cellsearch.config import to_mapping

    config = from_mapping(MutationConfig, {"weights": {"remove": 0.5}, "activations": ["tanh", "linear(2)"],
                                           "max_nodes": 30})
    assert from_mapping(MutationConfig, json.loads(json.dumps(to_mapping(config)))) == config


def test_unmutatable_parent_raises_a_clear_error():
    tanh_rnn = zoo.get("tanh_rnn")  # no add/mul/sub node: the elementwise operator never applies
    with pytest.raises(MutationError, match=tanh_rnn.hash) as info:
        mutate(tanh_rnn, np.random.default_rng(0), _only("elementwise", max_attempts=7))
    assert "7 attempts" in str(info.value)


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError, match="Generator"):
        mutate(zoo.get("gru"), np.random.RandomState(0))  # noqa: NPY002 - checking that it is refused
    with pytest.raises(TypeError, match="CellSpec"):
        mutate(zoo.get("gru").to_dict(), np.random.default_rng(0))


def test_lazy_exports():
    import cellsearch

    assert (cellsearch.mutate is mutate and cellsearch.Mutation is Mutation
            and cellsearch.MutationConfig is MutationConfig)
