"""Greff et al.'s LSTM family as reference cells: the scale and one_minus ops, equations, hashes, mutation.

Every cell of the family is checked against its equations written out by hand in float64
(Greff et al. 2017, eqs. 1-6 and section 3), reading the compiled module's own parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsearch import CellRNN, CellSpec, CellSpecError, zoo
from cellsearch.compiler.batched import BatchedCellRNN
from cellsearch.config import from_mapping
from cellsearch.dedup import Deduplicator, fingerprint
from cellsearch.mutation import MutationConfig, mutate
from cellsearch.spec import Node

#: The canonical hashes of the paper's cells before the scale and one_minus ops existed: they must never change.
PAPER_HASHES = {
    "tanh_rnn": "5bc082f1a1b699d74cff7611f1c0de315ccb37d890335208c2ead4479fba0022",
    "lstm": "29a6f9e6a3bbbad3d07a972a476d76e171aa27c8c75b857bd035f3deb86b7d28",
    "lstm_b": "2e1790a2521a09a030cdfbb3116429c65dd0635fae30be79e72de168a0d63458",
    "lstm_f": "bc7470eb90a84e223c517c90d2f28ca59b1f0315cb4ec8d1baeed5221e45567c",
    "lstm_i": "826b092830eebf9ff0a16d5514d4ebc050b9da3b4b29565e497387d13421555b",
    "lstm_o": "c6524a5bf453f8913f4c7a8ecfb1e4bf7ec4ac41dfe7cc1b3fb1922000fc16f4",
    "gru": "4910a068dea64299d7032152be44380b8d1991eb4b0a680167be1f63a84d53ec",
    "gru_cho": "4900eb92906a6d6d4137dbc8317ead27f1c9c9a1a51b88c30ce78fe188dda195",
    "mut1": "18d2f989250f09c1f5acbe01c539e804ca5be20367a3c2ceec68d993df971606",
    "mut2": "b43ba3e278126a4ded7a57bf94967a995fa6aeb3f983989fcac45af566fe536d",
    "mut3": "4e2d0a032c346f8921d33302442057a63b49136860839d76fc1dccab81e1c54e",
}

#: variant -> the switches of the hand-written equations
VARIANTS = {
    "lstm_peephole": {},
    "lstm_nig": {"input_gate": False},
    "lstm_nfg": {"forget_gate": False},
    "lstm_nog": {"output_gate": False},
    "lstm_niaf": {"input_activation": False},
    "lstm_noaf": {"output_activation": False},
    "lstm_np": {"peepholes": False},
    "lstm_cifg": {"coupled": True},
    "lstm_fgr": {"full_recurrence": True},
}


def _greff_by_hand(rnn: CellRNN, x: torch.Tensor, initial: tuple[torch.Tensor, ...], input_gate=True,
                   forget_gate=True, output_gate=True, input_activation=True, output_activation=True,
                   peepholes=True, coupled=False, full_recurrence=False):
    """Greff et al.'s equations, one step at a time, with the module's weights (one layer, time-major)."""
    def W(node, operand):  # noqa: N802
        return rnn.weight(0, node, operand)

    def gate_pre(name, y, previous_gates):
        total = x_t @ W(name, "x").T + y @ W(name, "h").T + rnn.bias(0, name)
        if full_recurrence:
            for state, value in zip("ifo", previous_gates):
                total = total + value @ W(name, state).T
        return total

    def peep(gate, value):
        return rnn.scale(0, f"{gate}_peep") * value if peepholes else 0.0

    h, c, *gates = (s[0] for s in initial)
    block = "z_pre" if peepholes else "g_pre"  # lstm_np is lstm, whose block input is called g
    outputs = []
    for x_t in x.unbind(0):
        z_bar = x_t @ W(block, "x").T + h @ W(block, "h").T + rnn.bias(0, block)
        z = torch.tanh(z_bar) if input_activation else z_bar
        i = torch.sigmoid(gate_pre("i_pre", h, gates) + peep("i", c)) if input_gate else 1.0
        if coupled:
            f = 1.0 - i
        elif forget_gate:
            f = torch.sigmoid(gate_pre("f_pre", h, gates) + peep("f", c))
        else:
            f = 1.0
        c = z * i + c * f
        o = torch.sigmoid(gate_pre("o_pre", h, gates) + peep("o", c)) if output_gate else 1.0
        h = (torch.tanh(c) if output_activation else c) * o
        if full_recurrence:
            gates = [i, f, o]
        outputs.append(h)
    return torch.stack(outputs), (h, c, *gates)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_cell_matches_its_equations_in_float64(name):
    spec = zoo.get(name)
    generator = torch.Generator().manual_seed(7)
    rnn = CellRNN(spec, 5, 5, init_scale=1.5, generator=generator).double()
    x = torch.randn(6, 3, 5, dtype=torch.float64, generator=generator)
    initial = tuple(torch.randn(1, 3, 5, dtype=torch.float64, generator=generator) * 0.5 for _ in spec.states)
    output, final = rnn(x, initial if len(initial) > 1 else initial[0])
    expected, expected_final = _greff_by_hand(rnn, x, initial, **VARIANTS[name])
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(final, expected_final):
        torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-12)


def test_the_paper_cells_keep_their_hashes_and_the_family_is_new():
    for name, expected in PAPER_HASHES.items():
        assert zoo.get(name).hash == expected, name
    family = {zoo.get(n).hash for n in VARIANTS if n != "lstm_np"}
    assert len(family) == 8 and not family & set(PAPER_HASHES.values())
    # without peepholes, Greff's vanilla LSTM is nn.LSTM's: lstm_np is a second name of lstm
    assert zoo.ALIASES["lstm_np"] == "lstm" and zoo.get("lstm_np").hash == PAPER_HASHES["lstm"]
    assert zoo.get("lstm_np").name == "lstm_np" and "lstm_np" not in zoo.names() and zoo.known("lstm_np")
    assert zoo.resolve_cell("lstm_np") == zoo.get("lstm")
    assert set(zoo.GREFF_CELLS) == set(VARIANTS)


def test_peepholes_count_in_the_parameter_budget():
    lstm, peephole = zoo.get("lstm"), zoo.get("lstm_peephole")
    for hidden in (1, 10, 650):
        assert peephole.parameter_count(hidden) == lstm.parameter_count(hidden) + 3 * hidden
        rnn = CellRNN(peephole, hidden, hidden)
        assert sum(p.numel() for p in rnn.parameters()) == peephole.parameter_count(hidden)
    assert zoo.get("lstm_cifg").parameter_count(10) == 3 * (2 * 100 + 10) + 2 * 10
    assert zoo.get("lstm_fgr").parameter_count(10) == lstm.parameter_count(10) + 9 * 100 + 3 * 10
    names = dict(CellRNN(peephole, 4, 4).named_parameters())
    assert names["layers.0.node_i_peep.weight"].shape == (4,)


def test_scale_and_one_minus_in_the_file_format_and_validation(tmp_path):
    spec = zoo.get("lstm_cifg")
    for suffix in (".json", ".yaml"):
        loaded = CellSpec.load(spec.save(tmp_path / f"cell{suffix}"))
        assert loaded == spec and loaded.nodes["f"].op == "one_minus"
    data = zoo.get("lstm_peephole").to_dict()
    assert data["nodes"]["i_peep"] == {"op": "scale", "inputs": ["c"]}
    bad = [({"op": "scale", "inputs": ["c", "h"]}, "exactly 1"), ({"op": "one_minus", "inputs": []}, "exactly 1"),
           ({"op": "scale", "inputs": ["c"], "bias": 1.0}, "only linear nodes")]
    for node, message in bad:
        with pytest.raises(CellSpecError, match=message):
            CellSpec.from_dict({**data, "nodes": {**data["nodes"], "i_peep": node}})


def test_equations_and_drawing_show_peepholes_and_the_coupled_gate():
    text = zoo.get("lstm_peephole").equations()
    assert "i_peep = p_i_peep * c" in text and "o_peep = p_o_peep * c_new" in text
    assert "f = 1 - i" in zoo.get("lstm_cifg").equations()
    dot = zoo.get("lstm_peephole").to_dot()
    assert "i_peep" in dot and "scale" in dot


def test_fingerprints_tell_peepholes_apart():
    prints = {fingerprint(zoo.get(n)) for n in zoo.names()}
    assert len(prints) == len(zoo.names())
    # one peephole vector shared by two gates is another parametrisation than two vectors
    data = zoo.get("lstm_peephole").to_dict()
    shared = dict(data["nodes"])
    shared["f_sum"] = {"op": "add", "inputs": ["f_pre", "i_peep"]}
    shared_spec = CellSpec(states=data["states"], nodes=shared, outputs=data["outputs"])
    assert len(shared_spec.nodes) == len(zoo.get("lstm_peephole").nodes) - 1
    assert fingerprint(shared_spec) != fingerprint(zoo.get("lstm_peephole"))
    # 1 - (1 - v) is v
    cifg = zoo.get("lstm_cifg").to_dict()
    twice = dict(cifg["nodes"])
    twice |= {"f1": {"op": "one_minus", "inputs": ["i"]}, "f2": {"op": "one_minus", "inputs": ["f1"]},
              "f": {"op": "one_minus", "inputs": ["f2"]}}
    twice_spec = CellSpec(states=cifg["states"], nodes=twice, outputs=cifg["outputs"])
    assert twice_spec.hash != zoo.get("lstm_cifg").hash
    assert Deduplicator.from_specs([zoo.get("lstm_cifg")]).check(twice_spec).kind == "functional"


def test_default_mutation_never_makes_the_new_ops_and_peephole_operators_work():
    rng = np.random.default_rng(3)
    spec = zoo.get("gru")
    for _ in range(60):
        spec = mutate(spec, rng).child
        assert not {n.op for n in spec.nodes.values()} & {"scale", "one_minus"}

    only_add = from_mapping(MutationConfig, {"weights": {"activation": 0, "elementwise": 0, "insert": 0, "remove": 0,
                                                         "combine": 0, "add_peephole": 1}})
    mutation = mutate(zoo.get("lstm"), np.random.default_rng(0), only_add)
    scales = [n for n, node in mutation.child.nodes.items() if node.op == "scale"]
    assert scales and {op.kind for op in mutation.operations} == {"add_peephole"}
    for name in scales:  # reads a state or a state's next value
        source = mutation.child.nodes[name].inputs[0]
        assert source in ("h", "c") or source in mutation.child.outputs.values()
    assert "peephole added" in mutation.describe()

    only_remove = from_mapping(MutationConfig, {"weights": {"activation": 0, "elementwise": 0, "insert": 0,
                                                            "remove": 0, "combine": 0, "remove_peephole": 1}})
    rng = np.random.default_rng(1)
    spec = zoo.get("lstm_peephole")
    for _ in range(10):
        if not any(node.op == "scale" for node in spec.nodes.values()):
            break
        spec = mutate(spec, rng, only_remove).child
    assert spec.hash == zoo.get("lstm").hash  # every peephole removed: the nn.LSTM form again


def test_one_minus_in_the_activation_set_is_produced_by_mutation():
    config = from_mapping(MutationConfig, {"activations": ["sigmoid", "one_minus"],
                                           "weights": {"elementwise": 0, "remove": 0, "combine": 0}})
    rng = np.random.default_rng(4)
    made = False
    for _ in range(30):
        child = mutate(zoo.get("gru"), rng, config).child
        made |= any(node.op == "one_minus" for node in child.nodes.values())
    assert made
    assert Node("one_minus", ("x",)).to_dict() == {"op": "one_minus", "inputs": ["x"]}


@pytest.mark.parametrize("layer_norm", [False, True])
def test_batched_family_equals_members(layer_norm):
    specs = [zoo.get(n) for n in ("lstm_peephole", "lstm_cifg", "lstm_fgr")]
    for spec in specs:
        rnns = [CellRNN(spec, 4, 5, num_layers=2, generator=torch.Generator().manual_seed(k),
                        layer_norm=layer_norm).double() for k in range(2)]
        batched = BatchedCellRNN.from_members(rnns)
        x = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        output, _ = batched(x)
        for k, rnn in enumerate(rnns):
            torch.testing.assert_close(output[k], rnn(x[k])[0], rtol=1e-10, atol=1e-10)


def test_family_cells_are_search_seeds():
    from cellsearch.search.config import SearchConfig

    names = [n for n in VARIANTS if n != "lstm_np"]
    assert set(names) <= set(zoo.names())
    config = from_mapping(SearchConfig, {"initial_cells": names, "reference_cell": "lstm_peephole"})
    assert list(config.initial_cells) == names
