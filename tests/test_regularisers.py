"""Variational dropout and layer normalisation in CellRNN, the batched model and training.

The compiled module is checked against a naive interpreter (node by node, step by step, the
masks and the normalisation written out) in float64, outputs and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cellsearch import CellRNN, CellSpec, zoo
from cellsearch.compiler import module as compiler_module
from cellsearch.compiler.batched import BatchedCellRNN
from cellsearch.hparams import HyperParams, setting_key
from cellsearch.model import BatchedSequenceModel, build_model
from cellsearch.tasks import get_task
from cellsearch.training import GroupMember, shape_key, train_and_evaluate, train_group

CELLS = ["gru", "mut1", "lstm_peephole", "lstm_cifg", "lstm_fgr"]


def _naive(rnn: CellRNN, inputs: torch.Tensor, initial: tuple[torch.Tensor, ...], masks: list | None = None):
    """The cell node by node (time-major), with layer normalisation and the variational masks written out.

    ``masks`` is the list of masks in the order CellRNN draws them: per layer the input's and the first
    state's, then the output's.
    """
    spec = rnn.spec
    masks = list(masks) if masks is not None else None
    layer_input = inputs
    finals = []
    apply = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda v: v,
             "add": torch.add, "sub": torch.sub, "mul": torch.mul, "one_minus": lambda v: 1 - v}
    for layer in range(rnn.num_layers):
        cell = rnn.layers[layer]
        state_mask = None
        if masks is not None:
            layer_input = layer_input * masks.pop(0)
            state_mask = masks.pop(0)
        state = tuple(s[layer] for s in initial)
        outputs = []
        for x in layer_input.unbind(0):
            values = {"x": x, **dict(zip(spec.states, state))}
            projected = (x @ cell.input_projection.weight("x").T + cell.input_projection.bias
                         if cell.input_projection is not None else x)

            def root(value):  # identity is no op: a linear node reading identity(h) reads h
                while value in spec.nodes and spec.nodes[value].op == "identity":
                    value = spec.nodes[value].inputs[0]
                return value

            def read(value, by_linear):
                if value == "x" and not by_linear:
                    return projected
                if root(value) == spec.states[0] and by_linear and state_mask is not None:
                    return values[value] * state_mask
                return values[value]

            for name, node in spec.nodes.items():
                if node.op == "linear":
                    total = sum(read(o, True) @ rnn.weight(layer, name, o).T for o in node.inputs)
                    if rnn.layer_norm:
                        normed = torch.nn.functional.layer_norm(total, (rnn.hidden_size,), eps=1e-5)
                        values[name] = normed * cell.node(name).gain + rnn.bias(layer, name)
                    else:
                        values[name] = total + rnn.bias(layer, name)
                elif node.op == "scale":
                    values[name] = rnn.scale(layer, name) * read(node.inputs[0], False)
                else:
                    values[name] = apply[node.op](*(read(o, False) for o in node.inputs))
            state = tuple(read(spec.outputs[s], False) for s in spec.states)
            outputs.append(state[0])
        finals.append(state)
        layer_input = torch.stack(outputs)
    if masks is not None:
        layer_input = layer_input * masks.pop(0)
    return layer_input, tuple(torch.stack([f[i] for f in finals]) for i in range(len(spec.states)))


def _recording(monkeypatch) -> list:
    drawn = []
    original = compiler_module.dropout_mask

    def record(*args, **kwargs):
        mask = original(*args, **kwargs)
        drawn.append(mask)
        return mask

    monkeypatch.setattr(compiler_module, "dropout_mask", record)
    return drawn


def _data(spec: CellSpec, input_size=4, hidden=5, layers=2, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    rnn = CellRNN(spec, input_size, hidden, num_layers=layers, init_scale=1.2, generator=generator, **options).double()
    inputs = torch.randn(6, 3, input_size, generator=generator, dtype=torch.float64, requires_grad=True)
    initial = tuple(0.5 * torch.randn(layers, 3, hidden, generator=generator, dtype=torch.float64)
                    for _ in spec.states)
    return rnn, inputs, initial


def _call(rnn, inputs, initial):
    output, final = rnn(inputs, initial if len(initial) > 1 else initial[0])
    return output, (final,) if len(initial) == 1 else final


def _grads(output, final, tensors):
    loss = output.pow(2).sum() + sum(f.sin().sum() for f in final)
    return torch.autograd.grad(loss, tensors)


# ---------------------------------------------------------------------- variational dropout
def test_masks_are_constant_over_time_and_differ_across_sequences(monkeypatch):
    drawn = _recording(monkeypatch)
    rnn = CellRNN(zoo.get("lstm"), 16, 16, num_layers=2, dropout=0.5, dropout_mode="variational",
                  generator=torch.Generator().manual_seed(3))
    inputs = torch.randn(7, 5, 16, requires_grad=True)
    output, _ = rnn(inputs)
    assert [tuple(m.shape) for m in drawn] == [(5, 16)] * 5  # 2 layers x (input, state), then the output
    (grad,) = torch.autograd.grad(output.sum(), inputs)
    dropped = grad == 0
    # an input unit dropped for a sequence is dropped at every step of it, and only those
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))
    assert torch.equal(dropped[0], drawn[0] == 0)
    for mask in drawn:
        assert len({tuple(row.tolist()) for row in mask}) == 5  # every sequence has its own mask
        assert set(mask.unique().tolist()) == {0.0, 2.0}
    rnn(inputs)
    assert not torch.equal(drawn[0], drawn[5])  # a fresh draw per call


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_variational_dropout_matches_a_naive_implementation(monkeypatch, name, layer_norm):
    drawn = _recording(monkeypatch)
    rnn, inputs, initial = _data(zoo.get(name), dropout=0.4, dropout_mode="variational", layer_norm=layer_norm)
    output, final = _call(rnn, inputs, initial)
    assert len(drawn) == 5
    expected, expected_final = _naive(rnn, inputs, initial, drawn)  # (batch, width) masks broadcast over time
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(final, expected_final):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    tensors = [inputs, *rnn.parameters()]
    for got, want in zip(_grads(output, final, tensors), _grads(expected, expected_final, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_eval_mode_and_zero_probability_drop_nothing():
    spec = zoo.get("lstm_peephole")
    rnn, inputs, initial = _data(spec, dropout=0.5, dropout_mode="variational")
    plain = CellRNN(spec, 4, 5, num_layers=2).double()
    plain.load_state_dict(rnn.state_dict())
    rnn.eval()
    torch.testing.assert_close(_call(rnn, inputs, initial)[0], _call(plain, inputs, initial)[0], rtol=0, atol=0)
    off = CellRNN(spec, 4, 5, num_layers=2, dropout=0.0, dropout_mode="variational").double()
    off.load_state_dict(rnn.state_dict())
    assert not off.variational and off.masked_plans is None
    torch.testing.assert_close(_call(off, inputs, initial)[0], _call(plain, inputs, initial)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout_mode"):
        CellRNN(spec, 4, 5, dropout_mode="gal")


def test_batched_variational_dropout_gives_each_member_its_own_masks():
    spec = zoo.get("gru")
    rnns = [CellRNN(spec, 4, 5, num_layers=2, dropout=0.3, dropout_mode="variational", layer_norm=True,
                    generator=torch.Generator().manual_seed(k)).double() for k in range(3)]
    seeds = [torch.Generator().manual_seed(100 + k) for k in range(3)]
    batched = BatchedCellRNN.from_members(rnns, generators=[copy.deepcopy(g) for g in seeds])
    x = torch.randn(3, 6, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    output, _ = batched(x)
    for k, rnn in enumerate(rnns):
        rnn.generator = copy.deepcopy(seeds[k])
        torch.testing.assert_close(output[k], rnn(x[k])[0], rtol=1e-10, atol=1e-10)
    member = batched.member(0)
    assert member.dropout_mode == "variational" and member.layer_norm
    with pytest.raises(ValueError, match="share"):
        BatchedCellRNN.from_members([rnns[0], CellRNN(spec, 4, 5, num_layers=2, dropout=0.3).double()])


# ---------------------------------------------------------------------- layer normalisation
def test_layer_norm_output_statistics_and_insensitivity_to_the_init_scale():
    spec = CellSpec(states=["h"], nodes={"pre": {"op": "linear", "inputs": ["x", "h"]}}, outputs={"h": "pre"})
    rnn = CellRNN(spec, 6, 32, layer_norm=True, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        rnn.bias(0, "pre").zero_()
    inputs = torch.randn(5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    output, _ = rnn(inputs)
    torch.testing.assert_close(output.mean(-1), torch.zeros(5, 4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(output.var(-1, unbiased=False), torch.ones(5, 4, dtype=torch.float64),
                               rtol=0, atol=1e-3)
    assert torch.equal(rnn.layers[0].node("pre").gain, torch.ones(32, dtype=torch.float64))
    # weights ten times larger: the same outputs (up to the epsilon), as Ba et al. promise
    larger = copy.deepcopy(rnn)
    with torch.no_grad():
        for operand in ("x", "h"):
            larger.weight(0, "pre", operand).mul_(10)
    torch.testing.assert_close(larger(inputs)[0], output, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", CELLS + ["lstm_b"])
def test_layer_norm_matches_a_naive_implementation_with_gradients(name):
    rnn, inputs, initial = _data(zoo.get(name), layer_norm=True)
    with torch.no_grad():  # gains away from 1, so that a gain applied wrongly shows
        for layer in rnn.layers:
            for node in layer.linear_nodes():
                if node.gain is not None:
                    node.gain.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
    output, final = _call(rnn, inputs, initial)
    expected, expected_final = _naive(rnn, inputs, initial)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
    tensors = [inputs, *rnn.parameters()]
    assert any("gain" in n for n, _ in rnn.named_parameters())
    for got, want in zip(_grads(output, final, tensors), _grads(expected, expected_final, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_layer_norm_keeps_the_bias_constant_and_off_means_the_plain_module():
    rnn = CellRNN(zoo.get("lstm_b"), 5, 5, layer_norm=True)
    # the forget bias is the shift after normalisation
    assert float(rnn.bias(0, "f_pre").detach().mean()) == pytest.approx(1.0, abs=0.5)
    plain = CellRNN(zoo.get("lstm_b"), 5, 5, generator=torch.Generator().manual_seed(0))
    off = CellRNN(zoo.get("lstm_b"), 5, 5, layer_norm=False, dropout_mode="standard",
                  generator=torch.Generator().manual_seed(0))
    assert set(plain.state_dict()) == set(off.state_dict()) and not any("gain" in k for k in plain.state_dict())
    assert [p.source for p in plain.plans] == [p.source for p in off.plans]
    x = torch.randn(3, 2, 5)
    assert torch.equal(plain(x)[0], off(x)[0])


def _random_spec(rng) -> CellSpec | None:
    """A random cell over every op, scale and one_minus included."""
    states = ["h"] if rng.random() < 0.5 else ["h", "c"]
    values = ["x", *states]
    nodes = {}
    ops = ["linear", "linear", "tanh", "sigmoid", "relu", "identity", "add", "sub", "mul", "scale", "scale",
           "one_minus"]
    for index in range(int(rng.integers(2, 12))):
        op = str(rng.choice(ops))
        if op == "linear":
            count = int(rng.integers(1, min(3, len(values)) + 1))
            nodes[f"n{index}"] = {"op": op, "inputs": [str(v) for v in rng.choice(values, size=count, replace=False)],
                                  "bias": float(rng.choice([0.0, 1.0]))}
        else:
            arity = 2 if op in ("add", "sub", "mul") else 1
            nodes[f"n{index}"] = {"op": op, "inputs": [str(v) for v in rng.choice(values, size=arity)]}
        values.append(f"n{index}")
    try:
        return CellSpec(states=states, nodes=nodes, outputs={s: str(rng.choice(values[1:])) for s in states})
    except Exception:  # an invalid draw (x or a state never read): draw again
        return None


@pytest.mark.parametrize("layer_norm", [False, True])
def test_random_cells_with_the_new_ops_match_the_naive_implementation(monkeypatch, layer_norm):
    import numpy as np

    drawn = _recording(monkeypatch)
    rng = np.random.default_rng(18)
    checked = 0
    while checked < 24:
        spec = _random_spec(rng)
        if spec is None or not {n.op for n in spec.nodes.values()} & {"scale", "one_minus"}:
            continue
        variational = checked % 2 == 1
        drawn.clear()
        rnn, inputs, initial = _data(spec, input_size=int(rng.choice([4, 5])), seed=checked, layer_norm=layer_norm,
                                     dropout=0.3 if variational else 0.0, dropout_mode="variational")
        output, final = _call(rnn, inputs, initial)
        expected, expected_final = _naive(rnn, inputs, initial, drawn if variational else None)
        if not all(t.abs().max() < 1e4 for t in (expected, *expected_final)):
            continue  # cells like h' = (W h*h)^2 blow up; overflow says nothing about the compiler
        torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"{spec.to_dict()}: {m}")
        tensors = [inputs, *rnn.parameters()]
        for got, want in zip(_grads(output, final, tensors), _grads(expected, expected_final, tensors)):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8, msg=lambda m: f"{spec.to_dict()}: {m}")
        checked += 1


# ---------------------------------------------------------------------- settings and training
def test_hyperparameters_carry_the_regularisers_without_changing_stored_settings():
    plain = HyperParams()
    assert "dropout_mode" not in plain.to_dict() and "layer_norm" not in plain.to_dict()
    regularised = HyperParams.from_dict({"dropout": 0.5, "dropout_mode": "variational", "layer_norm": True})
    assert HyperParams.from_dict(regularised.to_dict()) == regularised
    assert regularised.to_dict()["dropout_mode"] == "variational"
    assert setting_key(plain) == setting_key(plain.to_dict())
    from cellsearch.config import ConfigError

    with pytest.raises(ConfigError, match="dropout_mode"):
        HyperParams.from_dict({"dropout_mode": "gal"})


@pytest.fixture(scope="module")
def memorize():
    return get_task("memorize")


def test_batched_model_with_layer_norm_reads_the_embedding_table_like_its_members(memorize):
    hparams = memorize.default_hparams("smoke").replace(layer_norm=True)
    spec = zoo.get("mut1")  # x-only linear and tanh(x) nodes: the hoisted part that the table path computes
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(build_model(spec, memorize, hparams).double().eval())
    batched = BatchedSequenceModel.from_members(models).eval()
    tokens = torch.randint(0, memorize.vocab_size, (12, 6), generator=torch.Generator().manual_seed(3))
    assert batched.table_lookup and memorize.vocab_size < tokens.numel()
    logits, _ = batched(tokens)
    for k, model in enumerate(models):
        torch.testing.assert_close(logits[k], model(tokens)[0], rtol=1e-10, atol=1e-10)


def test_models_and_group_training_use_the_regularisers(memorize):
    base = memorize.default_hparams("smoke").replace(dropout=0.3, num_layers=2)
    regularised = base.replace(dropout_mode="variational", layer_norm=True)
    model = build_model(zoo.get("lstm_peephole"), memorize, regularised)
    assert model.rnn.variational and model.rnn.layer_norm and model.dropout_probability == 0.0
    spec = zoo.get("gru")
    assert shape_key(spec, memorize, base) != shape_key(spec, memorize, regularised)
    budget = memorize.budget("smoke").replace(max_epochs=2, steps_per_epoch=3)
    members = [GroupMember(regularised.replace(learning_rate=lr), seed) for seed, lr in enumerate((0.5, 2.0))]
    grouped = train_group(spec, memorize, members, budget)
    alone = [train_and_evaluate(spec, memorize, m.hparams, budget, m.seed) for m in members]
    for ours, theirs in zip(grouped, alone):
        assert ours.status == theirs.status == "ok"
        assert ours.hparams == theirs.hparams and ours.hparams["dropout_mode"] == "variational"
        assert ours.score == pytest.approx(theirs.score, rel=1e-5)
        for a, b in zip(ours.curve, theirs.curve):
            for key, value in b.items():
                assert a[key] == pytest.approx(value, rel=1e-5), key


def test_ptb_has_regularised_retrain_presets():
    from cellsearch.tasks.presets import load_presets

    presets = load_presets("ptb")
    gal, medium = presets["gal_medium"].hparams, presets["zaremba_medium"].hparams
    assert gal.dropout_mode == "variational" and not gal.layer_norm
    # Zaremba et al.'s medium model and schedule, with variational instead of standard dropout
    assert gal.replace(dropout=medium.dropout, dropout_mode="standard") == medium
    assert presets["gal_medium"].budget == presets["zaremba_medium"].budget
    quick = presets["quick_regularised"].hparams
    assert quick.dropout_mode == "variational" and quick.layer_norm and quick.dropout > 0
