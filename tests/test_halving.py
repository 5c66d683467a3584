"""Successive halving over a unit's settings: the rung rules, and that halving prunes without touching the survivors.

Every member of a halved unit, pruned or not, must have trained exactly as it trains alone up to where it
stopped (bit-identical for runs of one setting, within the batched tolerance of tests/test_batched.py in a
group): runs interleaved rung by rung share one process and must not disturb each other's random streams.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cellsearch import zoo
from cellsearch.batching import BatchingConfig
from cellsearch.config import ConfigError
from cellsearch.fidelity import HalvingConfig, rung_steps, survivors
from cellsearch.search.units import SettingSpec, UnitSpec, run_unit
from cellsearch.tasks import get_task
from cellsearch.training import (
    STATUSES,
    BatchedMembers,
    GroupMember,
    SingleMember,
    group_by_shape,
    train_and_evaluate,
    train_halving,
    train_settings,
    trains_together,
    unit_rungs,
)

TOLERANCE = 1e-5  # tests/test_batched.py's float32 tolerance for a member of a batched model
HALVING = HalvingConfig(enabled=True, eta=2, min_fraction=0.25)


# ------------------------------------------------------------------------------------ the rules
def test_rung_steps_round_up_to_epochs_and_end_at_the_full_budget():
    assert rung_steps(90, 10, 3, 1 / 9) == [10, 30, 90]
    assert rung_steps(100, 10, 3, 1 / 9) == [20, 40, 100]  # 11.1 -> 20, 33.3 -> 40
    assert rung_steps(1000, 1, 3, 1 / 9) == [112, 334, 1000]
    assert rung_steps(10, 5, 3, 1 / 9) == [5, 10]  # 1.1 and 3.3 both round up to 5: merged
    assert rung_steps(7, 5, 2, 0.5) == [5, 7]  # max_steps cut the last epoch: the last rung is the total
    assert rung_steps(18, 2, 2, 0.25) == [6, 10, 18]
    assert rung_steps(81, 1, 3, 1 / 81) == [1, 3, 9, 27, 81]
    assert rung_steps(50, 10, 3, 1.0) == [50]  # min_fraction 1: no halving
    assert rung_steps(40, 30, 3, 0.1) == [30, 40]
    with pytest.raises(ValueError):
        rung_steps(0, 10, 3, 0.5)
    with pytest.raises(ValueError):
        rung_steps(10, 10, 1, 0.5)


def test_survivors():
    assert [survivors(n, 3) for n in (1, 2, 3, 8, 9, 10, 27)] == [1, 1, 1, 2, 3, 3, 9]
    assert [survivors(n, 2) for n in (1, 2, 3, 8)] == [1, 1, 1, 4]


def test_halving_config_is_typed_and_off_by_default():
    assert HalvingConfig().enabled is False
    assert HalvingConfig.from_dict(None) == HalvingConfig() == HalvingConfig.from_dict({})
    config = HalvingConfig.from_dict({"enabled": True, "eta": 4, "min_fraction": 0.5})
    assert HalvingConfig.from_dict(config.to_dict()) == config
    for data, key in [({"eta": 1}, "eta"), ({"eta": True}, "eta"), ({"min_fraction": 0}, "min_fraction"),
                      ({"min_fraction": 1.5}, "min_fraction"), ({"enabled": "yes"}, "enabled"),
                      ({"rungs": 3}, "rungs")]:
        with pytest.raises(ConfigError, match=key):
            HalvingConfig.from_dict(data)
    with pytest.raises(ConfigError, match="eta"):
        HalvingConfig(eta=1)
    assert "pruned" in STATUSES


# ---------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def memorize():
    return get_task("memorize")


@pytest.fixture(scope="module")
def budget(memorize):
    # 9 epochs of 2 steps; a patience that no decay ends early; rungs at 6, 10 and 18 steps with HALVING
    return memorize.budget("smoke").replace(max_epochs=9, steps_per_epoch=2, patience=20, decay_epochs=1)


def _unit(memorize) -> list[GroupMember]:
    """Two batched shapes (one and two layers; one with a diverging member), a batched group with dropout and a
    setting alone with dropout (its dropout draws from torch's default generator)."""
    base = memorize.default_hparams("smoke")
    two = base.replace(num_layers=2)
    settings = [
        base.replace(learning_rate=0.5),
        base.replace(learning_rate=1e38, max_grad_norm=20.0),  # diverges at its second step
        base.replace(learning_rate=2.0, init_scale=0.7),
        two.replace(learning_rate=1.0),
        two.replace(learning_rate=0.3, init_scale=0.7, max_grad_norm=1.0),
        base.replace(learning_rate=5.0, init_scale=2.8, max_grad_norm=1.0),
        base.replace(dropout=0.3, learning_rate=1.0),
        base.replace(dropout=0.3, learning_rate=2.0, init_scale=0.5),
        two.replace(dropout=0.2, learning_rate=1.0),  # a shape of its own: trained alone
        two.replace(learning_rate=2.0),
    ]
    return [GroupMember(h, seed) for seed, h in enumerate(settings, start=11)]


def _same_prefix(ours, alone, exact: bool, what: str, tolerance: float = TOLERANCE,
                 exact_divergence: bool = True) -> None:
    """``ours`` trained as ``alone`` did, up to where ``ours`` stopped (all of it unless pruned)."""
    assert (ours.seed, ours.hparams, ours.hidden_size) == (alone.seed, alone.hparams, alone.hidden_size), what
    if ours.status != "pruned":
        assert (ours.status, ours.steps, ours.epochs, len(ours.curve)) == (
            alone.status, alone.steps, alone.epochs, len(alone.curve)), what
    assert len(ours.curve) <= len(alone.curve) and (ours.curve or ours.status == "diverged"), what
    if exact:
        assert ours.curve == alone.curve[: len(ours.curve)], what
    else:
        for point, theirs in zip(ours.curve, alone.curve):
            assert point.keys() == theirs.keys(), what
            for key, value in theirs.items():
                assert point[key] == pytest.approx(value, rel=tolerance, abs=1e-9), f"{what}: curve {key}"
    if ours.status == "diverged" and exact_divergence:
        assert ours.message == alone.message and ours.score == 0.0, what
    elif ours.status == "diverged":  # the same step; a batched model may overflow to inf where one alone gets nan
        assert ours.message.split(" at ")[-1] == alone.message.split(" at ")[-1] and ours.score == 0.0, what
    elif ours.status == "pruned":
        best = max(point["score"] for point in ours.curve)
        assert ours.score == best and ours.steps == ours.curve[-1]["step"], what
        assert ours.message == f"pruned at rung {_rung_of(ours)} (step {ours.steps})", what
    elif exact:
        assert (ours.score, ours.metrics) == (alone.score, alone.metrics), what
    else:
        assert ours.score == pytest.approx(alone.score, rel=tolerance, abs=1e-9), what


RUNGS = [6, 10, 18]


def _rung_of(result) -> int:
    return RUNGS.index(result.steps) + 1


def _check_rungs(results) -> None:
    """At each rung, the members still training there: survivors() of them go on, and no pruned one ranked above
    a kept one (best score so far, ties by position)."""
    for rung, stop in enumerate(RUNGS[:-1], start=1):
        here = [i for i, r in enumerate(results) if any(p["step"] == stop for p in r.curve)
                and (r.steps > stop or r.status == "pruned")]
        pruned = [i for i in here if results[i].status == "pruned" and results[i].steps == stop]
        kept = [i for i in here if i not in pruned]
        assert len(kept) == survivors(len(here), HALVING.eta), (rung, here, pruned)

        def best(i):
            return max(p["score"] for p in results[i].curve if p["step"] <= stop)

        for k in kept:
            for p in pruned:
                assert (best(k), -k) > (best(p), -p), (rung, k, p)


def test_survivors_and_pruned_members_trained_as_alone_across_shapes(memorize, budget):
    spec = zoo.get("gru")
    members = _unit(memorize)
    assert unit_rungs(memorize, budget, HALVING) == RUNGS
    groups = group_by_shape(spec, memorize, [m.hparams for m in members])
    batched = {i for g in groups if len(g) > 1 and trains_together(spec, memorize, members[g[0]].hparams, "cpu",
                                                                      BatchingConfig()) for i in g}
    assert len([g for g in groups if len(g) > 1]) == 3 and len(batched) == 9  # three batched groups, one alone
    events = []
    torch.manual_seed(5)
    before = torch.get_rng_state()
    results = train_settings(spec, memorize, members, budget, progress=events.append, halving=HALVING)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left alone
    alone = [train_and_evaluate(spec, memorize, m.hparams, budget, m.seed, batching=BatchingConfig()) for m in members]
    statuses = [r.status for r in results]
    assert statuses[1] == "diverged" and "at step 2" in results[1].message
    assert statuses.count("pruned") == 7 and statuses.count("ok") == 2, statuses  # 9 at rung 1 -> 4 -> 2
    for index, (ours, theirs) in enumerate(zip(results, alone)):
        _same_prefix(ours, theirs, exact=index not in batched, what=f"setting {index}")
    _check_rungs(results)
    # the members pruned at a rung train no further: one step event per step each member took
    for index, result in enumerate(results):
        steps = [e["step"] for e in events if e["kind"] == "step" and e["member"] == index]
        assert steps == list(range(1, result.steps + 1)), index
    pruned_events = {e["member"]: e for e in events if e["kind"] == "pruned"}
    assert sorted(pruned_events) == [i for i, r in enumerate(results) if r.status == "pruned"]
    for index, event in pruned_events.items():
        assert (event["step"], event["score"], event["rung"]) == (results[index].steps, results[index].score,
                                                                  _rung_of(results[index]))
    # and the same unit again gives the same results
    again = train_settings(spec, memorize, members, budget, halving=HALVING)
    assert [_comparable(r) for r in again] == [_comparable(r) for r in results]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_halving_on_cuda_prunes_without_touching_the_survivors(memorize, budget):  # pragma: no cover - GPU only
    """The same unit on a GPU, where every shape group trains batched: pruned members leave the batch on the
    device, survivors end as they end alone on the device (float32 on CUDA: a looser tolerance)."""
    spec = zoo.get("gru")
    members = _unit(memorize)
    results = train_settings(spec, memorize, members, budget, device="cuda", halving=HALVING)
    alone = [train_and_evaluate(spec, memorize, m.hparams, budget, m.seed, device="cuda") for m in members]
    statuses = [r.status for r in results]
    assert statuses[1] == "diverged" and statuses.count("pruned") == 7 and statuses.count("ok") == 2, statuses
    for index, (ours, theirs) in enumerate(zip(results, alone)):
        _same_prefix(ours, theirs, exact=False, what=f"setting {index}", tolerance=1e-4, exact_divergence=False)
    _check_rungs(results)


def test_interleaved_runs_keep_their_own_dropout_streams(memorize, budget):
    """Runs alone with dropout draw from torch's default generator: a survivor goes on after the other runs trained
    between its rungs, and still gets exactly its result alone."""
    spec = zoo.get("gru")
    base = memorize.default_hparams("smoke").replace(dropout=0.3, num_layers=2)
    members = [GroupMember(base.replace(learning_rate=lr), seed) for seed, lr in enumerate((0.5, 1.0, 2.0, 3.0))]
    plan = [([i], SingleMember.build) for i in range(len(members))]
    results = train_halving(spec, memorize, members, budget, "cpu", None, 1, plan, HALVING, SingleMember.build)
    assert sorted(r.status for r in results) == ["ok", "pruned", "pruned", "pruned"]
    for index, member in enumerate(members):
        alone = train_and_evaluate(spec, memorize, member.hparams, budget, member.seed)
        _same_prefix(results[index], alone, exact=True, what=f"setting {index}")
    _check_rungs(results)


def _comparable(result):
    return {k: v for k, v in result.to_dict().items() if k != "duration_s"}


def test_halving_off_or_without_rungs_is_training_without_it(memorize, budget):
    spec = zoo.get("tanh_rnn")
    members = _unit(memorize)[:6]
    plain = [_comparable(r) for r in train_settings(spec, memorize, members, budget)]
    assert [_comparable(r) for r in train_settings(spec, memorize, members, budget, halving=HalvingConfig())] == plain
    # enabled, but the first rung is the whole budget: nobody is pruned, every run trains as without halving
    whole = HalvingConfig(enabled=True, min_fraction=1.0)
    assert [_comparable(r) for r in train_settings(spec, memorize, members, budget, halving=whole)] == plain
    with pytest.raises(ValueError, match="checkpoints"):
        train_settings(spec, memorize, members, budget, halving=HALVING, checkpoints=[None] * len(members))


def test_later_rungs_train_a_smaller_batched_model(memorize, budget):
    spec = zoo.get("gru")
    base = memorize.default_hparams("smoke")
    members = [GroupMember(base.replace(learning_rate=lr, init_scale=s), seed)
               for seed, (lr, s) in enumerate([(0.5, 1.0), (1.0, 0.7), (2.0, 1.0), (0.3, 0.5), (5.0, 2.8)])]
    built, counts = [], []

    def build(*args):
        built.append(BatchedMembers.build(*args))
        return built[-1]

    def progress(event):
        if event["kind"] == "step":
            counts.append((event["step"], built[-1].count))

    results = train_halving(spec, memorize, members, budget, "cpu", progress, 1, [(list(range(5)), build)], HALVING,
                            SingleMember.build)
    assert len(built) == 1
    width = {step: count for step, count in counts}
    assert [width[s] for s in (1, 6, 7, 10, 11, 18)] == [5, 5, 2, 2, 1, 1]  # survivors(5, 2) = 2, then 1
    assert [r.status for r in results].count("ok") == 1
    _check_rungs(results)


class _RunsOutOfMemory:
    """A members object that raises out of memory at its ``fail_at``-th training window."""

    def __init__(self, inner, fail_at: int):
        self._inner, self._fail_at, self._calls = inner, fail_at, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def losses(self, inputs, targets, scored, state):
        if torch.is_grad_enabled():
            self._calls += 1
            if self._calls == self._fail_at:
                raise MemoryError("can't allocate memory (simulated)")
        return self._inner.losses(inputs, targets, scored, state)


@pytest.mark.parametrize("fail_at", [4, 8])  # before rung 1 (three members in the group) or between rungs 1 and 2
def test_a_group_out_of_memory_is_retried_alone_and_rejoins_the_halving(memorize, budget, fail_at):
    spec = zoo.get("gru")
    members = _unit(memorize)[:3] + _unit(memorize)[5:6]  # one batched group of four (one diverges at step 2)

    def build(*args):
        return _RunsOutOfMemory(BatchedMembers.build(*args), fail_at=fail_at)

    retried = []

    def solo_build(spec, task, members, device):
        retried.append(members[0].seed)
        return SingleMember.build(spec, task, members, device)

    results = train_halving(spec, memorize, members, budget, "cpu", None, 1, [([0, 1, 2, 3], build)], HALVING,
                            solo_build)
    alone = [train_and_evaluate(spec, memorize, m.hparams, budget, m.seed) for m in members]
    # 3 training at rung 1 -> 2 pruned, then 1 to the end; those in the group when it ran out of memory trained
    # again alone, through the rungs they had survived, and rejoined the ranking
    assert sorted(r.status for r in results) == ["diverged", "ok", "pruned", "pruned"]
    (survivor,) = [i for i, r in enumerate(results) if r.status == "ok"]
    assert results[survivor].steps == 18
    assert retried == ([m.seed for i, m in enumerate(members) if i != 1] if fail_at == 4 else [members[survivor].seed])
    assert "oom" not in [r.status for r in results]
    for index, (ours, theirs) in enumerate(zip(results, alone)):
        _same_prefix(ours, theirs, exact=False, what=f"setting {index}")
    _check_rungs(results)
    # a retried member that runs out of memory alone is reported oom
    huge = memorize.default_hparams("smoke").replace(parameter_budget=10**18)
    results = train_settings(spec, memorize, [GroupMember(huge, 0), GroupMember(huge.replace(learning_rate=0.5), 1)],
                             budget, halving=HALVING)
    assert [(r.status, r.score, r.steps) for r in results] == [("oom", 0.0, 0)] * 2


def test_a_unit_spec_carries_halving(memorize, budget):
    base = memorize.default_hparams("smoke")
    settings = tuple(SettingSpec(n, base.replace(learning_rate=lr).to_dict(), n)
                     for n, lr in enumerate((0.5, 1.0, 2.0)))
    unit = UnitSpec(unit_id=1, cell=zoo.get("gru").to_dict(), task="memorize", budget_profile="smoke",
                    settings=settings, budget=budget.to_dict(), halving=HALVING.to_dict())
    statuses = [r.status for r in run_unit(unit, memorize)]
    assert statuses.count("pruned") == 2 and statuses.count("ok") == 1
    plain = run_unit(dataclasses.replace(unit, halving=None), memorize)
    assert [r.status for r in plain] == ["ok"] * 3
