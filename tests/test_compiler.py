"""The compiler: CellRNN against nn.GRU/nn.LSTM, the paper's equations, a naive interpreter, and hostile specs."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import re
import tokenize
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import cellsearch
from cellsearch import CellSpec, zoo
from cellsearch.compiler import CellRNN, build_plan
from cellsearch.compiler.codegen import ELEMENTWISE_TEMPLATES, SOURCE_NAMES
from cellsearch.spec import ACTIVATIONS, ELEMENTWISE

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance, msg=lambda m: f"{what}: {m}")


def _as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def _loss(output: torch.Tensor, state, generator: torch.Generator) -> torch.Tensor:
    """A loss that weights every output and state entry differently, so every gradient is exercised."""
    total = (output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum()
    for tensor in _as_tuple(state):
        total = total + (tensor * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)).sum()
    return total


# ---------------------------------------------------------------------------------------------------
# nn.GRU / nn.LSTM through from_torch


def _torch_gradient_of(module: nn.RNNBase, layer: int, node: str, operand: str | None) -> torch.Tensor:
    """The gradient of torch's parameters that corresponds to our (layer, node, operand) parameter."""
    gru = isinstance(module, nn.GRU)
    gates = ["r", "z", "n"] if gru else ["i", "f", "g", "o"]
    hidden = module.hidden_size
    gate = gates.index(node[0])

    def rows(tensor):
        return tensor.grad[gate * hidden : (gate + 1) * hidden]

    if operand is not None:
        return rows(getattr(module, f"weight_{'ih' if operand == 'x' else 'hh'}_l{layer}"))
    if node == "n_x":
        return rows(getattr(module, f"bias_ih_l{layer}"))
    if node == "n_h":
        return rows(getattr(module, f"bias_hh_l{layer}"))
    # A shared bias gets the same gradient as both of torch's biases.
    torch.testing.assert_close(rows(getattr(module, f"bias_ih_l{layer}")), rows(getattr(module, f"bias_hh_l{layer}")))
    return rows(getattr(module, f"bias_ih_l{layer}"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("module_class", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("input_size", [6, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_from_torch_matches_outputs_states_and_all_gradients(
    dtype, module_class, num_layers, batch_first, input_size, with_state
):
    hidden = 6
    torch.manual_seed(1234)  # nn.GRU/nn.LSTM draw their weights from torch's default generator
    reference = module_class(input_size, hidden, num_layers, batch_first=batch_first).to(dtype)
    rnn = CellRNN.from_torch(reference)
    assert rnn.spec == zoo.get("gru" if module_class is nn.GRU else "lstm")
    assert (rnn.batch_first, rnn.num_layers, rnn.input_size, rnn.hidden_size) == (
        batch_first, num_layers, input_size, hidden
    )
    generator = torch.Generator().manual_seed(7)
    for length in (1, 4, 9):
        batch = 3
        shape = (batch, length, input_size) if batch_first else (length, batch, input_size)
        inputs = torch.randn(shape, generator=generator, dtype=dtype)
        state_count = 1 if module_class is nn.GRU else 2
        initial = tuple(torch.randn(num_layers, batch, hidden, generator=generator, dtype=dtype)
                        for _ in range(state_count))
        results = []
        for module in (reference, rnn):
            module.zero_grad(set_to_none=True)
            x = inputs.clone().requires_grad_()
            states = tuple(s.clone().requires_grad_() for s in initial)
            given = None if not with_state else (states[0] if state_count == 1 else states)
            output, final = module(x, given)
            _loss(output, final, torch.Generator().manual_seed(length)).backward()
            results.append((output, _as_tuple(final), x.grad, [s.grad for s in states]))
        (ref_out, ref_final, ref_dx, ref_ds), (out, final, dx, ds) = results
        _close(out, ref_out, dtype, "output")
        for a, b in zip(final, ref_final):
            _close(a, b, dtype, "final state")
        _close(dx, ref_dx, dtype, "input gradient")
        if with_state:
            for a, b in zip(ds, ref_ds):
                _close(a, b, dtype, "initial state gradient")
        count = 0
        for layer in range(num_layers):
            for name in rnn.layers[layer].node_names:
                node = rnn.layers[layer].node(name)
                for operand in node.operands:
                    expected = _torch_gradient_of(reference, layer, name, operand)
                    _close(node.weight(operand).grad, expected, dtype,
                           f"layer {layer} {name}.weight_{operand} gradient")
                    count += 1
                _close(node.bias.grad, _torch_gradient_of(reference, layer, name, None), dtype,
                       f"layer {layer} {name}.bias gradient")
                count += 1
        assert count == len(list(rnn.parameters()))


def test_from_torch_copies_weights_to_documented_names():
    torch.manual_seed(0)
    gru = nn.GRU(5, 4, 2)
    rnn = CellRNN.from_torch(gru)
    assert torch.equal(rnn.weight(0, "z_pre", "x"), gru.weight_ih_l0[4:8])
    assert torch.equal(rnn.weight(1, "n_h", "h"), gru.weight_hh_l1[8:12])
    assert torch.equal(rnn.bias(0, "n_x"), gru.bias_ih_l0[8:12])
    assert torch.equal(rnn.bias(1, "r_pre"), gru.bias_ih_l1[:4] + gru.bias_hh_l1[:4])
    names = dict(rnn.named_parameters())
    assert names["layers.0.node_z_pre.weight_x"] is rnn.weight(0, "z_pre", "x")
    assert names["layers.1.node_n_h.bias"] is rnn.bias(1, "n_h")
    assert rnn.weight(0, "r_pre", "x").shape == (4, 5) and rnn.weight(1, "r_pre", "x").shape == (4, 4)
    # The GRU's cell has only linear reads of x: no input projection is created.
    assert not any("input_projection" in name for name in names)
    assert (sum(p.numel() for p in rnn.parameters())
            == sum(p.numel() for p in gru.parameters()) - 2 * 2 * 4 * 2 + 2 * 2 * 4 * 1)


def test_from_torch_without_bias_and_rejections():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 3, bias=False)
    rnn = CellRNN.from_torch(lstm)
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(rnn(x)[0], lstm(x)[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="bidirectional"):
        CellRNN.from_torch(nn.GRU(3, 3, bidirectional=True))
    with pytest.raises(ValueError, match="proj_size"):
        CellRNN.from_torch(nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(TypeError, match="nn.GRU or nn.LSTM"):
        CellRNN.from_torch(nn.RNN(3, 3))


def test_no_grad_and_eval_paths_match_training_path():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, 2).double()
    rnn = CellRNN.from_torch(lstm)
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    with_grad = rnn(x)[0]
    with torch.no_grad():
        without = rnn(x)[0]
    with torch.inference_mode():
        inference = rnn(x)[0]
    assert torch.equal(with_grad.detach(), without) and torch.equal(without, inference)


# ---------------------------------------------------------------------------------------------------
# Hand-written equations of the paper


def _equations(name: str):
    """The cell ``name`` written out by hand from the paper; ``W(node, operand)``, ``b(node)`` read its weights."""
    sigm, tanh = torch.sigmoid, torch.tanh

    def step(x, state, W, b):
        h = state[0]
        lin = lambda v, node, operand: v @ W(node, operand).T  # noqa: E731
        if name == "tanh_rnn":
            return (tanh(lin(x, "pre", "x") + lin(h, "pre", "h") + b("pre")),)
        if name.startswith("lstm"):
            c = state[1]
            gate = lambda n: sigm(lin(x, n, "x") + lin(h, n, "h") + b(n))  # noqa: E731
            g = tanh(lin(x, "g_pre", "x") + lin(h, "g_pre", "h") + b("g_pre"))
            i = 1.0 if name == "lstm_i" else gate("i_pre")
            f = 1.0 if name == "lstm_f" else gate("f_pre")
            c_new = f * c + i * g
            o = 1.0 if name == "lstm_o" else gate("o_pre")
            return (o * tanh(c_new), c_new)
        if name == "gru_cho":
            r = sigm(lin(x, "r_pre", "x") + lin(h, "r_pre", "h") + b("r_pre"))
            z = sigm(lin(x, "z_pre", "x") + lin(h, "z_pre", "h") + b("z_pre"))
            n = tanh(lin(x, "n_pre", "x") + lin(r * h, "n_pre", "r_h") + b("n_pre"))
            return (z * h + (1 - z) * n,)
        if name == "mut1":
            z = sigm(lin(x, "z_pre", "x") + b("z_pre"))
            r = sigm(lin(x, "r_pre", "x") + lin(h, "r_pre", "h") + b("r_pre"))
            return (tanh(lin(r * h, "hh", "r_h") + tanh(x) + b("hh")) * z + h * (1 - z),)
        if name == "mut2":
            z = sigm(lin(x, "z_pre", "x") + lin(h, "z_pre", "h") + b("z_pre"))
            r = sigm(x + lin(h, "r_h_proj", "h") + b("r_h_proj"))
            return (tanh(lin(r * h, "n_pre", "r_h") + lin(x, "n_pre", "x") + b("n_pre")) * z + h * (1 - z),)
        if name == "mut3":
            z = sigm(lin(x, "z_pre", "x") + lin(tanh(h), "z_pre", "h_act") + b("z_pre"))
            r = sigm(lin(x, "r_pre", "x") + lin(h, "r_pre", "h") + b("r_pre"))
            return (tanh(lin(r * h, "n_pre", "r_h") + lin(x, "n_pre", "x") + b("n_pre")) * z + h * (1 - z),)
        raise KeyError(name)

    return step


def _run_by_hand(rnn: CellRNN, step, inputs: torch.Tensor, initial: tuple[torch.Tensor, ...]):
    """Time-major loop over the hand-written step, layer by layer, with ``rnn``'s own parameters."""
    layer_input = inputs
    finals = []
    for layer in range(rnn.num_layers):
        state = tuple(s[layer] for s in initial)
        outputs = []
        for x in layer_input.unbind(0):
            state = step(x, state, lambda n, o: rnn.weight(layer, n, o), lambda n: rnn.bias(layer, n))
            outputs.append(state[0])
        finals.append(state)
        layer_input = torch.stack(outputs)
    return layer_input, tuple(torch.stack([f[i] for f in finals]) for i in range(len(initial)))


@pytest.mark.parametrize(
    "name", ["tanh_rnn", "lstm_b", "lstm_f", "lstm_i", "lstm_o", "gru_cho", "mut1", "mut2", "mut3"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cells_match_the_papers_equations(name, dtype):
    spec = zoo.get(name)
    hidden, layers = 5, 2
    generator = torch.Generator().manual_seed(3)
    rnn = CellRNN(spec, hidden, hidden, num_layers=layers, init_scale=2.0, generator=generator).to(dtype)
    inputs = torch.randn(7, 3, hidden, generator=generator, dtype=dtype)
    initial = tuple(torch.randn(layers, 3, hidden, generator=generator, dtype=dtype) for _ in spec.states)
    output, final = rnn(inputs, initial[0] if len(initial) == 1 else initial)
    expected_output, expected_final = _run_by_hand(rnn, _equations(name), inputs, initial)
    _close(output, expected_output, dtype, "output")
    for a, b in zip(_as_tuple(final), expected_final):
        _close(a, b, dtype, "final state")
    parameters = list(rnn.parameters())
    compiled = torch.autograd.grad(_loss(output, final, torch.Generator().manual_seed(1)), parameters)
    by_hand = torch.autograd.grad(_loss(expected_output, expected_final, torch.Generator().manual_seed(1)), parameters)
    for (parameter_name, _), a, b in zip(rnn.named_parameters(), compiled, by_hand):
        _close(a, b, dtype, f"gradient of {parameter_name}")


def test_input_projection_feeds_non_linear_reads_of_x():
    """mut1 with input_size != hidden_size: linear nodes read the raw input, tanh(x) reads the projection."""
    hidden, input_size = 5, 3
    generator = torch.Generator().manual_seed(11)
    rnn = CellRNN(zoo.get("mut1"), input_size, hidden, generator=generator).double()
    names = dict(rnn.named_parameters())
    assert names["layers.0.input_projection.weight_x"].shape == (hidden, input_size)
    assert rnn.weight(0, "z_pre", "x").shape == (hidden, input_size)
    projection = rnn.layers[0].input_projection
    raw = torch.randn(6, 2, input_size, generator=generator, dtype=torch.float64)
    h = torch.zeros(2, hidden, dtype=torch.float64)
    W = lambda n, o: rnn.weight(0, n, o)  # noqa: E731
    b = lambda n: rnn.bias(0, n)  # noqa: E731
    outputs = []
    for x in raw.unbind(0):
        x_hidden = x @ projection.weight("x").T + projection.bias
        z = torch.sigmoid(x @ W("z_pre", "x").T + b("z_pre"))
        r = torch.sigmoid(x @ W("r_pre", "x").T + h @ W("r_pre", "h").T + b("r_pre"))
        h = torch.tanh((r * h) @ W("hh", "r_h").T + torch.tanh(x_hidden) + b("hh")) * z + h * (1 - z)
        outputs.append(h)
    _close(rnn(raw)[0], torch.stack(outputs), torch.float64, "output")


# ---------------------------------------------------------------------------------------------------
# Random cells against a naive interpreter (the semantics, written the slow obvious way)


def _random_spec(rng: np.random.Generator) -> CellSpec | None:
    states = ["h"] if rng.random() < 0.5 else ["h", "c"]
    values = ["x", *states]
    nodes = {}
    for index in range(int(rng.integers(2, 12))):
        op = str(rng.choice(["linear", "linear", *ACTIVATIONS, *ELEMENTWISE]))
        if op == "linear":
            count = int(rng.integers(1, min(3, len(values)) + 1))
            operands = [str(v) for v in rng.choice(values, size=count, replace=False)]
            nodes[f"n{index}"] = {"op": op, "inputs": operands, "bias": float(rng.choice([0.0, 1.0])),
                                  "diag": float(rng.choice([0.0, 0.5]))}
        else:
            arity = 1 if op in ACTIVATIONS else 2
            nodes[f"n{index}"] = {"op": op, "inputs": [str(v) for v in rng.choice(values, size=arity)]}
        values.append(f"n{index}")
    outputs = {s: str(rng.choice(values[1:])) for s in states}
    try:
        return CellSpec(states=states, nodes=nodes, outputs=outputs)
    except cellsearch.CellSpecError:
        return None


def _interpret(rnn: CellRNN, inputs: torch.Tensor, initial: tuple[torch.Tensor, ...]):
    """Evaluate the spec node by node, step by step (time-major)."""
    spec = rnn.spec
    layer_input = inputs
    finals = []
    apply = {
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda v: v,
        "add": torch.add, "sub": torch.sub, "mul": torch.mul,
    }
    for layer in range(rnn.num_layers):
        cell = rnn.layers[layer]
        state = tuple(s[layer] for s in initial)
        outputs = []
        for x in layer_input.unbind(0):
            values = {"x": x, **dict(zip(spec.states, state))}
            if cell.input_projection is not None:
                projected = x @ cell.input_projection.weight("x").T + cell.input_projection.bias

            def read(value, by_linear):
                if value == "x" and cell.input_projection is not None and not by_linear:
                    return projected
                return values[value]

            for name, node in spec.nodes.items():
                if node.op == "linear":
                    values[name] = (sum(read(o, True) @ rnn.weight(layer, name, o).T for o in node.inputs)
                                    + rnn.bias(layer, name))
                elif node.op == "identity" and node.inputs[0] == "x":
                    values[name] = read("x", False)
                else:
                    values[name] = apply[node.op](*(read(o, False) for o in node.inputs))
            state = tuple(read(spec.outputs[s], False) for s in spec.states)
            outputs.append(state[0])
        finals.append(state)
        layer_input = torch.stack(outputs)
    return layer_input, tuple(torch.stack([f[i] for f in finals]) for i in range(len(spec.states)))


def test_random_cells_match_a_naive_interpreter():
    rng = np.random.default_rng(2024)
    checked = 0
    while checked < 200:
        spec = _random_spec(rng)
        if spec is None:
            continue
        hidden = 4
        input_size = int(rng.choice([3, 4]))
        layers = int(rng.integers(1, 3))
        generator = torch.Generator().manual_seed(checked)
        rnn = CellRNN(spec, input_size, hidden, num_layers=layers, init_scale=0.8, generator=generator).double()
        inputs = torch.randn(5, 2, input_size, generator=generator, dtype=torch.float64, requires_grad=True)
        initial = tuple(torch.randn(layers, 2, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
                        for _ in spec.states)
        output, final = rnn(inputs, initial[0] if len(initial) == 1 else initial)
        expected_output, expected_final = _interpret(rnn, inputs, initial)
        if not all(t.abs().max() < 1e4 for t in (expected_output, *expected_final)):
            continue  # cells like h' = (W h*h)^2 blow up; overflow says nothing about the compiler
        context = f"cell {spec.to_dict()}"
        _close(output, expected_output, torch.float64, context)
        for a, b in zip(_as_tuple(final), expected_final):
            _close(a, b, torch.float64, context)
        names = ["input", *(f"initial {s}" for s in spec.states), *(n for n, _ in rnn.named_parameters())]
        leaves = [inputs, *initial, *rnn.parameters()]
        compiled = torch.autograd.grad(_loss(output, final, torch.Generator().manual_seed(1)), leaves,
                                       allow_unused=True)
        naive = torch.autograd.grad(_loss(expected_output, expected_final, torch.Generator().manual_seed(1)), leaves,
                                    allow_unused=True)
        for name, a, b in zip(names, compiled, naive):
            if a is None or b is None:  # a value the outputs do not depend on (a state overwritten unread...)
                assert (a is None or not a.any()) and (b is None or not b.any()), f"{context}: {name}"
            else:
                _close(a, b, torch.float64, f"{context}: gradient of {name}")
        checked += 1


# ---------------------------------------------------------------------------------------------------
# Layer behaviour: dropout, dtypes, devices, unbatched input, state handling


def test_dropout_between_layers_matches_nn_gru():
    torch.manual_seed(5)
    gru = nn.GRU(4, 4, 3, dropout=0.5)
    rnn = CellRNN.from_torch(gru)
    assert rnn.dropout == 0.5
    x = torch.randn(6, 2, 4)
    # Same draws from the default generator as nn.GRU's inter-layer dropout, in training mode.
    torch.manual_seed(99)
    expected = gru(x)[0]
    torch.manual_seed(99)
    torch.testing.assert_close(rnn(x)[0], expected, atol=1e-6, rtol=1e-6)
    rnn.eval(), gru.eval()
    torch.testing.assert_close(rnn(x)[0], gru(x)[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(rnn(x)[0], rnn(x)[0])


def test_dropout_with_an_explicit_generator():
    spec = zoo.get("gru")
    rnn = CellRNN(spec, 4, 8, num_layers=2, dropout=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    first, second = rnn(x)[0], rnn(x)[0]
    assert not torch.equal(first, second)  # training: fresh masks
    rnn.generator = torch.Generator().manual_seed(42)
    again = rnn(x)[0]
    rnn.generator = torch.Generator().manual_seed(42)
    assert torch.equal(again, rnn(x)[0])  # reproducible from the generator
    no_dropout = CellRNN(spec, 4, 8, num_layers=2, dropout=0.0)
    no_dropout.load_state_dict(rnn.state_dict())
    rnn.eval()
    assert torch.equal(rnn(x)[0], no_dropout(x)[0])
    single = CellRNN(spec, 4, 8, num_layers=1, dropout=0.5)
    assert torch.equal(single(x)[0], single(x)[0])  # no layer above: dropout never applies


def test_dtype_and_to():
    spec = zoo.get("lstm")
    rnn = CellRNN(spec, 3, 4, num_layers=2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 2, 3)
    output, (h, c) = rnn(x)
    assert output.dtype == h.dtype == c.dtype == torch.float32
    double = rnn.to(torch.float64)
    assert double is rnn and all(p.dtype == torch.float64 for p in rnn.parameters())
    output64, _ = rnn(x.double())
    assert output64.dtype == torch.float64
    torch.testing.assert_close(output64.float(), output, atol=1e-5, rtol=1e-5)
    rnn.to("cpu")
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines
        cuda = rnn.to("cuda")
        torch.testing.assert_close(cuda(x.double().cuda())[0].cpu(), output64, atol=1e-10, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cudnn():  # pragma: no cover - GPU only
    torch.manual_seed(0)
    for module_class in (nn.GRU, nn.LSTM):
        reference = module_class(8, 16, 2).cuda()
        rnn = CellRNN.from_torch(reference)
        x = torch.randn(7, 3, 8, device="cuda")
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # cuDNN's RNNs take TF32 by default
            expected = reference(x)[0]
        torch.testing.assert_close(rnn(x)[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_like_nn_gru(batch_first):
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, 2, batch_first=batch_first)
    rnn = CellRNN.from_torch(gru)
    x = torch.randn(6, 3)
    h0 = torch.randn(2, 4)
    expected, expected_h = gru(x, h0)
    output, h = rnn(x, h0)
    assert output.shape == (6, 4) and h.shape == (2, 4)
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, expected_h, atol=1e-6, rtol=1e-6)


def test_bad_input_and_state_are_rejected_clearly():
    rnn = CellRNN(zoo.get("lstm"), 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="input_size=3"):
        rnn(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        rnn(torch.randn(5))
    with pytest.raises(ValueError, match=r"tuple of 2 tensors \(h, c\)"):
        rnn(x, torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"state 'c' has shape \(1, 2, 4\), expected \(2, 2, 4\)"):
        rnn(x, (torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="empty"):
        rnn(torch.randn(0, 2, 3))
    with pytest.raises(ValueError, match="hidden_size"):
        CellRNN(zoo.get("gru"), 3, 0)
    with pytest.raises(ValueError, match="dropout"):
        CellRNN(zoo.get("gru"), 3, 3, dropout=1.0)
    with pytest.raises(TypeError, match="CellSpec"):
        CellRNN({"states": ["h"]}, 3, 3)
    with pytest.raises(KeyError, match="no linear node 'nope'"):
        rnn.weight(0, "nope", "x")
    with pytest.raises(KeyError, match="operand 'c'"):
        rnn.weight(0, "i_pre", "c")


def test_pickle_deepcopy_and_state_dict_round_trip():
    rnn = CellRNN(zoo.get("mut3"), 3, 4, num_layers=2, dropout=0.25, batch_first=True,
                  generator=torch.Generator().manual_seed(0))
    rnn.generator = None  # torch.Generator does not pickle
    x = torch.randn(2, 5, 3)
    rnn.eval()
    expected = rnn(x)[0]
    for clone in (pickle.loads(pickle.dumps(rnn)), copy.deepcopy(rnn)):
        assert clone.spec == rnn.spec and not clone.training
        assert torch.equal(clone(x)[0], expected)
        assert (clone.batch_first, clone.dropout, clone.num_layers) == (True, 0.25, 2)
    fresh = CellRNN(zoo.get("mut3"), 3, 4, num_layers=2, batch_first=True)
    fresh.load_state_dict(rnn.state_dict())
    assert torch.equal(fresh(x)[0], expected)


def test_forward_leaves_no_reference_cycle():
    """The deferred weight gradient keeps the step operands for backward; that must not keep the graph alive."""
    rnn = CellRNN(zoo.get("gru_cho"), 4, 4)
    gc.disable()  # a cycle through autograd's C++ graph is never collected; without gc a Python cycle shows too
    try:
        for backward in (False, True):
            initial = torch.randn(1, 2, 4, requires_grad=True)
            probe = weakref.ref(initial)
            output, state = rnn(torch.randn(5, 2, 4), initial)
            del initial
            if backward:
                (output.sum() + state.sum()).backward()
            del output, state
            assert probe() is None, "the autograd graph outlived its outputs"
    finally:
        gc.enable()


def test_double_backward_raises_instead_of_giving_wrong_numbers():
    rnn = CellRNN(zoo.get("gru"), 3, 3)
    x = torch.randn(4, 2, 3, requires_grad=True)
    (gradient,) = torch.autograd.grad(rnn(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gradient.sum().backward()


def test_lazy_export():
    assert cellsearch.CellRNN is CellRNN


# ---------------------------------------------------------------------------------------------------
# Initialisation


def test_initialisation_ranges_diagonal_and_bias_constants():
    hidden, scale = 64, 0.7
    spec = CellSpec(
        states=["h"],
        nodes={
            "gate": {"op": "linear", "inputs": ["x", "h"], "bias": 1.0, "diag": 1.1},
            "g": {"op": "sigmoid", "inputs": ["gate"]},
            "cand": {"op": "linear", "inputs": ["h"], "bias": -0.5},
            "c": {"op": "tanh", "inputs": ["cand"]},
            "out": {"op": "mul", "inputs": ["g", "c"]},
        },
        outputs={"h": "out"},
    )
    rnn = CellRNN(spec, hidden, hidden, num_layers=2, init_scale=scale, generator=torch.Generator().manual_seed(0))
    bound = scale / math.sqrt(hidden)
    for layer in range(2):
        for node, diag, bias in (("gate", 1.1, 1.0), ("cand", 0.0, -0.5)):
            for operand in spec.nodes[node].inputs:
                weight = rnn.weight(layer, node, operand).detach()
                off_diagonal = weight - torch.diag(torch.diagonal(weight))
                assert off_diagonal.abs().max() <= bound
                assert (torch.diagonal(weight) - diag).abs().max() <= bound
                # uniform: standard deviation bound / sqrt(3), mean 0
                assert abs(off_diagonal.std().item() - bound / math.sqrt(3)) < 0.1 * bound
                assert abs(off_diagonal.mean().item()) < 0.05 * bound
            shifted = rnn.bias(layer, node).detach() - bias
            assert shifted.abs().max() <= bound and shifted.abs().max() > 0.5 * bound
    # lstm_b: forget bias near 1
    lstm_b = CellRNN(zoo.get("lstm_b"), 8, 8, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert ((lstm_b.bias(0, "f_pre") - 1.0).abs() <= 1 / math.sqrt(8)).all()
    # init scale 0 leaves exactly the constants
    rnn.reset_parameters(0.0)
    assert torch.equal(rnn.weight(1, "gate", "h"), 1.1 * torch.eye(hidden))
    assert torch.equal(rnn.bias(0, "cand"), torch.full((hidden,), -0.5))


def test_initialisation_is_reproducible_from_a_generator():
    spec = zoo.get("mut2")
    first = CellRNN(spec, 5, 6, num_layers=2, generator=torch.Generator().manual_seed(3))
    second = CellRNN(spec, 5, 6, num_layers=2, generator=torch.Generator().manual_seed(3))
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    first.reset_parameters(1.0, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(first.weight(0, "z_pre", "h"), second.weight(0, "z_pre", "h"))
    # rectangular first-layer matrices take the diagonal constant on their main diagonal too
    spec = CellSpec(states=["h"], nodes={"a": {"op": "linear", "inputs": ["x", "h"], "diag": 2.0}}, outputs={"h": "a"})
    rnn = CellRNN(spec, 3, 5, init_scale=0.0)
    assert torch.equal(rnn.weight(0, "a", "x"), 2.0 * torch.eye(5, 3))


# ---------------------------------------------------------------------------------------------------
# Generated code: whitelisted templates only; hostile specs compile and run correctly


_LOCAL = re.compile(r"[a-z]\d+(_\d+)?")


def _check_source(source: str, spec: CellSpec) -> None:
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME:
            assert token.string in SOURCE_NAMES or _LOCAL.fullmatch(token.string), f"unexpected name {token.string!r}"
        elif token.type == tokenize.NUMBER:
            assert token.string.isdigit(), f"unexpected number {token.string!r}"
        else:
            assert token.type in (tokenize.OP, tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                                  tokenize.ENDMARKER), token
    spec_names = set(spec.nodes) | set(spec.states)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", source))
    assert not (spec_names - {"x"}) & words - SOURCE_NAMES


HOSTILE = ["__import__", "os", "exec", "eval", "import", "lambda", "def", "return", "None", "True", "self",
           "forward", "training", "__class__", "__dict__", "weight", "bias", "layer", "states", "record", "cat",
           "v1", "g0", "k0_0"]


def _renamed(spec: CellSpec, names: list[str]) -> tuple[CellSpec, dict[str, str]]:
    mapping = dict(zip(spec.nodes, names))
    rename = lambda v: mapping.get(v, v)  # noqa: E731
    nodes = {mapping[n]: {**node.to_dict(), "inputs": [rename(o) for o in node.inputs]}
             for n, node in spec.nodes.items()}
    return CellSpec(states=spec.states, nodes=nodes, outputs={s: rename(v) for s, v in spec.outputs.items()}), mapping


@pytest.mark.parametrize("cell", ["gru", "mut2"])
def test_hostile_names_compile_to_the_same_cell(cell):
    spec = zoo.get(cell)
    hostile, mapping = _renamed(spec, HOSTILE[: len(spec.nodes)])
    assert hostile.hash == spec.hash
    reference = CellRNN(spec, 4, 5, num_layers=2, generator=torch.Generator().manual_seed(0)).double()
    rnn = CellRNN(hostile, 4, 5, num_layers=2).double()
    with torch.no_grad():
        for layer in range(2):
            for name, node in spec.nodes.items():
                if node.op == "linear":
                    for operand in node.inputs:
                        rnn.weight(layer, mapping[name], mapping.get(operand, operand)).copy_(
                            reference.weight(layer, name, operand)
                        )
                    rnn.bias(layer, mapping[name]).copy_(reference.bias(layer, name))
    if cell == "mut2":  # x + ...: a non-linear read of a 4-wide input goes through the projection
        rnn.layers[0].input_projection.load_state_dict(reference.layers[0].input_projection.state_dict())
    x = torch.randn(6, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _close(rnn(x)[0], reference(x)[0], torch.float64, "output")
    for plan in rnn.plans:
        _check_source(plan.source, hostile)
    expected_names = {
        f"layers.{layer}.node_{name}.{kind}"
        for layer in range(2)
        for name, node in hostile.nodes.items()
        if node.op == "linear"
        for kind in ["bias", *(f"weight_{o}" for o in node.inputs)]
    } | ({"layers.0.input_projection.weight_x", "layers.0.input_projection.bias"} if cell == "mut2" else set())
    assert set(dict(rnn.named_parameters())) == expected_names
    assert any(name.startswith("layers.0.node___import__.") for name in expected_names)


def test_hostile_state_names_and_constants_never_reach_the_source():
    spec = CellSpec(
        states=["exec", "__import__"],
        nodes={
            "os": {"op": "linear", "inputs": ["x", "exec", "__import__"], "bias": 7.25, "diag": -3.5},
            "system": {"op": "tanh", "inputs": ["os"]},
            "eval": {"op": "mul", "inputs": ["system", "__import__"]},
        },
        outputs={"exec": "system", "__import__": "eval"},
    )
    for project in (False, True):
        plan = build_plan(spec, project_input=project)
        _check_source(plan.source, spec)
        assert "7.25" not in plan.source and "3.5" not in plan.source
    rnn = CellRNN(spec, 3, 4, init_scale=0.0)
    output, (first, second) = rnn(torch.ones(2, 1, 3), (torch.zeros(1, 1, 4), torch.ones(1, 1, 4)))
    assert torch.isfinite(output).all() and first.shape == second.shape == (1, 1, 4)


def test_every_op_goes_through_a_whitelisted_template():
    # scale has its own template (its operand times the node's vector); one_minus is 1 - v
    assert set(ELEMENTWISE_TEMPLATES) == set(ACTIVATIONS) - {"identity"} | set(ELEMENTWISE) | {"one_minus"}
    for name in zoo.names():
        for project in (False, True):
            _check_source(build_plan(zoo.get(name), project_input=project).source, zoo.get(name))


def test_step_does_one_state_matmul_for_gru_and_lstm():
    for name in ("gru", "lstm"):
        plan = build_plan(zoo.get(name), project_input=False)
        assert plan.step_groups == 1 and plan.hoisted_groups == 1
        loop = plan.source.split("for ", 1)[1]
        assert loop.count("addmm(") == 1
        # no tensor indexing inside the time loop: the only subscripts read the tuple of split sizes
        assert re.sub(r"sz\[\d+\]", "", loop).count("[") == 0
