"""CellSpec: validation, normalisation, the canonical hash, file formats, rendering, reference cells."""

from __future__ import annotations

import json
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsearch import CellSpec, CellSpecError, zoo
from cellsearch.spec import COMMUTATIVE, MAX_NODES


def _rebuild(spec: CellSpec, rng: np.random.Generator) -> CellSpec:
    """The same cell with fresh random node names, shuffled node order and shuffled commutative operands."""
    names = list(spec.nodes)
    fresh = [f"n{i}_{rng.integers(1_000_000)}" for i in range(len(names))]
    mapping = dict(zip(names, fresh))
    rename = lambda value: mapping.get(value, value)  # noqa: E731
    nodes = {}
    for name in rng.permutation(names):
        node = spec.nodes[name]
        operands = [rename(o) for o in node.inputs]
        if node.op in COMMUTATIVE:
            operands = [operands[i] for i in rng.permutation(len(operands))]
        nodes[mapping[name]] = ({"op": node.op, "inputs": operands, "bias": node.bias, "diag": node.diag}
                                if node.op == "linear" else {"op": node.op, "inputs": operands})
    return CellSpec(states=spec.states, nodes=nodes, outputs={s: rename(v) for s, v in spec.outputs.items()})


@pytest.mark.parametrize("name", zoo.names())
def test_hash_is_invariant_to_renaming_and_commutative_order(name):
    spec = zoo.get(name)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert _rebuild(spec, rng).hash == spec.hash


def test_reference_cells_have_distinct_hashes():
    hashes = {zoo.get(n).hash for n in zoo.names()}
    assert len(hashes) == len(zoo.names())


def _with_node(spec: CellSpec, name: str, **changes) -> CellSpec:
    nodes = {n: v.to_dict() for n, v in spec.nodes.items()}
    nodes[name] = {**nodes[name], **changes}
    return spec.replace(nodes=nodes)


def test_hash_changes_with_op_constants_sub_order_and_output_state():
    gru = zoo.get("gru")
    assert _with_node(gru, "n", op="sigmoid").hash != gru.hash
    assert _with_node(gru, "h_minus_n", inputs=["n", "h"]).hash != gru.hash
    assert _with_node(gru, "z_pre", bias=1.0).hash != gru.hash
    assert _with_node(gru, "z_pre", diag=1.0).hash != gru.hash
    assert _with_node(gru, "z_pre", bias=1.0).hash != _with_node(gru, "z_pre", diag=1.0).hash
    lstm = zoo.get("lstm")
    swapped = CellSpec(states=("c", "h"), nodes=dict(lstm.nodes), outputs=dict(lstm.outputs))
    assert swapped.hash != lstm.hash
    renamed_states = CellSpec(
        states=("out", "mem"),
        nodes={n: {"op": v.op, "inputs": [{"h": "out", "c": "mem"}.get(i, i) for i in v.inputs],
                   "bias": v.bias, "diag": v.diag}
               if v.op == "linear" else {"op": v.op, "inputs": [{"h": "out", "c": "mem"}.get(i, i) for i in v.inputs]}
               for n, v in lstm.nodes.items()},
        outputs={"out": lstm.outputs["h"], "mem": lstm.outputs["c"]},
    )
    assert renamed_states.hash == lstm.hash


def test_hash_tells_a_shared_node_from_two_copies():
    shared = CellSpec(
        states=["h"],
        nodes={"a": {"op": "linear", "inputs": ["x", "h"]}, "m": {"op": "mul", "inputs": ["a", "a"]},
               "o": {"op": "tanh", "inputs": ["m"]}},
        outputs={"h": "o"},
    )
    copies = CellSpec(
        states=["h"],
        nodes={
            "a": {"op": "linear", "inputs": ["x", "h"]},
            "b": {"op": "linear", "inputs": ["h", "x"]},
            "m": {"op": "mul", "inputs": ["a", "b"]},
            "o": {"op": "tanh", "inputs": ["m"]},
        },
        outputs={"h": "o"},
    )
    assert shared.hash != copies.hash
    assert shared.parameter_count(4) != copies.parameter_count(4)


def test_hash_with_tied_copies_is_order_independent():
    # Two identical copies feeding different consumers: the tie between them must not leak node names.
    def build(first: str, second: str) -> CellSpec:
        return CellSpec(
            states=["h"],
            nodes={
                first: {"op": "tanh", "inputs": ["x"]},
                second: {"op": "tanh", "inputs": ["x"]},
                "s": {"op": "sub", "inputs": [first, "h"]},
                "m": {"op": "mul", "inputs": [first, second]},
                "o": {"op": "add", "inputs": ["s", "m"]},
            },
            outputs={"h": "o"},
        )

    assert build("a", "b").hash == build("b", "a").hash
    alternative = CellSpec(
        states=["h"],
        nodes={
            "a": {"op": "tanh", "inputs": ["x"]},
            "b": {"op": "tanh", "inputs": ["x"]},
            "s": {"op": "sub", "inputs": ["b", "h"]},
            "m": {"op": "mul", "inputs": ["b", "a"]},
            "o": {"op": "add", "inputs": ["m", "s"]},
        },
        outputs={"h": "o"},
    )
    assert alternative.hash == build("a", "b").hash


# Random valid cells for property tests: a random DAG over x and h with random ops.
@st.composite
def random_cells(draw):
    count = draw(st.integers(min_value=1, max_value=12))
    values = ["x", "h"]
    nodes = {}
    for index in range(count):
        op = draw(st.sampled_from(["linear", "tanh", "sigmoid", "relu", "identity", "add", "sub", "mul"]))
        if op == "linear":
            operands = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
            node = {"op": op, "inputs": operands, "bias": draw(st.sampled_from([0.0, 1.0])),
                    "diag": draw(st.sampled_from([0.0, 0.9]))}
        elif op in ("add", "sub", "mul"):
            node = {"op": op, "inputs": [draw(st.sampled_from(values)), draw(st.sampled_from(values))]}
        else:
            node = {"op": op, "inputs": [draw(st.sampled_from(values))]}
        name = f"v{index}"
        nodes[name] = node
        values.append(name)
    # Make sure x and h are read by the final node so the cell is valid.
    nodes["out"] = {"op": "linear", "inputs": sorted({"x", "h", values[-1]})}
    return CellSpec(states=["h"], nodes=nodes, outputs={"h": "out"})


@settings(max_examples=150, deadline=None)
@given(random_cells(), st.integers(min_value=0, max_value=2**31))
def test_property_hash_invariant_and_round_trips(spec, seed):
    rng = np.random.default_rng(seed)
    assert _rebuild(spec, rng).hash == spec.hash
    assert CellSpec.from_dict(json.loads(spec.to_json())) == spec
    assert CellSpec.from_dict(yaml.safe_load(spec.to_yaml())).to_dict() == spec.to_dict()
    assert CellSpec.from_networkx(spec.to_networkx()).to_dict() == spec.to_dict()


@pytest.mark.parametrize("name", zoo.names())
@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip_is_exact(tmp_path, name, suffix):
    spec = zoo.get(name)
    path = spec.save(tmp_path / f"cell{suffix}")
    loaded = CellSpec.load(path)
    assert loaded.to_dict() == spec.to_dict()
    assert loaded.hash == spec.hash
    assert loaded.save(tmp_path / f"again{suffix}").read_text() == path.read_text()


def test_networkx_view():
    spec = zoo.get("lstm")
    graph = spec.to_networkx()
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.nodes["x"]["op"] == "input"
    assert graph.graph["states"] == ["h", "c"]
    assert set(graph.predecessors("c_new")) == {"fc", "ig"}
    assert CellSpec.from_networkx(graph) == spec


def test_pruning_removes_dead_nodes():
    spec = CellSpec(
        states=["h"],
        nodes={"a": {"op": "linear", "inputs": ["x", "h"]}, "dead": {"op": "tanh", "inputs": ["a"]},
               "o": {"op": "tanh", "inputs": ["a"]}},
        outputs={"h": "o"},
    )
    assert list(spec.nodes) == ["a", "o"]


def test_spec_is_immutable():
    spec = zoo.get("gru")
    with pytest.raises(Exception):
        spec.states = ("q",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.nodes["n"] = None  # type: ignore[index]
    before = spec.to_dict()
    changed = _with_node(spec, "n", op="relu")
    assert spec.to_dict() == before and changed.nodes["n"].op == "relu"


def _base(**overrides):
    data = {
        "states": ["h"],
        "nodes": {"a": {"op": "linear", "inputs": ["x", "h"]}, "o": {"op": "tanh", "inputs": ["a"]}},
        "outputs": {"h": "o"},
    }
    data.update(overrides)
    return data


INVALID = [
    (_base(nodes={"a": {"op": "linear", "inputs": ["x", "o"]}, "o": {"op": "tanh", "inputs": ["a"]}}), "cycle"),
    (_base(nodes={"a": {"op": "conv", "inputs": ["x"]}}), "unknown op"),
    (_base(nodes={"a": {"op": "add", "inputs": ["x"]}, "o": {"op": "tanh", "inputs": ["a"]}}), "exactly 2"),
    (_base(nodes={"a": {"op": "tanh", "inputs": ["x", "h"]}, "o": {"op": "tanh", "inputs": ["a"]}}), "exactly 1"),
    (_base(nodes={"a": {"op": "linear", "inputs": []}, "o": {"op": "tanh", "inputs": ["a"]}}), "at least 1"),
    (_base(nodes={"a": {"op": "linear", "inputs": ["x", "x", "h"]}, "o": {"op": "tanh", "inputs": ["a"]}}), "distinct"),
    (_base(nodes={"a": {"op": "linear", "inputs": ["x", "nope"]}, "o": {"op": "tanh", "inputs": ["a"]}}),
     "neither a node nor an input"),
    (_base(outputs={"h": "missing"}), "neither a node nor an input"),
    (_base(outputs={}), "no output"),
    (_base(outputs={"h": "o", "c": "o"}), "not a state"),
    (_base(nodes={"a": {"op": "linear", "inputs": ["h"]}, "o": {"op": "tanh", "inputs": ["a"]}}),
     "input 'x' is never read"),
    (_base(states=["h", "c"], outputs={"h": "o", "c": "o"}), "state 'c' is never read"),
    (_base(nodes={"a b": {"op": "linear", "inputs": ["x", "h"]}}), "identifiers"),
    (_base(nodes={"x": {"op": "linear", "inputs": ["h"]}}), "taken by an input"),
    (_base(states=["x"]), "reserved"),
    (_base(states=[]), "non-empty"),
    (_base(states="h"), "non-empty"),
    (_base(nodes={"a": {"op": "linear", "inputs": ["x", "h"], "bias": float("nan")},
                  "o": {"op": "tanh", "inputs": ["a"]}}), "finite"),
    (_base(nodes={"a": {"op": "linear", "inputs": ["x", "h"], "diag": "1"}, "o": {"op": "tanh", "inputs": ["a"]}}),
     "must be a number"),
    (_base(nodes={"a": {"op": "linear", "inputs": ["x", "h"]}, "o": {"op": "tanh", "inputs": ["a"], "bias": 1}}),
     "only linear"),
    (_base(nodes={"a": {"op": "linear", "inputs": ["x", "h"], "code": "1"}, "o": {"op": "tanh", "inputs": ["a"]}}),
     "unknown key"),
    (_base(nodes={"a": {"op": "linear", "inputs": "x"}, "o": {"op": "tanh", "inputs": ["a"]}}), "list of names"),
    (_base(nodes=["a"]), "must be a mapping"),
    ({"states": ["h"], "nodes": {}}, "missing top-level key 'outputs'"),
    ({**_base(), "extra": 1}, "unknown top-level key"),
    ({**_base(), "format": 99}, "unsupported cell format"),
    ({**_base(), "hash": "0" * 64}, "the file says hash"),
    ("not a mapping", "must be a mapping"),
]


@pytest.mark.parametrize("data, message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_specs_are_rejected_with_a_clear_message(data, message):
    with pytest.raises(CellSpecError, match=message):
        CellSpec.from_dict(data)


HOSTILE_NAMES = [
    "__import__('os').system('touch /tmp/pwned')",
    "a; import os",
    "h\nimport os",
    "ё",
    "a" * 65,
    "",
    "1abc",
    "${HOME}",
    "'",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_rejected(name):
    with pytest.raises(CellSpecError, match="identifiers"):
        CellSpec.from_dict(_base(nodes={name: {"op": "linear", "inputs": ["x", "h"]},
                                        "o": {"op": "tanh", "inputs": [name]}}))
    with pytest.raises(CellSpecError, match="identifiers"):
        CellSpec.from_dict(_base(states=[name]))


@pytest.mark.parametrize("op", ["__import__", "eval", "os.system", "tanh; rm -rf /", None, 3])
def test_hostile_ops_are_rejected(op):
    with pytest.raises(CellSpecError, match="unknown op"):
        CellSpec.from_dict(_base(nodes={"a": {"op": op, "inputs": ["x", "h"]}, "o": {"op": "tanh", "inputs": ["a"]}}))


def test_huge_graph_rejected():
    nodes = {f"n{i}": {"op": "tanh", "inputs": ["x" if i == 0 else f"n{i - 1}"]} for i in range(MAX_NODES + 1)}
    with pytest.raises(CellSpecError, match="at most"):
        CellSpec.from_dict(_base(nodes=nodes))


def test_python_identifiers_that_are_builtins_are_fine():
    spec = CellSpec.from_dict(
        _base(nodes={"exec": {"op": "linear", "inputs": ["x", "h"]},
                     "__import__": {"op": "tanh", "inputs": ["exec"]}},
              outputs={"h": "__import__"})
    )
    assert "__import__" in spec.nodes


def test_yaml_loader_is_safe(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(CellSpecError, match="not valid YAML"):
        CellSpec.load(path)
    assert not (tmp_path / "pwned").exists()


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CellSpecError, match="cannot read"):
        CellSpec.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(CellSpecError, match="not valid JSON"):
        CellSpec.load(broken)
    with pytest.raises(CellSpecError, match="unknown cell file type"):
        zoo.get("gru").save(tmp_path / "cell.txt")


def test_equations_read_like_the_paper():
    text = zoo.get("gru_cho").equations()
    assert "z = sigmoid(W_xz x + W_hz h + b_z)" in text
    assert "r = sigmoid(W_xr x + W_hr h + b_r)" in text
    assert "h' = n + z_gap" in text
    lstm_b = zoo.get("lstm_b").equations()
    assert "f = sigmoid(W_xf x + W_hf h + b_f)    [b_f init 1]" in lstm_b
    assert "c' = c_new" in lstm_b
    mut1 = zoo.get("mut1").equations()
    assert "x_act = tanh(x)" in mut1 and "z = sigmoid(W_xz x + b_z)" in mut1


@pytest.mark.parametrize("engine", ["graphviz", "matplotlib"])
def test_dot_and_png(tmp_path, engine):
    import shutil
    import struct

    spec = zoo.get("lstm")
    dot = spec.to_dot()
    assert dot.startswith("digraph") and "c_new -> out_c;" in dot
    assert "{ rank=min; x h c; }" in dot and "{ rank=max; out_h out_c; }" in dot  # inputs below, states on top
    if engine == "graphviz" and shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz)")
    path = spec.draw(tmp_path / "lstm.png", engine=engine)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert height > width > 200  # a tall layered drawing, not a thumbnail


def test_reference_cell_structure():
    # Parameter counts per layer at width H: one H*H matrix per linear operand plus one bias per linear node.
    H = 10
    assert zoo.get("tanh_rnn").parameter_count(H) == 2 * H * H + H
    assert zoo.get("lstm").parameter_count(H) == 8 * H * H + 4 * H
    assert zoo.get("lstm_f").parameter_count(H) == 6 * H * H + 3 * H
    assert zoo.get("gru").parameter_count(H) == 6 * H * H + 4 * H  # nn.GRU's two n biases stay separate
    assert zoo.get("gru_cho").parameter_count(H) == 6 * H * H + 3 * H
    assert zoo.get("mut1").parameter_count(H) == 4 * H * H + 3 * H
    assert zoo.get("lstm_b").nodes["f_pre"].bias == 1.0
    assert zoo.get("lstm").nodes["f_pre"].bias == 0.0
    assert zoo.get("lstm_o").outputs["h"] == "c_act"
    assert zoo.get("mut2").nodes["r_pre"].inputs == ("x", "r_h_proj")
    with pytest.raises(KeyError, match="unknown reference cell"):
        zoo.get("transformer")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_show(tmp_path):
    result = _run_cli("show", "lstm_b", "--hidden-size", "64", "--png", str(tmp_path / "cell.png"))
    assert result.returncode == 0, result.stderr
    assert zoo.get("lstm_b").hash in result.stdout
    assert f"{zoo.get('lstm_b').parameter_count(64):,}" in result.stdout
    assert (tmp_path / "cell.png").exists()
    spec_file = zoo.get("mut3").save(tmp_path / "mine.yaml")
    result = _run_cli("show", str(spec_file))
    assert result.returncode == 0 and zoo.get("mut3").hash in result.stdout


def test_cli_show_rejects_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_base(nodes={"a": {"op": "eval", "inputs": ["x"]}})))
    result = _run_cli("show", str(bad))
    assert result.returncode == 2
    assert "unknown op" in result.stderr and "Traceback" not in result.stderr
    result = _run_cli("show", "no_such_cell")
    assert result.returncode == 2 and "neither a reference cell" in result.stderr


def test_specs_pickle_and_deepcopy():
    import copy
    import pickle

    for name in zoo.names():
        spec = zoo.get(name)
        again = pickle.loads(pickle.dumps(spec))
        assert again == spec and again.to_dict() == spec.to_dict() and again.name == spec.name
        assert copy.deepcopy(spec).to_dict() == spec.to_dict()
