"""The training step through torch.compile (cellsearch.training.capture) equals the eager step, and the switch is typed.

Compilation is slow on a CPU (inductor: tens of seconds for the smallest model), so the file compiles
with inductor once (one batched GRU group, module-scoped, on a copy of the memorize task with a
3-step window) and reuses that graph for the wiring test (same cell and shapes: no new
compilation). The per-step checks over many cells use the ``aot_eager`` backend: Dynamo and
AOTAutograd decide what is captured (the generated layer code, the deferred weight gradient's
bypass, graph breaks at dropout, the padding of members that left) and run it without inductor's
code generation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cellsearch import CellSpec, mutate, zoo
from cellsearch.batching import AUTO_MIN_CAP_SECONDS, CPU_COMPILE_MAX_WIDTH, BatchingConfig
from cellsearch.config import ConfigError
from cellsearch.tasks import get_task
from cellsearch.training import (
    BatchedMembers,
    GroupMember,
    SingleMember,
    run_members,
    train_and_evaluate,
    train_group,
    train_settings,
)
from cellsearch.training.capture import CapturedMembers, build_for, captured_build, compile_options, planned_steps

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny():
    """memorize with a 3-step window and 4 columns: the smallest graph to compile (a copy; the task stays as it is)."""
    task = copy.copy(get_task("memorize"))
    task.unroll, task.batch_size, task.eval_batch_size = 3, 4, 20
    return task


def _budget(task):
    return task.budget("smoke").replace(max_epochs=5, steps_per_epoch=3, patience=1, decay_epochs=1, eval_tokens=400)


def _group(task):
    """Four settings: one diverges at its second step (it becomes padding), the others stop at different epochs."""
    base = task.default_hparams("smoke")
    return [
        GroupMember(base.replace(learning_rate=0.5, init_scale=1.0, max_grad_norm=5.0), 0),
        GroupMember(base.replace(learning_rate=1e38, max_grad_norm=20.0), 1),
        GroupMember(base.replace(learning_rate=5.0, init_scale=2.8, max_grad_norm=1.0), 2),
        GroupMember(base.replace(learning_rate=0.1, init_scale=0.3, max_grad_norm=20.0), 3),
    ]


def _assert_same_run(ours, theirs, what):
    assert (ours.status, ours.steps, ours.epochs, ours.seed, ours.message) == (
        theirs.status, theirs.steps, theirs.epochs, theirs.seed, theirs.message), what
    assert ours.score == pytest.approx(theirs.score, rel=TOLERANCE, abs=1e-9), what
    assert ours.metrics.keys() == theirs.metrics.keys(), what
    for key, value in theirs.metrics.items():
        assert ours.metrics[key] == pytest.approx(value, rel=TOLERANCE), f"{what}: {key}"
    assert len(ours.curve) == len(theirs.curve), what
    for mine, other in zip(ours.curve, theirs.curve):
        for key, value in other.items():
            assert mine[key] == pytest.approx(value, rel=TOLERANCE), f"{what}: curve {key}"


@pytest.fixture(scope="module")
def inductor_group(tiny):
    """One GRU group trained through inductor (the file's one compilation) and eagerly."""
    wrappers: list[CapturedMembers] = []
    members, budget = _group(tiny), _budget(tiny)
    compiled = run_members(zoo.get("gru"), tiny, members, budget, "cpu", None, 1,
                           captured_build(BatchedMembers.build, wrappers.append))
    eager = train_group(zoo.get("gru"), tiny, members, budget)
    return compiled, eager, wrappers[0]


@pytest.mark.slow
def test_inductor_group_run_equals_eager(inductor_group):
    compiled, eager, wrapper = inductor_group
    assert [r.status for r in eager] == ["ok", "diverged", "ok", "ok"]
    assert len({r.steps for r in eager}) > 2  # members left at different times: padding, then the eager fallback
    for index, (ours, theirs) in enumerate(zip(compiled, eager)):
        _assert_same_run(ours, theirs, f"member {index}")
    assert wrapper.compiled_calls >= 3 and wrapper.compile_seconds > 0
    assert wrapper.eager_calls == 0  # every training window had the captured shape
    # the diverged member was padding until a second member left; then the group went on eagerly
    assert wrapper.fallback == "2 of 4 compiled members left: eager from here"
    assert wrapper.compiled_calls < max(r.steps for r in eager)


@pytest.mark.slow
def test_train_settings_compiles_when_the_switch_is_on_and_equals_eager(tiny, inductor_group):
    """Through the public entry point: same cell and shapes as the fixture, so inductor's graph is reused."""
    _, eager, _ = inductor_group
    results = train_settings(zoo.get("gru"), tiny, _group(tiny), _budget(tiny), config=BatchingConfig(compile="on"))
    for index, (ours, theirs) in enumerate(zip(results, eager)):
        _assert_same_run(ours, theirs, f"member {index}")


# ------------------------------------------------------------------------ step-level equality (aot_eager)
def _mutated() -> CellSpec:
    """A cell a search would meet: the second of a chain of seeded mutations of the LSTM."""
    rng = np.random.default_rng(20151128)
    return mutate(mutate(zoo.get("lstm"), rng).child, rng).child


# two states and a gate product; a non-linear read of x (an input projection); a mutated cell
CELLS = [zoo.get("lstm"), zoo.get("mut1"), _mutated()]


def _members_pair(spec, task, hparams, batched: bool):
    """The same seeded members twice: one eager, one to wrap (separate weights, equal values)."""
    settings = [GroupMember(hparams.replace(learning_rate=lr, init_scale=s), seed)
                for seed, (lr, s) in enumerate(((0.5, 1.0), (1.0, 0.5), (0.2, 1.4)))]
    if not batched:
        settings = settings[:1]
    build = BatchedMembers.build if batched else SingleMember.build
    made = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):
            made.append(build(spec, task, settings, torch.device("cpu")))
    return made


def _steps(members, tokens, steps: int, leave_after: int | None = None):
    """Training steps as the loop takes them (carried state, per-member updates); a member leaves after
    ``leave_after``."""
    losses_seen, state = [], None
    members.train()
    for step in range(steps):
        inputs, targets = tokens[step : step + 3], tokens[step + 1 : step + 4]
        losses, _, _, state = members.losses(inputs, targets, None, state)
        state = state.detach() if isinstance(state, torch.Tensor) else tuple(s.detach() for s in state)
        losses_seen.append(losses.detach().clone())
        members.zero_grad()
        losses.sum().backward()
        members.clip_and_update([0.5 + 0.1 * i for i in range(members.count)], [1.0 + i for i in range(members.count)])
        if leave_after is not None and step == leave_after and members.count > 1:
            kept = list(range(1, members.count))
            members.keep(kept)
            state = state[kept] if isinstance(state, torch.Tensor) else tuple(s[kept] for s in state)
    weights = [{name: value.clone() for name, value in members.member_state(i).items()} for i in range(members.count)]
    return losses_seen, weights


@pytest.mark.slow
@pytest.mark.parametrize("spec", CELLS, ids=lambda s: s.name or s.short_hash)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_compiled_steps_equal_eager_steps(tiny, spec, batched):
    """Losses at every step and weights after four steps (the gradients of all of them went in), a member leaving
    midway."""
    hparams = tiny.default_hparams("smoke").replace(num_layers=2, dropout=0.2)
    eager, wrapped = _members_pair(spec, tiny, hparams, batched)
    captured = CapturedMembers(wrapped, "cpu", backend="aot_eager")
    tokens = torch.randint(tiny.vocab_size, (8, tiny.batch_size), generator=torch.Generator().manual_seed(3))
    leave = 1 if batched else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(17)  # the single model's dropout draws from the default generator, in both runs alike
        expected_losses, expected_weights = _steps(eager, tokens, 4, leave)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(17)
        losses, weights = _steps(captured, tokens, 4, leave)
    assert captured.compiled_calls == 4 and captured.eager_calls == 0
    if batched:
        assert captured.count == 2 and captured.inner.count == 3  # the member that left is padding
    for step, (ours, theirs) in enumerate(zip(losses, expected_losses)):
        torch.testing.assert_close(ours, theirs, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m: f"step {step}: {m}")
    for index, (ours, theirs) in enumerate(zip(weights, expected_weights)):
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=TOLERANCE, atol=TOLERANCE,
                                       msg=lambda m: f"member {index} {name}: {m}")


def test_other_shapes_and_evaluation_run_eagerly_on_the_same_weights(tiny):
    spec = zoo.get("gru")
    eager, wrapped = _members_pair(spec, tiny, tiny.default_hparams("smoke"), batched=True)
    captured = CapturedMembers(wrapped, "cpu", backend="aot_eager")
    tokens = torch.randint(tiny.vocab_size, (8, tiny.batch_size), generator=torch.Generator().manual_seed(4))
    _steps(eager, tokens, 2)
    _steps(captured, tokens, 2)
    captured.train()
    short = captured.losses(tokens[:2], tokens[1:3], None, None)[0]  # a shorter last window: eager, no recompile
    assert captured.eager_calls == 1 and captured.compiled_calls == 2
    eager.train()
    torch.testing.assert_close(short, eager.losses(tokens[:2], tokens[1:3], None, None)[0],
                               rtol=TOLERANCE, atol=TOLERANCE)
    captured.eval()
    eager.eval()
    with torch.no_grad():
        held_out = torch.randint(tiny.vocab_size, (4, 20), generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(captured.losses(held_out[:3], held_out[1:], None, None)[0],
                                   eager.losses(held_out[:3], held_out[1:], None, None)[0],
                                   rtol=TOLERANCE, atol=TOLERANCE)
    assert captured.compiled_calls == 2


def test_planned_steps_is_the_loops_total(tiny):
    events = []
    budget = tiny.budget("smoke")
    train_and_evaluate(zoo.get("tanh_rnn"), tiny, tiny.default_hparams("smoke"), budget, 0, progress=events.append)
    assert {e["total_steps"] for e in events} == {planned_steps(tiny, budget)} == {10}
    windows_per_pass = -(-(len(tiny.splits["train"]) // 4 - 1) // 3)
    assert (planned_steps(tiny, budget.replace(steps_per_epoch=None, max_steps=None))
            == budget.max_epochs * windows_per_pass)


# ------------------------------------------------------------------------------------------ the switch
def test_compile_switch_is_typed_and_auto_keeps_short_and_cpu_runs_eager():
    assert BatchingConfig().compile == "auto"
    assert BatchingConfig.from_dict({"compile": "on"}).compile == "on"
    with pytest.raises(ConfigError, match="compile"):
        BatchingConfig.from_dict({"compile": "maybe"})
    with pytest.raises(ConfigError, match="compile_min_steps"):
        BatchingConfig.from_dict({"compile_min_steps": 0})
    with pytest.raises(ConfigError, match="compile"):
        BatchingConfig.from_dict({"compile": True})
    auto = BatchingConfig()
    threshold = auto.compile_min_steps
    assert auto.compile_decision("cpu", threshold - 1, 8) == (
        False, f"compile: auto, {threshold - 1} planned steps < compile_min_steps {threshold}")
    assert auto.compile_decision("cpu", threshold, CPU_COMPILE_MAX_WIDTH)[0] is True
    assert auto.compile_decision("cpu", 10**9, CPU_COMPILE_MAX_WIDTH + 1)[0] is False
    assert auto.compile_decision("cpu", threshold, 8, AUTO_MIN_CAP_SECONDS)[0] is True
    assert auto.compile_decision("cpu", threshold, 8, 120.0) == (
        False, f"compile: auto, a wall-clock cap of 120 s < {AUTO_MIN_CAP_SECONDS} s")
    # not measured on a GPU: auto leaves CUDA uncompiled, on runs it
    assert auto.compile_decision("cuda", 10**9, 8)[0] is False
    assert BatchingConfig(compile="on").compile_decision("cuda", 1, 8) == (True, "compile: on")
    assert BatchingConfig(compile="on").compile_decision("cpu", 1, 256) == (True, "compile: on")
    assert BatchingConfig(compile="off").compile_decision("cuda", 10**9, 8) == (False, "compile: off")
    for name in ("memorize", "arithmetic", "xml"):
        task = get_task(name)
        for profile in ("smoke", "small"):
            assert not auto.compile_decision("cuda", planned_steps(task, task.budget(profile)), 8)[0], (name, profile)


def test_the_switch_decides_what_train_group_builds(tiny):
    """build_for wraps exactly when the decision says so (a CPU group of width > 32 stays eager even when long)."""
    member = [GroupMember(tiny.default_hparams("smoke"), 0)]
    long = _budget(tiny).replace(max_epochs=10**4, steps_per_epoch=10)
    cpu = torch.device("cpu")
    for config, budget, wrapped in ((BatchingConfig(compile="on"), _budget(tiny), True),
                                    (BatchingConfig(), long, True),  # smoke width, 100,000 planned steps
                                    (BatchingConfig(), _budget(tiny), False),
                                    # the wall-clock cap test's budget
                                    (BatchingConfig(), long.replace(max_seconds=0.3), False),
                                    (BatchingConfig(compile="off"), long, False)):
        with torch.random.fork_rng(devices=[]):
            built = build_for(BatchedMembers.build, config, tiny, budget, cpu)(zoo.get("gru"), tiny, member, cpu)
        assert isinstance(built, CapturedMembers) is wrapped, (config, budget)
    wide = [GroupMember(tiny.default_hparams("small").replace(parameter_budget=10**5), 0)]
    with torch.random.fork_rng(devices=[]):
        built = build_for(BatchedMembers.build, BatchingConfig(), tiny, long, cpu)(zoo.get("gru"), tiny, wide, cpu)
    assert isinstance(built, BatchedMembers)


def test_compile_options_per_device():
    assert compile_options("cpu") == {"fallback_random": True}
    assert compile_options("cuda") == {"triton.cudagraphs": True, "fallback_random": True}


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reduce_overhead_group_run_equals_eager():  # pragma: no cover - GPU only
    task = copy.copy(get_task("memorize"))
    task.unroll, task.batch_size = 5, 8
    members, budget = _group(task), _budget(task)
    wrappers: list[CapturedMembers] = []
    compiled = run_members(zoo.get("lstm"), task, members, budget, "cuda", None, 1,
                           captured_build(BatchedMembers.build, wrappers.append))
    eager = train_group(zoo.get("lstm"), task, members, budget, device="cuda")
    assert wrappers[0].compiled_calls >= 3 and wrappers[0].eager_calls == 0
    for ours, theirs in zip(compiled, eager):
        assert (ours.status, ours.steps) == (theirs.status, theirs.steps)
        assert ours.score == pytest.approx(theirs.score, rel=1e-3, abs=1e-6)
        for mine, other in zip(ours.curve, theirs.curve):
            assert mine["train_loss"] == pytest.approx(other["train_loss"], rel=1e-3)
