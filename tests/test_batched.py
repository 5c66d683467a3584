"""Batched training: K models of one cell as one model equal K separate models, and so does their training."""

from __future__ import annotations

import copy
import pickle
import re

import numpy as np
import pytest
import torch

from cellsearch import mutate, zoo
from cellsearch.batching import BatchingConfig
from cellsearch.compiler import CellRNN, build_plan
from cellsearch.compiler.batched import BatchedCellRNN, batched_source, table_source
from cellsearch.compiler.onednn import TOLERANCE_FACTOR, verify_route
from cellsearch.model import BatchedSequenceModel, SequenceModel
from cellsearch.tasks import get_task
from cellsearch.training import (
    GroupMember,
    batching_pays,
    configure_cpu_matmul,
    group_by_shape,
    shape_key,
    train_and_evaluate,
    train_group,
    train_settings,
)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


SIZES = {"members": 3, "steps": 5, "batch": 4, "input_size": 6, "hidden": 7, "num_layers": 2}


def _members_and_data(spec, dtype):
    """Separate cells and data for the equality test; small weights and inputs (mutated cells may be unbounded)."""
    generator = torch.Generator().manual_seed(11)
    members, steps, batch, input_size, hidden, layers = SIZES.values()
    rnns = [CellRNN(spec, input_size, hidden, layers, init_scale=0.5, generator=generator).to(dtype)
            for _ in range(members)]
    inputs = 0.5 * torch.randn(members, steps, batch, input_size, generator=generator, dtype=dtype)
    initial = tuple(0.5 * torch.randn(members, layers, batch, hidden, generator=generator, dtype=dtype)
                    for _ in spec.states)
    return rnns, inputs, initial, generator


def _tame(spec) -> bool:
    """Whether the equality test's cells stay moderate (some mutations explode; float32 would overflow)."""
    rnns, inputs, initial, _ = _members_and_data(spec, torch.float64)
    inputs.requires_grad_()
    for index, rnn in enumerate(rnns):
        output, _ = rnn(inputs[index], tuple(s[index] for s in initial) if len(initial) > 1 else initial[0][index])
        output.sum().backward()
    return bool(inputs.grad.abs().max() < 1e3) and all(p.grad.abs().max() < 1e3 for r in rnns for p in r.parameters())


def _mutated_cells(count: int) -> list:
    """Cells a search would meet: chains of seeded mutations of the GRU and the LSTM (explosive ones skipped)."""
    rng = np.random.default_rng(20150707)
    cells = []
    for parent in ("gru", "lstm"):
        spec, found = zoo.get(parent), 0
        while found < count:
            spec = mutate(spec, rng).child
            if _tame(spec):
                cells.append(spec)
                found += 1
    return cells


CELLS = [zoo.get(name) for name in ("tanh_rnn", "lstm", "gru", "gru_cho", "mut1", "mut2", "mut3")] + _mutated_cells(4)


def _as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def _close(actual, expected, dtype, what):
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spec", CELLS, ids=lambda s: s.name or s.short_hash)
def test_batched_cell_matches_separate_cells_outputs_states_and_gradients(spec, dtype):
    rnns, inputs, initial, generator = _members_and_data(spec, dtype)
    batched = BatchedCellRNN.from_members(rnns)
    inputs.requires_grad_()
    output, state = batched(inputs, initial[0] if len(initial) == 1 else initial)
    weights = torch.randn(output.shape, generator=generator, dtype=dtype)
    state_weights = [torch.randn(s.shape, generator=generator, dtype=dtype) for s in _as_tuple(state)]
    loss = (output * weights).sum() + sum((s * w).sum() for s, w in zip(_as_tuple(state), state_weights))
    loss.backward()
    assert torch.isfinite(inputs.grad).all()
    for index, rnn in enumerate(rnns):
        alone_input = inputs.detach()[index].clone().requires_grad_()
        alone_initial = tuple(s[index] for s in initial)
        alone_output, alone_state = rnn(alone_input, alone_initial[0] if len(alone_initial) == 1 else alone_initial)
        alone_loss = (alone_output * weights[index]).sum() + sum(
            (s * w[index]).sum() for s, w in zip(_as_tuple(alone_state), state_weights)
        )
        alone_loss.backward()
        _close(output[index], alone_output, dtype, f"member {index} output")
        for ours, theirs in zip(_as_tuple(state), _as_tuple(alone_state)):
            _close(ours[index], theirs, dtype, f"member {index} state")
        _close(inputs.grad[index], alone_input.grad, dtype, f"member {index} input gradient")
        alone_parameters = dict(rnn.named_parameters())
        for name, parameter in batched.named_parameters():
            _close(parameter.grad[index], alone_parameters[name].grad, dtype, f"member {index} gradient of {name}")


@pytest.mark.parametrize("spec", CELLS, ids=lambda s: s.name or s.short_hash)
def test_table_input_equals_reading_the_rows_at_every_position(spec):
    """The first layer computing its x-only part per table row, then gathering, equals the per-position path."""
    rnns, _, initial, generator = _members_and_data(spec, torch.float64)
    batched = BatchedCellRNN.from_members(rnns)
    members, steps, batch, input_size = SIZES["members"], SIZES["steps"], SIZES["batch"], SIZES["input_size"]
    table = (0.5 * torch.randn(members, 9, input_size, generator=generator, dtype=torch.float64)).requires_grad_()
    tokens = torch.randint(9, (steps, batch), generator=generator)
    state = initial[0] if len(initial) == 1 else initial
    results = []
    for use_table in (True, False):
        batched.zero_grad()
        table.grad = None
        if use_table:
            output, final = batched(table, state, tokens=tokens)
        else:
            output, final = batched(table[:, tokens.reshape(-1)].view(members, steps, batch, input_size), state)
        loss = (output * output.detach().sin()).sum() + sum((s * s.detach().cos()).sum() for s in _as_tuple(final))
        loss.backward()
        results.append((output, _as_tuple(final), table.grad.clone(), [p.grad.clone() for p in batched.parameters()]))
    (output, final, table_grad, grads), (output_ref, final_ref, table_grad_ref, grads_ref) = results
    _close(output, output_ref, torch.float64, "output")
    for ours, theirs in zip(final, final_ref):
        _close(ours, theirs, torch.float64, "state")
    _close(table_grad, table_grad_ref, torch.float64, "table gradient")
    for (name, _), ours, theirs in zip(batched.named_parameters(), grads, grads_ref):
        _close(ours, theirs, torch.float64, f"gradient of {name}")


def test_shared_input_and_round_trip_of_members():
    spec = zoo.get("lstm")
    generator = torch.Generator().manual_seed(3)
    rnns = [CellRNN(spec, 4, 4, generator=generator).double() for _ in range(2)]
    batched = BatchedCellRNN.from_members(rnns)
    shared = torch.randn(6, 3, 4, generator=generator, dtype=torch.float64)
    output, _ = batched(shared)
    for index, rnn in enumerate(rnns):
        _close(output[index], rnn(shared)[0], torch.float64, "shared input")
        back = batched.member(index)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), rnn.state_dict().values()))
    smaller = batched.take([1])
    _close(smaller(shared)[0][0], rnns[1](shared)[0], torch.float64, "take")
    restored = pickle.loads(pickle.dumps(batched))
    torch.testing.assert_close(restored(shared)[0], output, rtol=0, atol=0)
    copied = copy.deepcopy(batched)
    torch.testing.assert_close(copied(shared)[0], output, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_batched_sequence_model_matches_separate_models_with_dropout_masks(dropout):
    """With generators in the default generator's state after each member's build, masks are the member's own."""
    spec = _mutated_cells(2)[1]
    members, vocab, hidden = 3, 11, 8
    models, generators, expected = [], [], []
    tokens = torch.randint(vocab, (7, 5), generator=torch.Generator().manual_seed(1))
    with torch.random.fork_rng():
        for seed in range(members):
            torch.manual_seed(seed)
            model = SequenceModel(spec, vocab, hidden, num_layers=2, dropout=dropout).double()
            model.reset_parameters(1.0)
            models.append(model)
            generators.append(torch.Generator().set_state(torch.get_rng_state()))
            logits, _ = copy.deepcopy(model)(tokens)  # the default generator now draws this member's masks
            expected.append(logits)
        batched = BatchedSequenceModel.from_members(models, generators)
        logits, _ = batched(tokens)
    for index in range(members):
        _close(logits[index], expected[index], torch.float64, f"member {index} logits")
    batched.eval()
    for index, model in enumerate(models):
        model.eval()
        _close(batched(tokens)[0][index], model(tokens)[0], torch.float64, f"member {index} eval logits")
        back = batched.member(index)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_generated_source_of_an_unknown_form_is_refused():
    source = build_plan(zoo.get("gru"), project_input=False).source
    assert "baddbmm" not in batched_source(source)  # the rewrite is of shapes; addmm is bound in the namespace
    with pytest.raises(ValueError, match="unknown form"):
        batched_source(source.replace("unsafe_split(hidden, 1)", "unsafe_split(hidden, 1)[::-1]")
                       .replace(", -1)", ", 1)"))
    with pytest.raises(ValueError, match="unexpected name"):
        batched_source(source + "    open(x)\n")


def test_hostile_names_never_reach_the_batched_source_and_still_compute_the_cell():
    from cellsearch import CellSpec

    spec = CellSpec(
        states=["exec", "__import__"],
        nodes={
            "os": {"op": "linear", "inputs": ["x", "exec", "__import__"], "bias": 0.25, "diag": -0.5},
            "system": {"op": "tanh", "inputs": ["os"]},
            "eval": {"op": "mul", "inputs": ["system", "__import__"]},
        },
        outputs={"exec": "system", "__import__": "eval"},
    )
    for project in (False, True):
        source = build_plan(spec, project_input=project).source
        for text in (batched_source(source), table_source(source)):
            assert not {"exec", "os", "system", "eval", "__import__", "0.25", "0.5"} & set(re.findall(r"[\w.]+", text))
    generator = torch.Generator().manual_seed(2)
    rnns = [CellRNN(spec, 3, 4, generator=generator).double() for _ in range(2)]
    inputs = torch.randn(2, 5, 2, 3, generator=generator, dtype=torch.float64)
    output, _ = BatchedCellRNN.from_members(rnns)(inputs)
    for index, rnn in enumerate(rnns):
        _close(output[index], rnn(inputs[index])[0], torch.float64, "hostile cell")


def test_members_must_share_a_shape():
    spec = zoo.get("gru")
    with pytest.raises(ValueError, match="share"):
        BatchedCellRNN.from_members([CellRNN(spec, 4, 4), CellRNN(spec, 4, 5)])


# ---------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def memorize():
    return get_task("memorize")


def _assert_same_run(batched, alone, what):
    assert ((batched.status, batched.steps, batched.epochs, batched.seed)
            == (alone.status, alone.steps, alone.epochs, alone.seed)), what
    assert batched.hparams == alone.hparams and batched.hidden_size == alone.hidden_size, what
    assert batched.score == pytest.approx(alone.score, rel=1e-6, abs=1e-9), what
    assert batched.metrics.keys() == alone.metrics.keys(), what
    for key, value in alone.metrics.items():
        assert batched.metrics[key] == pytest.approx(value, rel=1e-5), f"{what}: {key}"
    assert len(batched.curve) == len(alone.curve), what
    for ours, theirs in zip(batched.curve, alone.curve):
        assert ours.keys() == theirs.keys(), what
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-5), f"{what}: curve {key}"
    if alone.status == "diverged":
        assert batched.message == alone.message, what


@pytest.mark.parametrize("cell", ["gru", "lstm", "mutated"])
def test_group_training_equals_training_each_member_alone(memorize, cell):
    """Different learning rates, init scales, caps and seeds; one member diverges, the others go on."""
    spec = _mutated_cells(3)[2] if cell == "mutated" else zoo.get(cell)
    base = memorize.default_hparams("smoke")
    budget = memorize.budget("smoke").replace(max_epochs=5, steps_per_epoch=3, patience=1, decay_epochs=1)
    members = [
        GroupMember(base.replace(learning_rate=0.5, init_scale=1.0, max_grad_norm=5.0), 0),
        GroupMember(base.replace(learning_rate=1e38, max_grad_norm=20.0), 1),  # diverges at its second step
        GroupMember(base.replace(learning_rate=5.0, init_scale=2.8, max_grad_norm=1.0), 2),
        GroupMember(base.replace(learning_rate=0.1, init_scale=0.3, max_grad_norm=20.0), 3),
    ]
    grouped = train_group(spec, memorize, members, budget)
    alone = [train_and_evaluate(spec, memorize, m.hparams, budget, m.seed) for m in members]
    assert alone[1].status == "diverged" and "at step 2" in alone[1].message
    assert sum(r.status == "ok" and r.score > 0 for r in alone) >= 2
    for index, (ours, theirs) in enumerate(zip(grouped, alone)):
        _assert_same_run(ours, theirs, f"{cell} member {index}")


def test_group_of_a_cell_whose_output_ignores_x(memorize):
    """The embedding gets no gradient; the members skip it, as training alone does."""
    from cellsearch import CellSpec

    spec = CellSpec(
        states=["h", "c"],
        nodes={"a": {"op": "linear", "inputs": ["h"]}, "hn": {"op": "tanh", "inputs": ["a"]},
               "cn": {"op": "add", "inputs": ["x", "c"]}},
        outputs={"h": "hn", "c": "cn"},
    )
    base = memorize.default_hparams("smoke")
    members = [GroupMember(base.replace(learning_rate=lr), seed) for seed, lr in enumerate((0.5, 2.0))]
    grouped = train_group(spec, memorize, members, memorize.budget("smoke"))
    for index, member in enumerate(members):
        alone = train_and_evaluate(spec, memorize, member.hparams, memorize.budget("smoke"), member.seed)
        assert alone.status == "ok" and alone.steps > 0
        _assert_same_run(grouped[index], alone, f"member {index}")


def test_group_with_dropout_layers_early_stops_and_test_metrics(memorize):
    """Members stop at different epochs (their own decay) and are scored on the test split with their best weights."""
    spec = zoo.get("mut1")
    base = memorize.default_hparams("smoke").replace(num_layers=2, dropout=0.3)
    budget = memorize.budget("smoke").replace(evaluate_test=True, max_epochs=6, steps_per_epoch=3, patience=1,
                                              decay_epochs=1)
    settings = [(0.5, 1.0, 5.0), (5.0, 2.8, 1.0), (0.1, 0.3, 20.0)]
    members = [GroupMember(base.replace(learning_rate=lr, init_scale=s, max_grad_norm=c), seed)
               for seed, (lr, s, c) in enumerate(settings, start=3)]
    grouped = train_group(spec, memorize, members, budget)
    alone = [train_and_evaluate(spec, memorize, m.hparams, budget, m.seed) for m in members]
    assert len({r.steps for r in alone}) > 1  # they really left the group at different times
    for index, (ours, theirs) in enumerate(zip(grouped, alone)):
        _assert_same_run(ours, theirs, f"member {index}")
        assert "test_accuracy" in ours.metrics


def test_group_training_is_reproducible_and_leaves_the_global_rng_alone(memorize):
    base = memorize.default_hparams("smoke").replace(dropout=0.3, num_layers=2)
    members = [GroupMember(base.replace(learning_rate=lr), seed) for seed, lr in enumerate((0.5, 1.0, 2.0))]
    torch.manual_seed(99)
    before = torch.get_rng_state()
    first = train_group(zoo.get("gru"), memorize, members, memorize.budget("smoke"))
    again = train_group(zoo.get("gru"), memorize, members, memorize.budget("smoke"))
    assert torch.equal(torch.get_rng_state(), before)
    assert [(r.score, r.curve) for r in first] == [(r.score, r.curve) for r in again]
    assert first[0].curve != first[1].curve


def test_settings_are_grouped_by_shape_and_batching_off_is_the_same(memorize):
    spec = zoo.get("tanh_rnn")
    base = memorize.default_hparams("smoke")
    budget = memorize.budget("smoke").replace(max_steps=4)
    settings = [base, base.replace(num_layers=2), base.replace(learning_rate=0.3), base.replace(dropout=0.2),
                base.replace(num_layers=2, init_scale=0.7)]
    members = [GroupMember(h, seed) for seed, h in enumerate(settings)]
    groups = group_by_shape(spec, memorize, settings, max_members=20)
    assert groups == [[0, 2], [1, 4], [3]]
    assert group_by_shape(spec, memorize, settings, max_members=1) == [[0], [1], [2], [3], [4]]
    assert shape_key(spec, memorize, settings[0]) != shape_key(spec, memorize, settings[1])
    events = []
    on = train_settings(spec, memorize, members, budget, progress=events.append)
    off = train_settings(spec, memorize, members, budget, config=BatchingConfig(enabled=False))
    for index, (ours, theirs) in enumerate(zip(on, off)):
        _assert_same_run(ours, theirs, f"setting {index}")
    assert {e["member"] for e in events} == set(range(5))
    assert [e["step"] for e in events if e["kind"] == "step" and e["member"] == 4] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="differ"):
        train_group(spec, memorize, members[:2], budget)


def test_softmax_bound_shapes_are_not_batched_on_cpu(memorize, ptb_dir):
    ptb = get_task("ptb", data_dir=ptb_dir)
    assert batching_pays(zoo.get("gru"), memorize, memorize.default_hparams("smoke"))
    assert not batching_pays(zoo.get("gru"), ptb, ptb.default_hparams("smoke"))  # 10,000 words on width 4
    assert not batching_pays(zoo.get("lstm"), ptb, ptb.default_hparams("paper"))


def test_out_of_memory_and_wall_clock_cap_are_statuses(memorize):
    spec = zoo.get("tanh_rnn")
    huge = memorize.default_hparams("smoke").replace(parameter_budget=10**18)
    results = train_settings(spec, memorize, [GroupMember(huge, 0), GroupMember(huge.replace(learning_rate=0.5), 1)],
                             memorize.budget("smoke"))
    assert [(r.status, r.score, r.steps) for r in results] == [("oom", 0.0, 0)] * 2
    budget = memorize.budget("smoke").replace(max_epochs=1000, steps_per_epoch=1000, max_seconds=0.3)
    base = memorize.default_hparams("smoke")
    results = train_group(spec, memorize, [GroupMember(base, 0), GroupMember(base.replace(learning_rate=0.5), 1)],
                          budget)
    for result in results:
        assert result.status == "timeout" and "0.3 s" in result.message
        assert len(result.curve) == 1 and 0 < result.score == result.curve[0]["score"]


def test_batching_config_is_typed():
    from cellsearch.config import ConfigError

    assert BatchingConfig.from_dict({"enabled": False}).enabled is False
    with pytest.raises(ConfigError, match="max_members"):
        BatchingConfig.from_dict({"max_members": 0})
    assert BatchingConfig.from_dict({"when": "always"}).when == "always"
    with pytest.raises(ConfigError, match="onednn"):
        BatchingConfig.from_dict({"onednn": "maybe"})
    with pytest.raises(ConfigError, match="speed"):
        BatchingConfig.from_dict({"speed": 1})


def test_cpu_matmul_route_is_verified_against_float64():
    try:
        check = verify_route("auto")
        assert check.default_error < 1e-5
        if check.route != "default":
            assert torch.backends.mkldnn.matmul.fp32_precision == check.route
            assert check.candidate_errors[check.route] <= TOLERANCE_FACTOR * check.default_error
        else:
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee" and check.reason
        assert configure_cpu_matmul("off").route == "default"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"


# ----------------------------------------------------------------------------------- integration
@pytest.mark.slow
def test_cli_train_samples_settings_batched_or_not_with_the_same_table():
    import json
    import subprocess
    import sys

    def train(*extra):
        done = subprocess.run([sys.executable, "-m", "cellsearch.cli", "train", "gru", "--task", "memorize",
                               "--profile", "smoke", "--sample", "3", "--set", "max_steps=4", "--json", "--no-progress",
                               *extra],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["results"]

    for ours, theirs in zip(train(), train("--no-batch")):
        assert ours["status"] == theirs["status"] == "ok" and ours["hparams"] == theirs["hparams"]
        assert ours["score"] == pytest.approx(theirs["score"], rel=1e-6)
        assert [p["train_loss"] for p in ours["curve"]] == pytest.approx([p["train_loss"] for p in theirs["curve"]],
                                                                         rel=1e-5)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batched_model_and_group_training_match():  # pragma: no cover - GPU only
    spec = zoo.get("lstm")
    generator = torch.Generator().manual_seed(5)
    rnns = [CellRNN(spec, 16, 16, generator=generator).cuda() for _ in range(4)]
    batched = BatchedCellRNN.from_members(rnns)
    inputs = torch.randn(4, 9, 3, 16, device="cuda")
    output, _ = batched(inputs)
    for index, rnn in enumerate(rnns):
        torch.testing.assert_close(output[index], rnn(inputs[index])[0], rtol=1e-4, atol=1e-5)
    task = get_task("memorize")
    base = task.default_hparams("smoke")
    members = [GroupMember(base.replace(learning_rate=lr), seed) for seed, lr in enumerate((0.5, 1.0, 2.0))]
    grouped = train_group(spec, task, members, task.budget("smoke"), device="cuda")
    alone = [train_and_evaluate(spec, task, m.hparams, task.budget("smoke"), m.seed, device="cuda") for m in members]
    for ours, theirs in zip(grouped, alone):
        assert ours.status == theirs.status == "ok"
        assert ours.curve[-1]["valid_loss"] == pytest.approx(theirs.curve[-1]["valid_loss"], rel=1e-3)


def test_search_unit_trains_its_settings_batched_with_the_same_results(memorize):
    from cellsearch.search.units import SettingSpec, UnitSpec, run_unit

    base = memorize.default_hparams("smoke")
    settings = tuple(SettingSpec(number, base.replace(learning_rate=lr).to_dict(), 100 + number)
                     for number, lr in enumerate((0.2, 1.0, 5.0)))
    unit = UnitSpec(unit_id=1, cell=zoo.get("lstm").to_dict(), task="memorize", budget_profile="smoke",
                    settings=settings)
    batched = run_unit(unit, memorize)
    alone = run_unit(UnitSpec(**{**unit.__dict__, "batching": {"enabled": False}}), memorize)
    assert len(batched) == len(alone) == 3
    for index, (ours, theirs) in enumerate(zip(batched, alone)):
        _assert_same_run(ours, theirs, f"setting {index}")


def test_search_config_has_the_switch():
    from cellsearch.config import ConfigError
    from cellsearch.search.config import SearchConfig

    assert SearchConfig().batching.enabled is True
    assert SearchConfig().with_overrides(batching={"enabled": False}).batching.enabled is False
    with pytest.raises(ConfigError, match="batching"):
        SearchConfig().with_overrides(batching={"members": 3})
