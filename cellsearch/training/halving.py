"""Successive halving over a unit's settings: train all to a rung, keep the best 1/eta, go on, up to the full budget.

:func:`train_halving` is what :func:`cellsearch.training.groups.train_settings` does with a
:class:`~cellsearch.fidelity.HalvingConfig` that is enabled. The rungs are
:func:`~cellsearch.fidelity.rung_steps` of the budget's planned steps (whole epochs, the last one
the full budget). Every run of the unit (a batched group of same-shape settings, or one setting
alone) is a :class:`~cellsearch.training.loop.RungRun`, and the runs are interleaved rung by rung:

1. each run still going trains on to the rung (:meth:`RungRun.advance`) and stops after that
   epoch's evaluation, holding everything it needs to go on in memory (weights, dropout generators,
   carried state, row in the stream, schedules and the default generators' state, which each run
   keeps to itself, so that interleaved runs do not disturb each other's random streams);
2. the members still training at the rung, over all runs of the unit, are ranked together by their
   best validation score so far (higher first; ties by position in the unit, so the order is
   deterministic); the best :func:`~cellsearch.fidelity.survivors` ``(n, eta)`` of those ``n`` go on,
   the others end with status ``pruned`` (score: their best validation score so far; their curve ends
   at the rung; message "pruned at rung R (step S)"; no test-split evaluation) when their run next
   advances. In a batched run the pruned members leave the batched model (``Members.keep``), so
   later rungs cost less.

*Who counts at a rung* (``n``): only the members still training there. A member that diverged, or
whose learning-rate decay ended its run before the rung (status ``ok``, its final result), is out
and is neither counted nor pruned. A member that survives every rung trains exactly as it would
alone (bit-identical for a run of one setting, up to the batched model's float rounding in a group):
pruning others never touches its weights, its random stream or its schedule.

*Out of memory.* A run of one setting that runs out of memory is reported ``oom`` (as
``train_settings`` does without halving). A batched group that runs out of memory is retried one
member at a time, as without halving: each member reported ``oom`` trains again alone from the
start, through the rungs it had already survived in its group (no pruning there: those decisions
were made), and rejoins the ranking at the rung its group was heading for. So halving still applies
to it, on the scores it gets alone.

*Costs.* All the unit's runs are held in memory at once (today's ``train_settings`` holds one at a
time); wall-clock caps and ``duration_s`` count each run's own training time only. Progress events
are those of the runs (``member``: the position in the unit), plus ``kind='pruned'`` (step,
total_steps, epoch, score, rung, elapsed_s, member) for each member pruned.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from cellsearch.fidelity import HalvingConfig, rung_steps, survivors
from cellsearch.spec import CellSpec
from cellsearch.tasks.base import Budget, Task
from cellsearch.training.capture import planned_steps
from cellsearch.training.loop import RungRun, TrainResult

__all__ = ["train_halving", "unit_rungs"]


def unit_rungs(task: Task, budget: Budget, config: HalvingConfig) -> list[int]:
    """The rung boundaries (training steps) of a unit trained on ``task`` within ``budget``; the last is the full
    budget's planned steps."""
    # an epoch: budget.steps_per_epoch steps, or one pass over the training stream (as the loop counts it)
    steps_per_epoch = budget.steps_per_epoch or planned_steps(task, Budget(max_epochs=1))
    return rung_steps(planned_steps(task, budget), steps_per_epoch, config.eta, config.min_fraction)


def train_halving(
    spec: CellSpec,
    task: Task,
    members: Sequence[Any],
    budget: Budget,
    device: Any,
    progress: Callable[[dict[str, Any]], None] | None,
    num_threads: int | None,
    plan: Sequence[tuple[Sequence[int], Callable[..., Any]]],
    config: HalvingConfig,
    solo_build: Callable[..., Any],
) -> list[TrainResult]:
    """Train ``members`` (objects with ``hparams`` and ``seed``) with successive halving; a TrainResult each, in order.

    ``plan``: the runs, as (positions in ``members``, ``build`` for :class:`~cellsearch.training.loop.RungRun`),
    covering every member once; ``solo_build``: the build of a member retried alone after its group
    (a run of more than one member) ran out of memory. See the module docstring for the rules.
    """
    members = list(members)
    stops = unit_rungs(task, budget, config)[:-1]

    def start(positions: Sequence[int], build: Callable[..., Any]) -> tuple[list[int], RungRun]:
        positions = list(positions)
        forward = None if progress is None else (
            lambda event: progress({**event, "member": positions[event["member"]]}))
        run = RungRun(spec, task, [members[i] for i in positions], budget, device, forward, num_threads, build, stops)
        return positions, run

    runs = [start(positions, build) for positions, build in plan]
    if sorted(i for positions, _ in runs for i in positions) != list(range(len(members))):
        raise ValueError("train_halving: the plan must hold every member exactly once")
    prune: dict[RungRun, list[int]] = {}
    for rung in range(len(stops) + 1):  # the last pass trains the survivors to the end
        retried = []
        for positions, run in runs:
            if run.ended:
                continue
            run.advance(prune.pop(run, []))
            if run.ended and len(positions) > 1:
                retried += [positions[i] for i, result in enumerate(run.results()) if result.status == "oom"]
        for position in retried:
            entry = start([position], solo_build)
            for _ in range(rung + 1):  # through the rungs it already survived, to this one
                if not entry[1].advance():
                    break
            runs.append(entry)
        if rung == len(stops):
            break
        ranked = sorted(((run.best_score(p), positions[p], run, p) for positions, run in runs for p in run.active),
                        key=lambda candidate: (-candidate[0], candidate[1]))
        for _, _, run, p in ranked[survivors(len(ranked), config.eta) if ranked else 0:]:
            prune.setdefault(run, []).append(p)
    results: list[Any] = [None] * len(members)
    for positions, run in runs:  # a member retried alone comes after its group: its result replaces the oom
        for position, result in zip(positions, run.results()):
            results[position] = result
    return results
