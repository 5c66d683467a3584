"""Hostile input: every file a user (or an attacker) hands to cellsearch is refused with one line, and nothing in
it runs.

Three kinds of file reach cellsearch from outside: cell descriptions (``.json``/``.yaml``; ``show``,
``train``, ``retrain``, ``CellSpec.load``), configs (search configs, task files with their retrain
presets, the mutation config inside a search config) and training checkpoints (``load_model``,
``load_checkpoint``, ``retrain`` resuming). For each, this module throws fuzzed structures
(hypothesis, derandomised so CI is reproducible) and a table of known attacks at the real loading
paths and the real CLI (in-process for the many fuzzed cases, a few real subprocesses), and checks:

- the library raises its own error type (CellSpecError, ConfigError, CheckpointError; all ValueError
  or UserError), never TypeError, KeyError, AttributeError, OverflowError or RecursionError;
- the CLI exits 2 with exactly one line on stderr that names the problem and no traceback;
- no input ever runs code: a canary file that every injection string and pickled payload would
  create is never created.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellsearch import zoo
from cellsearch.cli import main
from cellsearch.config import MAX_FILE_CHARS, ConfigError, from_mapping, read_data_file, to_mapping
from cellsearch.errors import UserError
from cellsearch.mutation import MutationConfig
from cellsearch.retrain import RetrainOptions, load_presets, resolve_source, retrain
from cellsearch.search.config import SearchConfig, load_search_config, resolve_ptb_dir
from cellsearch.spec import MAX_NODES, CellSpec, CellSpecError
from cellsearch.tasks import get_task
from cellsearch.training.checkpoint import CheckpointError, load_checkpoint, load_model

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
#: Every injection below would create this file if anything evaluated, expanded or executed it.
CANARY = Path(tempfile.gettempdir()) / f"cellsearch-hostile-canary-{os.getpid()}"
INJECTIONS = (
    f"__import__('os').system('touch {CANARY}')",
    f"exec(\"open('{CANARY}', 'w')\")",
    f"${{touch {CANARY}}}",
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"'; touch {CANARY}; '",
    f"{{{{ ''.__class__.__mro__[1].__subclasses__() }}}} {CANARY}",
    f"!!python/object/apply:os.system ['touch {CANARY}']",
)
HOSTILE_NAMES = ("a b", "1abc", "ё", "h\x00", "x" * 65, "", "..", "../../etc/passwd", "h\nimport os",
                 "__class__.__init__", "名前", "a\u202eb", "a-b")
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True, scope="module")
def _no_canary():
    CANARY.unlink(missing_ok=True)
    yield
    assert not CANARY.exists(), "hostile input executed code"


def _no_code_ran() -> None:
    assert not CANARY.exists(), "hostile input executed code"


# ------------------------------------------------------------------------------------------ helpers
def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``cellsearch ARGV`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as error:  # argparse
        code = error.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, command: str, *needles: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"cellsearch {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def subprocess_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_clear(error: BaseException) -> None:
    """A library error fit for the CLI's one line: short, single-line text."""
    message = str(error)
    assert message and "\n" not in message and len(message) < 1000, message


def alias_bomb(levels: int = 9) -> str:
    """A YAML flow sequence of anchors whose full expansion has 9**levels strings ("billion laughs")."""
    row = "[lol,lol,lol,lol,lol,lol,lol,lol,lol]"
    deeper = ", ".join(f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1))
    return f"[&l0 {row}, {deeper}]"


#: Plain data of every kind a parser can produce, including the awkward ones.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**63, -(2**63) - 1, 10**30, 10**400, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(INJECTIONS + HOSTILE_NAMES + ("x", "h", "c", "linear", "tanh", "add", "sub", "eval", "os.system")),
)
PLAIN = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6) | st.sampled_from(("op", "inputs", "bias", "x")), inner,
                                       max_size=4), max_leaves=10)


def _paths(data, prefix=()):
    """Every key path into nested dicts and lists (the places a corruption can go)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


REFERENCE_DICTS = [zoo.get(name).to_dict() for name in ("tanh_rnn", "gru", "lstm", "mut1")]
REFERENCE_NAMES = sorted({n for d in REFERENCE_DICTS for n in d["nodes"]})


@st.composite
def corrupted_specs(draw):
    """A reference cell with one to three parts replaced, deleted or added (a near miss is the hard case)."""
    data = copy.deepcopy(draw(st.sampled_from(REFERENCE_DICTS)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(data))))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(("replace", "replace", "name", "delete", "add")))
        value = draw(st.sampled_from(REFERENCE_NAMES + ["x", "h", "c"])) if action == "name" else draw(PLAIN)
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6) | st.sampled_from(HOSTILE_NAMES))] = value
        elif action == "add" and isinstance(parent, list):
            parent.append(value)
        else:
            parent[path[-1]] = value
    return data


SPEC_INPUTS = st.one_of(corrupted_specs(), PLAIN, st.fixed_dictionaries(
    {}, optional={key: PLAIN for key in ("format", "name", "states", "nodes", "outputs", "hash")}))


def _check_spec(data) -> None:
    """The one contract: a spec or a CellSpecError, never anything else."""
    try:
        spec = CellSpec.from_dict(data)
    except CellSpecError as error:
        assert_clear(error)
        return
    assert CellSpec.from_dict(spec.to_dict()) == spec


def _write(path: Path, data) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(data), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- 1. cell descriptions
@settings(FUZZ, max_examples=200)
@given(SPEC_INPUTS)
def test_fuzzed_structures_give_a_spec_or_a_cell_spec_error(data):
    _check_spec(data)
    _no_code_ran()


@settings(FUZZ, max_examples=60)
@given(data=corrupted_specs(), suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzzed_cell_files_through_load_and_show(tmp_path, capsys, data, suffix):
    path = _write(tmp_path / f"cell{suffix}", data)
    try:
        spec = CellSpec.load(path)
    except CellSpecError as error:
        assert_clear(error)
        assert_one_line_error(*run_cli(capsys, "show", str(path)), "show", str(path))
    else:
        assert run_cli(capsys, "show", str(path))[0] == 0, spec
    _no_code_ran()


def _base(**overrides):
    data = {"states": ["h"],
            "nodes": {"a": {"op": "linear", "inputs": ["x", "h"]}, "o": {"op": "tanh", "inputs": ["a"]}},
            "outputs": {"h": "o"}}
    data.update(overrides)
    return data


def _node(**fields):
    return _base(nodes={"a": {"op": "linear", "inputs": ["x", "h"], **fields}, "o": {"op": "tanh", "inputs": ["a"]}})


def _deep(levels: int):
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


#: (description, data, words the message must contain); test_spec.py covers the plain rule violations.
STRUCTURAL = [
    ("self loop", _base(nodes={"o": {"op": "tanh", "inputs": ["o"]}}), "cycle"),
    ("long cycle", _base(nodes={"a": {"op": "add", "inputs": ["x", "c"]}, "b": {"op": "mul", "inputs": ["a", "h"]},
                                "c": {"op": "tanh", "inputs": ["b"]}, "o": {"op": "tanh", "inputs": ["c"]}}), "cycle"),
    ("sub with three operands", _base(nodes={"o": {"op": "sub", "inputs": ["x", "h", "x"]}}), "exactly 2"),
    ("mul with one operand", _base(nodes={"o": {"op": "mul", "inputs": ["x"]}}), "exactly 2"),
    ("op as a list", _base(nodes={"o": {"op": ["tanh"], "inputs": ["x"]}}), "unknown op"),
    ("op with NUL", _base(nodes={"o": {"op": "tanh\x00", "inputs": ["x", "h"]}}), "unknown op"),
    ("op in upper case", _base(nodes={"o": {"op": "TANH", "inputs": ["x"]}}), "unknown op"),
    ("inputs as a mapping", _base(nodes={"o": {"op": "tanh", "inputs": {"x": 1}}}), "list of names"),
    ("operand is a list", _base(nodes={"o": {"op": "add", "inputs": [["x"], "h"]}}), "identifiers"),
    ("node is a string", _base(nodes={"o": "tanh(x)"}), "expected a mapping"),
    ("nodes as a list", _base(nodes=[{"op": "tanh"}]), "must be a mapping"),
    ("outputs as a list", _base(outputs=["o"]), "must map every state"),
    ("output target a list", _base(outputs={"h": ["o"]}), "neither a node nor an input"),
    ("states a mapping", _base(states={"h": 1}), "non-empty list"),
    ("nine states", _base(states=[f"s{i}" for i in range(9)]), "at most 8 states"),
    ("duplicate states", _base(states=["h", "h"]), "distinct"),
    ("bias 10**400", _node(bias=10**400), "finite and within"),
    ("diag -inf", _node(diag=float("-inf")), "finite and within"),
    ("bias true", _node(bias=True), "must be a number"),
    ("bias a list", _node(bias=[1]), "must be a number"),
    ("format true", {**_base(), "format": True}, "unsupported cell format"),
    ("format 1.0", {**_base(), "format": 1.0}, "unsupported cell format"),
    ("format nested 10**5 deep", lambda: {**_base(), "format": _deep(100_000)}, "unsupported cell format"),
    ("hash nested 10**5 deep", lambda: {**_base(), "hash": _deep(100_000)}, "the file says hash"),
    ("output nested 10**5 deep", lambda: _base(outputs={"h": _deep(100_000)}), "neither a node nor an input"),
    ("top-level key nested", {**_base(), ("a", ("b",)): 1}, "unknown top-level key"),
    ("name a list", _base(name=["gru"]), "'name' must be"),
    ("name with a newline", _base(name="gru\nhash: 0"), "'name' must be"),
    ("name with NUL", _base(name="gru\x00"), "'name' must be"),
    ("name 10,000 characters", _base(name="g" * 10_000), "'name' must be"),
    ("100k nodes", lambda: _base(nodes={f"n{i}": {"op": "tanh", "inputs": ["x"]} for i in range(100_000)}),
     f"at most {MAX_NODES} nodes"),
    ("not a mapping", [_base()], "must be a mapping"),
]


@pytest.mark.parametrize("data, needle", [case[1:] for case in STRUCTURAL], ids=[case[0] for case in STRUCTURAL])
def test_structural_attacks_are_cell_spec_errors(data, needle):
    with pytest.raises(CellSpecError, match=needle) as caught:
        CellSpec.from_dict(data() if callable(data) else data)  # the big ones are built when used
    assert_clear(caught.value)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("place", ["node", "state", "operand", "output"])
def test_hostile_names_in_every_place(name, place):
    data = {
        "node": _base(nodes={name: {"op": "linear", "inputs": ["x", "h"]}, "o": {"op": "tanh", "inputs": [name]}}),
        "state": _base(states=[name], outputs={name: "o"}),
        "operand": _base(nodes={"a": {"op": "linear", "inputs": ["x", "h", name]},
                                "o": {"op": "tanh", "inputs": ["a"]}}),
        "output": _base(outputs={"h": name}),
    }[place]
    with pytest.raises(CellSpecError) as caught:
        CellSpec.from_dict(data)
    assert_clear(caught.value)


def _places(value):
    """A spec with ``value`` in each of its fields in turn."""
    node = {"op": "linear", "inputs": ["x", "h"]}
    return {
        "name": _base(name=value), "format": {**_base(), "format": value}, "hash": {**_base(), "hash": value},
        "top-level key": {**_base(), value: 1}, "state": _base(states=[value]), "states": _base(states=value),
        "node name": _base(nodes={value: node, "o": {"op": "tanh", "inputs": [value]}}),
        "op": _base(nodes={"a": {**node, "op": value}, "o": {"op": "tanh", "inputs": ["a"]}}),
        "operand": _base(nodes={"a": {**node, "inputs": ["x", value]}, "o": {"op": "tanh", "inputs": ["a"]}}),
        "inputs": _base(nodes={"a": {**node, "inputs": value}, "o": {"op": "tanh", "inputs": ["a"]}}),
        "bias": _node(bias=value), "diag": _node(diag=value), "node key": _node(**{value: 1}),
        "output": _base(outputs={"h": value}), "output state": _base(outputs={value: "o", "h": "o"}),
        "nodes": _base(nodes=value), "outputs": _base(outputs=value),
    }


@pytest.mark.parametrize("injection", INJECTIONS)
def test_code_injection_in_every_field_is_data(tmp_path, capsys, injection):
    for place, data in _places(injection).items():
        if place == "name":
            # A name is a label: any one line of printable text, shown, never run.
            assert CellSpec.from_dict(data).name == injection
            continue
        with pytest.raises(CellSpecError) as caught:
            CellSpec.from_dict(data)
        assert_clear(caught.value)
    # The same through files and the CLI, JSON and YAML.
    for index, (place, data) in enumerate(_places(injection).items()):
        for suffix in (".json", ".yaml"):
            path = _write(tmp_path / f"{index}{suffix}", data)
            code, stderr = run_cli(capsys, "show", str(path))
            assert code in (0, 2) and "Traceback" not in stderr, (place, stderr)
            assert len(stderr.strip().splitlines()) <= 1, (place, stderr)
    _no_code_ran()


#: Files no parser should accept, or whose content is an attack on the parser: (name, text, message words).
BAD_FILES = [
    ("python-object.yaml", f"!!python/object/apply:os.system ['touch {CANARY}']\n", "not valid YAML"),
    ("python-in-field.yaml", f"states: [h]\nname: !!python/object/apply:os.system ['touch {CANARY}']\n",
     "not valid YAML"),
    ("python-new.yaml", "nodes: !!python/object/new:subprocess.Popen [['touch', '" + str(CANARY) + "']]\n",
     "not valid YAML"),
    ("python-name.yaml", "states: !!python/name:os.system\n", "not valid YAML"),
    ("python-module.yaml", "states: !!python/module:os\n", "not valid YAML"),
    ("duplicate.yaml", "states: [h]\nstates: [c]\nnodes: {}\noutputs: {}\n", "duplicate key 'states'"),
    ("duplicate.json", '{"states": ["h"], "states": ["c"], "nodes": {}, "outputs": {}}', "duplicate key 'states'"),
    ("duplicate-node.yaml", "states: [h]\nnodes:\n  a: {op: tanh, inputs: [x]}\n  a: {op: relu, inputs: [h]}\n"
     "outputs: {h: a}\n", "duplicate key 'a'"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("deep.yaml", "[" * 100_000 + "]" * 100_000, "not valid YAML"),
    ("deep-map.yaml", "{a: " * 50_000 + "1" + "}" * 50_000, "not valid YAML"),
    ("huge-int.json", '{"format": ' + "9" * 5000 + "}", "not valid JSON"),
    ("huge-int.yaml", "format: " + "9" * 5000 + "\n", "not valid YAML"),
    ("nul.yaml", "states: [h\x00]\n", "not valid YAML"),
    ("nul.json", '{"states": ["h\\u0000"], "nodes": {}, "outputs": {}}', "identifiers"),
    ("empty.yaml", "", "must be a mapping, got NoneType"),
    ("empty.json", "", "not valid JSON"),
    ("scalar.yaml", "42\n", "must be a mapping, got int"),
    ("bomb-hash.yaml",
     f"states: [h]\nnodes: {{a: {{op: linear, inputs: [x, h]}}}}\noutputs: {{h: a}}\nhash: {alias_bomb()}\n",
     "the file says hash"),
    ("bomb-name.yaml", f"name: {alias_bomb()}\nstates: [h]\nnodes: {{}}\noutputs: {{}}\n", "'name' must be"),
    ("bomb-op.yaml", f"states: [h]\nnodes: {{a: {{op: {alias_bomb()}, inputs: [x]}}}}\noutputs: {{h: a}}\n",
     "unknown op"),
    ("bomb-outputs.yaml", f"states: [h]\nnodes: {{a: {{op: tanh, inputs: [x]}}}}\noutputs: {{h: {alias_bomb()}}}\n",
     "neither a node nor an input"),
    ("bomb-format.yaml", f"format: {alias_bomb()}\n", "unsupported cell format"),
    ("bomb-inputs.yaml", f"states: [h]\nnodes: {{a: {{op: tanh, inputs: {alias_bomb()}}}}}\noutputs: {{h: a}}\n",
     "identifiers"),
    ("huge-graph.json", lambda: json.dumps(_base(nodes={f"n{i}": {"op": "tanh", "inputs": ["x"]}
                                                        for i in range(100_000)})), "too large"),
    ("huge-graph.yaml", lambda: "states: [h]\noutputs: {h: n0}\nnodes:\n"
     + "".join(f"  n{i}: {{op: tanh, inputs: [x]}}\n" for i in range(100_000)), "too large"),
    ("wide-graph.json", lambda: json.dumps(_base(nodes={f"n{i}": {"op": "tanh", "inputs": ["x"]}
                                                        for i in range(20_000)})), f"at most {MAX_NODES} nodes"),
]


@pytest.mark.parametrize("name, text, needle", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_cell_files_are_refused_by_load_and_every_cli_entry_point(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text() if callable(text) else text, encoding="utf-8")
    with pytest.raises(CellSpecError, match=needle) as caught:
        CellSpec.load(path)
    assert_clear(caught.value)
    for command, *rest in (("show",), ("train", "--task", "memorize", "--profile", "smoke"),
                           ("retrain", "--task", "memorize", "--preset", "tiny", "--in-process", "--out",
                            str(tmp_path / "out"))):
        assert_one_line_error(*run_cli(capsys, command, str(path), *rest), command, needle.split("'")[0])
    assert not (tmp_path / "out").exists()
    _no_code_ran()


def test_binary_and_oversized_cell_files(tmp_path, capsys):
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x80garbage")
    (tmp_path / "big.yaml").write_text("#" * (MAX_FILE_CHARS + 1))
    (tmp_path / "dir.json").mkdir()
    for name, needle in (("binary.json", "cannot read cell file"), ("big.yaml", "too large"),
                         ("missing.yaml", "no cell file"), ("dir.json", "no cell file")):
        assert_one_line_error(*run_cli(capsys, "show", str(tmp_path / name)), "show", needle)


def test_a_fifo_as_config_or_task_file_is_refused_without_blocking(tmp_path, capsys):
    """A named pipe would block the read forever (nothing writes to it): refused as not a regular file."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    assert_one_line_error(*run_cli(capsys, "search", str(fifo)), "search", "not a regular file")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_data_file(fifo)


@pytest.mark.parametrize("content", ["[1]", '{"run_id": 5, "storage": "sqlite:///x"}', "{", '"x" ' * 10])
def test_a_damaged_run_file_is_one_line_for_resume_and_top(tmp_path, capsys, content):
    (tmp_path / "run.json").write_text(content)
    for command in ("resume", "top"):
        assert_one_line_error(*run_cli(capsys, command, str(tmp_path)), command, "run")


def test_a_real_subprocess_refuses_hostile_cells_in_one_line(tmp_path):
    """The installed entry point, for a handful of attacks: exit 2, one line, no traceback, no canary."""
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"!!python/object/apply:os.system ['touch {CANARY}']\n")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        f"states: [h]\nnodes: {{a: {{op: linear, inputs: [x, h]}}}}\noutputs: {{h: a}}\nhash: {alias_bomb()}\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    injected = tmp_path / "injected.json"
    injected.write_text(json.dumps(_base(nodes={"a": {"op": INJECTIONS[0], "inputs": ["x"]}})))
    for argv, needle in (
        (["show", str(evil)], "not valid YAML"),
        (["train", str(bomb), "--task", "memorize"], "the file says hash"),
        (["retrain", str(deep), "--task", "memorize", "--out", str(tmp_path / "out")], "nested too deeply"),
        (["show", str(injected)], "unknown op"),
    ):
        completed = subprocess_cli(*argv)
        assert_one_line_error(completed.returncode, completed.stderr, argv[0], needle)
    _no_code_ran()


def test_retrain_labels_from_hostile_names_stay_inside_the_output_directory(tmp_path):
    spec = zoo.get("gru").replace(name="../../etc/x")
    path = spec.save(tmp_path / "cell.json")
    (cell,) = resolve_source(str(path))
    assert "/" not in cell.label and not cell.label.startswith(".") and cell.label
    out = (tmp_path / "out").resolve()
    run_dir = (out / "runs" / cell.label / "seed-0").resolve()
    assert out in run_dir.parents


# ------------------------------------------------------------------------------------------ 2. configs
SEARCH_FIELDS = [f.name for f in dataclasses.fields(SearchConfig)]
DEFAULTS = to_mapping(SearchConfig())


def _near_values(key: str):
    """Values around a key's default: the type the key wants, wrong types beside it, edge numbers."""
    default = DEFAULTS[key]
    near = [default, None, True, False, 0, -1, 1, 2**63, 10**400, 1.5, float("nan"), float("inf"), "", "1", [default],
            {"x": default}]
    if isinstance(default, dict):
        near += [{**default, k: v} for k in default for v in (0, -1, 10**9, "x", None, True, 1e308)]
    if key == "mutation":
        near += [{"max_nodes": v} for v in (0, 1, 500, 501, True)] + [{"weights": {"insert": v}} for v in (-1, 0, "x")]
    if key == "storage":
        near += ["garbage", "sqlite://", "sqlite:///relative.db", "sqlite:////abs/run.db", "mysql://u@h/db",
                 "postgresql://user@host/db", "sqlite:///:memory:"]
    if key in ("tasks", "initial_cells"):
        near += [["ptb"], ["arithmetic", "arithmetic"], ["../../etc/passwd"], ["gru", "lstm", "mut1"], []]
    if key == "device":
        near += ["cuda:0", "cuda:-1", "evil", "cpu; rm -rf /"]
    return st.sampled_from(near) | PLAIN


SEARCH_CONFIGS = st.dictionaries(
    st.sampled_from(SEARCH_FIELDS + ["evil", "resources.num_cpus", INJECTIONS[0]]),
    st.deferred(lambda: st.one_of(PLAIN, *[_near_values(k) for k in ("population_size", "resources", "mutation",
                                                                      "storage", "tasks", "device", "batching")])),
    max_size=6)


def _check_config(path: Path) -> SearchConfig | None:
    try:
        return load_search_config(path)
    except ConfigError as error:
        assert_clear(error)
        assert str(path) in str(error)
        return None


@settings(FUZZ, max_examples=150)
@given(data=st.one_of(SEARCH_CONFIGS, PLAIN, st.sampled_from(SEARCH_FIELDS).flatmap(
    lambda key: _near_values(key).map(lambda value: {key: value}))))
def test_fuzzed_search_configs_load_or_fail_with_a_config_error(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    config = _check_config(path)
    if config is not None:
        # What loads round-trips: the resolved config a run directory stores reads back the same.
        assert from_mapping(SearchConfig, yaml.safe_load(config.to_yaml())) == config
    _no_code_ran()


@settings(FUZZ, max_examples=40)
@given(data=SEARCH_CONFIGS)
def test_fuzzed_search_configs_through_the_cli(tmp_path, capsys, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    run_dir = tmp_path / "run"
    code, stderr = run_cli(capsys, "search", str(path), "--max-steps", "0", "--executor", "serial",
                           "--run-dir", str(run_dir))
    # --max-steps 0 is itself refused, after the file: a valid file gets that message, a bad one its own.
    accepted = _check_config(path) is not None
    assert_one_line_error(code, stderr, "search", "max_steps: 0" if accepted else str(path))
    assert not run_dir.exists()
    _no_code_ran()


SEARCH_CASES = [
    ("empty file", "", None),
    ("null", "null\n", None),
    ("a list", "- tasks\n", "expected a mapping, got list"),
    ("a scalar", "42\n", "expected a mapping, got int"),
    ("unknown key", "tasks: [xml]\ncolour: red\n", "unknown key colour"),
    ("nested unknown key", "resources: {cpus: 2}\n", "unknown key resources.cpus"),
    ("duplicate key", "seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    ("string for int", "population_size: '10'\n", "population_size: expected an integer"),
    ("bool for int", "population_size: true\n", "population_size: expected an integer"),
    ("bool for float", "reevaluate_probability: false\n", "reevaluate_probability: expected a number"),
    ("list for scalar", "seed: [1]\n", "seed: expected an integer"),
    ("mapping for list", "tasks: {xml: 1}\n", "tasks: expected a list"),
    ("string for list", "tasks: xml\n", "tasks: expected a list"),
    ("set for list", "tasks: !!set {xml}\n", "tasks: expected a list"),
    ("negative", "population_size: -3\n", "population_size: -3 is out of range"),
    ("zero", "settings_per_task: 0\n", "settings_per_task: 0 is out of range"),
    ("nan", "early_stop_fraction: .nan\n", "expected a finite number"),
    ("inf", "max_wall_clock_s: .inf\n", "expected a finite number"),
    ("huge int", f"seed: {2**64}\n", "does not fit in a 64-bit integer"),
    ("huge int for float", f"max_wall_clock_s: {10**400}\n", "expected a finite number"),
    ("5000 digits", "seed: " + "9" * 5000 + "\n", "not valid YAML"),
    ("probability above 1", "memorize_threshold: 1.5\n", "memorize_threshold: 1.5 is out of range"),
    ("unknown task", "tasks: ['../../etc/passwd']\n", "unknown task"),
    ("unknown cell", "initial_cells: [gru, transformer]\n", "unknown cell transformer"),
    ("literal of wrong type", "budget_profile: [paper]\n", "expected one of"),
    ("mutation not a mapping", "mutation: [1]\n", "mutation: expected a mapping"),
    ("mutation unknown key", "mutation: {evil: 1}\n", "unknown key mutation.evil"),
    ("mutation bool for int", "mutation: {max_nodes: true}\n", "mutation.max_nodes: expected an integer"),
    ("mutation all weights zero", "mutation: {weights: {activation: 0, elementwise: 0, insert: 0, remove: 0, "
     "combine: 0}}\n", "positive weight"),
    ("mutation unknown op", "mutation: {activations: [eval]}\n", "mutation.activations"),
    ("cpus huge", "resources: {num_cpus: 1.0e+308}\n", "resources.num_cpus"),
    ("cpus zero", "resources: {num_cpus: 0}\n", "resources.num_cpus"),
    ("gpus negative", "resources: {num_gpus: -1}\n", "resources.num_gpus"),
    ("device", "device: evil\n", "device: 'evil' is out of range"),
    ("storage garbage", "storage: garbage\n", "storage: not a database URL"),
    ("storage relative sqlite", "storage: sqlite:///run.db\n", "absolute path"),
    ("storage in memory", "storage: 'sqlite://'\n", "absolute path"),
    ("storage unsupported", "storage: mysql://u@h/db\n", "unsupported database 'mysql'"),
    ("storage empty", "storage: ''\n", "storage: not a database URL"),
    ("ptb_dir empty", "ptb_dir: ''\n", "ptb_dir: empty"),
    ("python tag", f"seed: !!python/object/apply:os.system ['touch {CANARY}']\n", "not valid YAML"),
    ("alias bomb", f"tasks: {alias_bomb()}\n", "tasks[0]: expected a string"),
    ("alias bomb key", f"{alias_bomb()}: 1\n", "not valid YAML"),
    ("deep", "tasks: " + "[" * 100_000 + "]" * 100_000 + "\n", "not valid YAML"),
    ("NUL", "seed: 1\x00\n", "not valid YAML"),
    ("too large", "#" * (MAX_FILE_CHARS + 1), "too large"),
]


@pytest.mark.parametrize("text, needle", [case[1:] for case in SEARCH_CASES], ids=[case[0] for case in SEARCH_CASES])
def test_search_config_attacks(tmp_path, capsys, text, needle):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    if needle is None:  # every key has a default: an empty config is the paper's search
        assert load_search_config(path) == SearchConfig()
        return
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")) as caught:
        load_search_config(path)
    assert_clear(caught.value)
    assert_one_line_error(*run_cli(capsys, "search", str(path), "--executor", "serial", "--run-dir",
                                   str(tmp_path / "run")), "search", needle)
    assert not (tmp_path / "run").exists()
    _no_code_ran()


def test_search_config_accepts_real_storage_urls_and_only_those():
    for url in ("sqlite:////srv/runs/run.db", "sqlite:///file:/srv/run.db?mode=ro&uri=true",
                "postgresql://user@db.example/cellsearch", "postgresql+psycopg2://user:secret@db:5432/cs"):
        assert from_mapping(SearchConfig, {"storage": url}).storage == url
    with pytest.raises(ConfigError) as caught:
        from_mapping(SearchConfig, {"storage": "postgresql://user:secret@host:notaport/db"})
    assert "secret" not in str(caught.value)  # a URL that fails to parse is not echoed: it may hold a password


def test_ptb_dir_may_be_anywhere_but_must_exist(tmp_path, monkeypatch, ptb_dir):
    monkeypatch.delenv("CELLSEARCH_PTB_DIR", raising=False)
    # Outside the repository and given relative to the working directory: accepted, stored absolute.
    monkeypatch.chdir(ptb_dir.parent)
    config = from_mapping(SearchConfig, {"tasks": ["ptb"], "ptb_dir": ptb_dir.name})
    assert resolve_ptb_dir(config) == str(ptb_dir.resolve())
    for missing in (str(tmp_path / "nope"), str(tmp_path / "file.txt")):
        (tmp_path / "file.txt").write_text("x")
        with pytest.raises(UserError, match="ptb_dir: no directory"):
            resolve_ptb_dir(from_mapping(SearchConfig, {"tasks": ["xml"], "ptb_dir": missing}))
    with pytest.raises(UserError, match="no ptb.train.txt"):
        resolve_ptb_dir(from_mapping(SearchConfig, {"tasks": ["ptb"], "ptb_dir": str(tmp_path)}))


def _task_file(tmp_path: Path, name: str, change) -> Path:
    data = yaml.safe_load((REPO / "tasks" / "memorize.yaml").read_text())
    change(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _set(*keys, value):
    def change(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value
    return change


#: Task files (and the retrain presets inside them): (case, change, message words).
TASK_CASES = [
    ("unknown kind", _set("kind", value="os"), "kind: expected one of"),
    ("kind as a list", _set("kind", value=["memorize"]), "kind: expected one of"),
    ("unknown data key", _set("data", "evil", value=1), "unknown key data.evil"),
    ("bool for int", _set("data", "length", value=True), "data.length: expected an integer"),
    ("stream too long", _set("data", "train_tokens", value=10**15), "data.train_tokens"),
    ("seed too large", _set("data", "seed", value=2**70), "data.seed: 1180591620717411303424 does not fit in a 64-bit"),
    ("batch size huge", _set("batch_size", value=10**12), "batch_size"),
    ("unroll zero", _set("unroll", value=0), "unroll"),
    ("metric", _set("metric", value="eval"), "metric"),
    ("space empty", _set("space", "init_scale", value=[]), "space.init_scale"),
    ("space string", _set("space", "learning_rate", value="0.1"), "space.learning_rate: expected a list"),
    ("profiles missing", _set("profiles", value={}), "profiles: missing"),
    ("profile budget negative", _set("profiles", "smoke", "budget", "max_epochs", value=-1), "max_epochs"),
    ("defaults unknown", _set("defaults", "evil", value=1), "unknown key defaults.evil"),
    ("name traversal", _set("name", value="../../etc"), "name: '../../etc' is out of range"),
    ("name injection", _set("name", value=INJECTIONS[0]), "name:"),
    ("preset not a mapping", _set("retrain_presets", value=[1]), "retrain_presets: expected a mapping"),
    ("preset unknown key", _set("retrain_presets", "tiny", "evil", value=1), "unknown key retrain_presets.tiny.evil"),
    ("preset nan", _set("retrain_presets", "tiny", "hparams", "init_scale", value=float("nan")), "finite"),
    ("preset bool for int", _set("retrain_presets", "tiny", "budget", "max_epochs", value=True), "expected an integer"),
    ("preset layers huge", _set("retrain_presets", "tiny", "hparams", "num_layers", value=10**6), "num_layers"),
    ("preset dropout 1", _set("retrain_presets", "tiny", "hparams", "dropout", value=1.0), "dropout"),
]


@pytest.mark.parametrize("change, needle", [case[1:] for case in TASK_CASES], ids=[case[0] for case in TASK_CASES])
def test_task_file_and_preset_attacks(tmp_path, capsys, change, needle):
    path = _task_file(tmp_path, "task", change)
    # The data section is read when the task is built; presets are read without it.
    for load in (get_task,) if "data." in needle else (get_task, load_presets):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as caught:
            load(str(path))
        assert_clear(caught.value)
    assert_one_line_error(*run_cli(capsys, "train", "gru", "--task", str(path)), "train", needle)
    assert_one_line_error(*run_cli(capsys, "retrain", "gru", "--task", str(path), "--in-process", "--out",
                                   str(tmp_path / "out")), "retrain", needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needle", [
    ("", "expected a mapping at the top level"), ("- 1\n", "expected a mapping at the top level"),
    ("kind: memorize\nkind: xml\n", "duplicate key 'kind'"), (f"kind: {alias_bomb()}\n", "kind: expected one of"),
    (f"kind: !!python/object/apply:os.system ['touch {CANARY}']\n", "not valid YAML"),
])
def test_task_files_that_are_not_task_files(tmp_path, capsys, text, needle):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        get_task(str(path))
    assert_one_line_error(*run_cli(capsys, "train", "gru", "--task", str(path)), "train", needle)
    _no_code_ran()


def test_budget_overrides_that_cannot_batch_are_config_errors(capsys):
    # eval_tokens below the held-out batch size used to escape as a ValueError from batchify.
    assert_one_line_error(*run_cli(capsys, "train", "gru", "--task", "memorize", "--profile", "smoke", "--set",
                                   "eval_tokens=3", "--no-progress"), "train", "too short for batch size")


@settings(FUZZ, max_examples=150)
@given(data=st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(MutationConfig)] + ["evil"]),
                            PLAIN | st.sampled_from([0, 1, 500, 501, -1, True, ["tanh"], ["eval"], []]), max_size=4))
def test_fuzzed_mutation_configs(data):
    try:
        from_mapping(MutationConfig, data)
    except ConfigError as error:
        assert_clear(error)


# -------------------------------------------------------------------------------------- 3. checkpoints
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A finished one-run retrain (gru, memorize tiny): a real checkpoint to tamper with."""
    out = tmp_path_factory.mktemp("retrain")
    retrain(resolve_source("gru"), "memorize", "tiny", out, RetrainOptions(seeds=1, baselines=(), in_process=True))
    return out


def _checkpoint(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / "runs" / "gru" / "seed-0" / "checkpoint.pt"


class _System:
    """Pickles as ``os.system('touch CANARY')``: full unpickling would create the canary."""

    def __reduce__(self):
        return (os.system, (f"touch {CANARY}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the hand-made pickles
def test_files_that_are_not_checkpoints(tmp_path, checkpoint_dir):
    content = _checkpoint(checkpoint_dir).read_bytes()
    files = {
        "truncated-zip.pt": content[: len(content) - 100],
        "header-only.pt": content[:64],
        "random.pt": np.random.default_rng(7).bytes(10_000),
        "empty.pt": b"",
        "text.pt": b'{"format": "cellsearch-checkpoint"}',
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"not a pickle")
        archive.writestr("archive/version", b"3\n")
    files["zip-not-torch.pt"] = buffer.getvalue()
    files["plain-pickle.pt"] = pickle.dumps(_System())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_System()))
        archive.writestr("evil/version", b"3\n")
        archive.writestr("evil/byteorder", b"little")
    files["zip-with-pickled-code.pt"] = buffer.getvalue()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        for load in (load_checkpoint, load_model):
            with pytest.raises(CheckpointError) as caught:
                load(tmp_path / name)
            assert_clear(caught.value)
            assert "not a readable checkpoint" in str(caught.value) or "pickled Python objects" in str(caught.value) \
                or "not a cellsearch checkpoint" in str(caught.value), (name, str(caught.value))
    (tmp_path / "a-directory.pt").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_model(tmp_path / "a-directory.pt")
    _no_code_ran()


@pytest.mark.parametrize("where", ["top", "config", "model", "loop", "result"])
def test_pickled_code_anywhere_in_a_checkpoint_never_runs(tmp_path, checkpoint_dir, where):
    data = torch.load(_checkpoint(checkpoint_dir), weights_only=True)
    payload = _System()
    evil = {
        "top": payload,
        "config": {**data, "config": {"x": payload}},
        "model": {**data, "model": {**data["model"], "extra": payload}},
        "loop": {**data, "loop": {**data["loop"], "carried": [payload]}},
        "result": {**data, "result": payload},
    }[where]
    torch.save(evil, tmp_path / "evil.pt")
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="pickled Python objects") as caught:
            load(tmp_path / "evil.pt")
        assert_clear(caught.value)
    _no_code_ran()


def _tamper(*keys, value):
    def change(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value(data[keys[-1]]) if callable(value) else value
    return change


#: (case, change, message words): every field a reader uses, with the wrong type, range, shape or dtype.
CHECKPOINT_CASES = [
    ("version true", _tamper("version", value=True), "format version True"),
    ("vocab string", _tamper("vocab_size", value="28"), "vocab_size must be a positive integer"),
    ("vocab bool", _tamper("vocab_size", value=True), "vocab_size must be a positive integer"),
    ("width zero", _tamper("hidden_size", value=0), "hidden_size must be a positive integer"),
    ("width huge", _tamper("hidden_size", value=10**7), "do not fit"),
    ("vocab huge", _tamper("vocab_size", value=10**12), "do not fit"),
    ("layers huge", _tamper("num_layers", value=10**6), "num_layers must be an integer in 1..16"),
    ("dropout 2", _tamper("dropout", value=2.0), "dropout must be a number in [0, 1)"),
    ("hparams list", _tamper("hparams", value=[1]), "hparams must be a mapping"),
    ("seed negative", _tamper("seed", value=-1), "seed must be a non-negative integer"),
    ("epoch string", _tamper("epoch", value="3"), "epoch must be"),
    ("finished int", _tamper("finished", value=1), "finished must be true or false"),
    ("task list", _tamper("task", value=["memorize"]), "task must be a string"),
    ("model list", _tamper("model", value=[1]), "model must be a mapping of names to tensors"),
    ("model numbers", _tamper("model", value=lambda m: {k: 1.0 for k in m}), "model must be a mapping"),
    ("best list", _tamper("best_model", value=[1]), "best_model must be null or a mapping"),
    ("weights wrong shape", _tamper("model", value=lambda m: {k: torch.zeros(2, 2) for k in m}), "do not fit"),
    ("weights float64", _tamper("best_model", value=lambda m: {k: v.double() for k, v in m.items()}), "torch.float64"),
    ("weights int", _tamper("model", value=lambda m: {k: v.long() for k, v in m.items()}), "torch.int64"),
    ("weights complex", _tamper("best_model", value=lambda m: {k: v.to(torch.complex64) for k, v in m.items()}),
     "torch.complex64"),
    ("weight missing", _tamper("model", value=lambda m: dict(list(m.items())[1:])), "missing"),
    ("weights NaN", _tamper("model", value=lambda m: {k: torch.full_like(v, float("nan")) for k, v in m.items()}),
     "NaN or infinite"),
    ("best weight inf", _tamper("best_model", value=lambda m: {k: v.clone().fill_(float("inf")) if i == 0 else v
                                                               for i, (k, v) in enumerate(m.items())}),
     "NaN or infinite"),
    ("weight extra", _tamper("best_model", value=lambda m: {**m, "evil": torch.zeros(1)}), "unexpected 'evil'"),
    ("loop list", _tamper("loop", value=[1]), "loop must be a mapping"),
    ("row negative", _tamper("loop", "row", value=-5), "loop.row must be a non-negative integer"),
    ("carried string", _tamper("loop", "carried", value="h"), "loop.carried must be"),
    ("schedule missing", _tamper("loop", "schedule", value=lambda s: {k: v for k, v in s.items() if k != "patience"}),
     "lacks loop.schedule.patience"),
    ("learning rate string", _tamper("loop", "schedule", "learning_rate", value="1"), "loop.schedule.learning_rate"),
    ("learning rate NaN", _tamper("loop", "schedule", "learning_rate", value=float("nan")), "finite positive"),
    ("learning rate negative", _tamper("loop", "schedule", "learning_rate", value=-1.0), "finite positive"),
    ("decay factor 5", _tamper("loop", "schedule", "factor", value=5.0), "loop.schedule.factor"),
    ("curve without scores", _tamper("loop", "run_state", "curve", value=[{"epoch": 1}]), "loop.run_state.curve"),
    ("rng float", _tamper("rng", "torch", value=lambda t: t.float()), "rng.torch must be a byte tensor"),
    ("spec not a cell", _tamper("spec", value={"states": ["h"], "nodes": {"a": {"op": "eval", "inputs": ["x"]}},
                                               "outputs": {"h": "a"}}), "unknown op"),
    ("spec hash list", _tamper("spec_hash", value=[1]), "spec_hash must be a string"),
]


@pytest.mark.parametrize("change, needle", [case[1:] for case in CHECKPOINT_CASES],
                         ids=[case[0] for case in CHECKPOINT_CASES])
def test_tampered_checkpoints_are_refused(tmp_path, checkpoint_dir, change, needle):
    data = torch.load(_checkpoint(checkpoint_dir), weights_only=True)
    change(data)
    torch.save(data, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError) as caught:
        # 'last' and 'best' weights are both checked, whichever is asked for.
        load_model(tmp_path / "tampered.pt", weights="last")
    assert needle in str(caught.value), str(caught.value)
    assert_clear(caught.value)


@pytest.mark.parametrize("case, change, needle", [
    ("carried wrong width", _tamper("loop", "carried", value=lambda t: torch.zeros(1, t.shape[1], 5)), "loop.carried"),
    ("carried two states", _tamper("loop", "carried", value=lambda t: [t, t]), "loop.carried"),
    ("rng short", _tamper("rng", "torch", value=lambda t: t[:10]), "rng.torch"),
    ("weights wrong shape", _tamper("model", value=lambda m: {k: v[..., :1] for k, v in m.items()}), "do not fit"),
    ("pickled code", _tamper("config", value={"x": _System()}), "pickled Python objects"),
    ("another cell", _tamper("spec_hash", value=zoo.get("lstm").hash), "spec mismatch"),
])
def test_retrain_resume_refuses_a_tampered_checkpoint_in_one_line(tmp_path, capsys, checkpoint_dir, case, change,
                                                                   needle):
    """The resume path (Checkpointer.restore through retrain) with each kind of damage: exit 2, one line."""
    out = tmp_path / "retrain"
    run_dir = out / "runs" / "gru" / "seed-0"
    run_dir.mkdir(parents=True)
    (out / "plan.json").write_bytes((checkpoint_dir / "plan.json").read_bytes())
    data = torch.load(_checkpoint(checkpoint_dir), weights_only=True)
    change(data)
    torch.save({**data, "finished": False, "result": None}, run_dir / "checkpoint.pt")
    code, stderr = run_cli(capsys, "retrain", "gru", "--task", "memorize", "--preset", "tiny", "--seeds", "1",
                           "--baselines", "", "--in-process", "--out", str(out))
    assert_one_line_error(code, stderr, "retrain", needle)
    assert f"delete {run_dir / 'checkpoint.pt'} to start this run over" in stderr  # not "rerun to retry"
    assert not (run_dir / "result.json").exists()
    _no_code_ran()


def _plan(change):
    def tamper(out: Path) -> None:
        plan = json.loads((out / "plan.json").read_text())
        change(plan)
        (out / "plan.json").write_text(json.dumps(plan))
    return tamper


def _write_file(relative: str, text: str):
    return lambda out: (out / relative).write_text(text)


@pytest.mark.parametrize("tamper, needle", [
    (_write_file("plan.json", "{not json"), "cannot read the retrain plan"),
    (_write_file("plan.json", "[1, 2]"), "the retrain plan is not a JSON object"),
    (_write_file("plan.json", "[" * 100_000 + "]" * 100_000), "cannot read the retrain plan"),
    (_plan(lambda plan: plan["cells"][0].update(label="../../../../etc")), "not a retrain plan"),
    (_plan(lambda plan: plan.update(task="../../etc/passwd")), "not a retrain plan"),
    (_plan(lambda plan: plan.update(seeds="0")), "not a retrain plan"),
    (_write_file("runs/gru/seed-0/result.json", "{"), "cannot read the run result"),
    (_write_file("runs/gru/seed-0/result.json", '{"status": "ok"}'), "not a retrain run result"),
    (_write_file("runs/gru/seed-0/result.json", '{"status": "ok", "metrics": [1]}'), "not a retrain run result"),
], ids=["plan garbage", "plan a list", "plan deep", "label traversal", "task traversal", "seeds a string",
        "result garbage", "result incomplete", "result metrics a list"])
def test_a_damaged_retrain_directory_is_refused_in_one_line(tmp_path, capsys, checkpoint_dir, tamper, needle):
    """Reading a retrain back (``report --retrain``, a rerun that resumes) checks what it reads."""
    out = tmp_path / "retrain"
    shutil.copytree(checkpoint_dir, out)
    tamper(out)
    from cellsearch.retrain import load_retrain

    with pytest.raises(UserError, match=needle) as caught:
        load_retrain(out)
    assert_clear(caught.value)
    if "plan" not in needle:  # a changed plan is refused earlier, as another retrain
        code, stderr = run_cli(capsys, "retrain", "gru", "--task", "memorize", "--preset", "tiny", "--seeds", "1",
                               "--baselines", "", "--in-process", "--out", str(out))
        assert_one_line_error(code, stderr, "retrain", needle)
