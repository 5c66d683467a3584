"""Training a group of hyperparameter settings of one cell together: one batched model, one loop.

Settings of a cell that share a shape (layers, width, dropout, dropout mode, layer norm) differ only
in numbers: learning rate, init scale, gradient-norm cap and seed. :func:`train_group` trains such a group as one
:class:`~cellsearch.model.BatchedSequenceModel` (stacked weights, batched matrix
multiplies), with everything per member that a run has alone:

- each member is built exactly as :func:`~cellsearch.training.loop.train_and_evaluate` builds it (the
  same seeded initialisation), and its dropout masks come from its own generator, continued from
  the state its seed leaves, so that it sees the masks it would see alone;
- its own learning rate and :class:`~cellsearch.training.loop.PlateauHalving` decay, its own
  gradient-norm clipping (the norm over the member's own gradients), its own held-out scores,
  curve and :class:`~cellsearch.training.loop.TrainResult`;
- a member whose loss, gradient norm or held-out loss is NaN or infinite is reported ``diverged``
  (score 0) and leaves the group; so does a member whose decay has ended (status ``ok``). The
  others go on, and the batched model shrinks to the members still training.

All members read the same token stream (the training loop's order does not depend on the
hyperparameters). Results equal training each member alone up to floating-point rounding (the
batched multiplies sum in another order); ``tests/test_batched.py`` checks scores and curves.

The loop itself is the training loop of :mod:`cellsearch.training.loop` (``run_members``): a
single run is the one-member case with a plain :class:`~cellsearch.model.SequenceModel`, a group
the batched case (:class:`BatchedMembers`, a :class:`~cellsearch.training.members.Members`); both
go through the same steps, evaluation, schedule, budget and failure handling.

Group-level differences: a wall-clock cap (``budget.max_seconds``) applies to the group as
``max_seconds`` times the number of members (each member's share of the wall clock is what it
would have alone), and ``duration_s`` of a member is its share: the group's wall time until the
member left, divided by the number of members. A group that runs out of memory is retried one
member at a time (:func:`train_settings`).

CPU matrix-multiply route: :func:`configure_cpu_matmul` (see its doc) decides at start-up, from a
check against float64 on this machine, whether float32 matmuls go through oneDNN.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from cellsearch.batching import BatchingConfig
from cellsearch.compiler.onednn import verify_route
from cellsearch.fidelity import HalvingConfig
from cellsearch.hparams import HyperParams
from cellsearch.model import BatchedSequenceModel, build_model, member_losses, solve_hidden_size
from cellsearch.spec import CellSpec
from cellsearch.tasks.base import Budget, Task
from cellsearch.training.capture import build_for
from cellsearch.training.checkpoint import GroupCheckpoint
from cellsearch.training.halving import train_halving
from cellsearch.training.loop import GroupMember, SingleMember, run_members, train_and_evaluate

__all__ = [
    "BatchedMembers",
    "train_group",
    "train_settings",
    "group_by_shape",
    "batching_pays",
    "trains_together",
    "shape_key",
    "configure_cpu_matmul",
]


def shape_key(spec: CellSpec, task: Task, hparams: HyperParams) -> tuple:
    """What members of one batched model must share: (num_layers, hidden width, dropout, dropout mode, layer norm)."""
    width = solve_hidden_size(spec, task.vocab_size, hparams.num_layers, hparams.parameter_budget)
    return hparams.num_layers, width, float(hparams.dropout), hparams.dropout_mode, hparams.layer_norm


def batching_pays(spec: CellSpec, task: Task, hparams: HyperParams) -> bool:
    """Whether a CPU gains from training settings of this shape together: the cells outweigh the softmax layer.

    Batching saves per-operation overhead and (see :func:`~cellsearch.compiler.batched.table_source`)
    the first layer's input projections; a softmax-bound model (a large vocabulary on narrow
    layers, like PTB at small budgets) spends its time in the ``vocab x width`` multiplies and the
    softmax, which batching does not make cheaper on a CPU (measured: slower, from the K-fold
    logits tensor). The rule: batch when the decoder's matrix is no larger than the cells' weights.
    """
    width = solve_hidden_size(spec, task.vocab_size, hparams.num_layers, hparams.parameter_budget)
    return task.vocab_size * width <= hparams.num_layers * spec.parameter_count(width)


def group_by_shape(spec: CellSpec, task: Task, settings: Sequence[HyperParams],
                   max_members: int = 20) -> list[list[int]]:
    """Indices of ``settings`` grouped by :func:`shape_key`, in order of first appearance, at most ``max_members``
    each."""
    groups: dict[tuple, list[list[int]]] = {}
    order: list[list[int]] = []
    for index, hparams in enumerate(settings):
        chunks = groups.setdefault(shape_key(spec, task, hparams), [])
        if not chunks or len(chunks[-1]) >= max_members:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(index)
    return order


# ------------------------------------------------------------------------- the batched members
class BatchedMembers:
    """The group side of the training loop: K members as one :class:`BatchedSequenceModel`.

    Implements :class:`~cellsearch.training.members.Members` for
    :func:`cellsearch.training.loop.run_members` (the one-member case is
    :class:`cellsearch.training.loop.SingleMember`): per-member losses, clipping and update,
    dropping members, and snapshots of a member's weights.
    """

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    @classmethod
    def build(cls, spec: CellSpec, task: Task, members: Sequence[GroupMember],
              device: torch.device) -> "BatchedMembers":
        """Each member initialised as alone (seeded), then stacked; call inside a forked RNG."""
        models, generators = [], []
        for member in members:
            torch.manual_seed(member.seed)
            models.append(build_model(spec, task, member.hparams).to(device))
            generators.append(_generator_at_default_state(device))
        return cls(BatchedSequenceModel.from_members(models, generators), device)

    @property
    def count(self) -> int:
        return self.model.members

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def losses(self, inputs, targets, scored, state):
        """Per-member mean losses (K,), the scored count, per-member correct counts (K,), and the state."""
        logits, state = self.model(inputs, state)
        return (*member_losses(logits, targets, scored), state)

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def clip_and_update(self, learning_rates: Sequence[float], max_norms: Sequence[float]) -> list[float]:
        """Clip each member's gradients to its own norm cap and take its SGD step; returns the norms.

        As ``clip_grad_norm_`` does alone: the norm of the per-parameter norms, a factor
        ``cap / (norm + 1e-6)`` capped at 1. A member with a non-finite norm gets NaN weights; the
        loop drops it.
        """
        count = self.count
        # parameters without a gradient this step (the embedding of a cell whose output ignores x) are skipped
        pairs = [(p, p.grad) for p in self.parameters if p.grad is not None]
        if not pairs:
            return [0.0] * count
        per_parameter = torch.stack([torch.linalg.vector_norm(g.reshape(count, -1), dim=1) for _, g in pairs])
        norms = torch.linalg.vector_norm(per_parameter, dim=0)
        caps = torch.tensor(max_norms, dtype=norms.dtype, device=norms.device)
        factors = (caps / (norms + 1e-6)).clamp(max=1.0)
        steps = -torch.tensor(learning_rates, dtype=norms.dtype, device=norms.device)
        with torch.no_grad():
            for parameter, grad in pairs:
                view = (count,) + (1,) * (grad.dim() - 1)
                grad.mul_(factors.view(view))
                parameter.add_(grad * steps.view(view))
        return norms.tolist()

    def keep(self, indices: Sequence[int]) -> None:
        """Continue with only the members at ``indices`` (positions in the current group)."""
        self.model = self.model.take(indices)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]

    def snapshot(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.model.member_state(index).items()}

    def restored(self, snapshots: Sequence[dict[str, torch.Tensor]]) -> "BatchedMembers":
        """Members with the given weights (for the test evaluation of the best weights)."""
        model = self.model.take([0] * len(snapshots))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(torch.stack([snapshot[name] for snapshot in snapshots]))
        return BatchedMembers(model, self.device)

    def member_model(self, index: int) -> nn.Module:
        """Member ``index`` as a separate ``SequenceModel``."""
        return self.model.member(index)

    # What a checkpoint (cellsearch.training.checkpoint.GroupCheckpoint) reads and writes per member: the same
    # things a single run's checkpoint holds, so that a member's file resumes alone or in a group.
    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        return self.model.member_state(index)

    def load_member_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        if len(states) != self.count:
            raise ValueError(f"{self.count} members, {len(states)} states")
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(torch.stack([state[name] for state in states]))

    def rng_state(self, index: int) -> dict[str, torch.Tensor | None]:
        """The member's dropout generator, stored where a single run keeps the default generator of that device."""
        state = self.model.generators[index].get_state()
        if self.device.type == "cuda":
            return {"torch": torch.get_rng_state(), "cuda": state}
        return {"torch": state, "cuda": None}

    def set_rng_states(self, states: Sequence[dict[str, torch.Tensor | None]]) -> None:
        key = "cuda" if self.device.type == "cuda" else "torch"
        for generator, state in zip(self.model.generators, states, strict=True):
            if state.get(key) is not None:
                generator.set_state(state[key])

    def member_carried(self, carried: Any, index: int) -> Any:
        """Member ``index``'s part of a carried state, in a single run's layout."""
        if carried is None:
            return None
        if isinstance(carried, torch.Tensor):
            return carried[index]
        return tuple(part[index] for part in carried)

    def join_carried(self, parts: Sequence[Any]) -> Any:
        """The group's carried state from the members' parts (the inverse of :meth:`member_carried`)."""
        if isinstance(parts[0], torch.Tensor):
            return torch.stack(list(parts))
        return tuple(torch.stack([part[state] for part in parts]) for state in range(len(parts[0])))


def _generator_at_default_state(device: torch.device) -> torch.Generator:
    """A generator continuing the default generator of ``device`` (where dropout would draw alone)."""
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        generator.set_state(torch.cuda.get_rng_state(device))
    else:
        generator.set_state(torch.get_rng_state())
    return generator


# ------------------------------------------------------------------------------- entry points
def train_group(
    spec: CellSpec,
    task: Task,
    members: Sequence[GroupMember],
    budget: Budget,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, Any]], None] | None = None,
    num_threads: int | None = 1,
    checkpoints: Sequence[Any] | None = None,
    config: BatchingConfig | None = None,
) -> list:
    """Train ``members`` (same shape, see :func:`shape_key`) as one batched model; a TrainResult each, in order.

    ``progress`` gets the events of :func:`~cellsearch.training.loop.train_and_evaluate` with a
    ``member`` key (the member's position in ``members``). ``checkpoints``, when given, holds one
    :class:`~cellsearch.training.checkpoint.Checkpointer` per member: each member's file is restored before
    training (all from the same point, see :attr:`~cellsearch.training.checkpoint.Checkpoint.resume_point`)
    and written after every epoch, as a single run's would be. ``config.compile`` runs the training
    step through ``torch.compile`` (:mod:`cellsearch.training.capture`) where
    :meth:`BatchingConfig.compile_decision` says so (never for short runs). Raises ``ValueError`` when the
    members' shapes differ.
    """
    members = list(members)
    if not members:
        return []
    shapes = {shape_key(spec, task, m.hparams) for m in members}
    if len(shapes) > 1:
        raise ValueError(f"train_group: members differ in (layers, width, dropout): {sorted(shapes)}; "
                         f"use group_by_shape")
    build = build_for(BatchedMembers.build, config or BatchingConfig(), task, budget, device)
    return run_members(spec, task, members, budget, device, progress, num_threads, build,
                       checkpoint=_group_checkpoint(checkpoints))


def _group_checkpoint(checkpoints: Sequence[Any] | None):
    if checkpoints is None:
        return None
    return GroupCheckpoint(checkpoints)


def trains_together(spec: CellSpec, task: Task, hparams: HyperParams, device: str | torch.device,
                    config: BatchingConfig) -> bool:
    """Whether :func:`train_settings` trains several settings of this shape as one batched model."""
    if not config.enabled:
        return False
    if torch.device(device).type != "cpu" or config.when == "always":
        return True
    return batching_pays(spec, task, hparams)


def train_settings(
    spec: CellSpec,
    task: Task,
    members: Sequence[GroupMember],
    budget: Budget,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, Any]], None] | None = None,
    num_threads: int | None = 1,
    config: BatchingConfig | None = None,
    checkpoints: Sequence[Any] | None = None,
    halving: HalvingConfig | None = None,
) -> list:
    """Train every setting of ``members``; same-shape settings as batched groups when ``config.enabled``.

    One TrainResult per member, in order. Groups of one, groups where batching does not pay on a
    CPU (:func:`batching_pays`, unless ``config.when`` is ``always``), and every member when
    batching is off, go through :func:`~cellsearch.training.loop.train_and_evaluate`. A group that runs out of memory
    is retried one member at a time. ``progress`` events carry a ``member`` key (position in
    ``members``). ``checkpoints`` (one :class:`~cellsearch.training.checkpoint.Checkpointer` per member, or
    None) checkpoint every run as :func:`train_group` does; members that are to train together
    must resume from the same point.

    ``halving`` (a :class:`~cellsearch.fidelity.HalvingConfig`), when enabled, trains the same runs (groups
    and single settings alike) rung by rung with successive halving over all of ``members``
    (:mod:`cellsearch.training.halving`): settings ranked low at a rung end with status ``pruned``,
    and a setting that survives every rung gets the result it gets without halving; ``progress`` also
    gets a ``kind='pruned'`` event per pruned setting. It cannot be combined with ``checkpoints``
    (``ValueError``: retraining never halves). Disabled or None: exactly the results without it.
    """
    config = config or BatchingConfig()
    members = list(members)
    halves = halving is not None and halving.enabled
    if halves and checkpoints is not None:
        raise ValueError("train_settings: halving cannot be combined with checkpoints (retraining never halves)")
    if config.enabled and torch.device(device).type == "cpu":
        configure_cpu_matmul(config.onednn)
    results: list = [None] * len(members)

    def solo(index: int) -> None:
        forward = None if progress is None else (lambda event: progress({**event, "member": index}))
        member = members[index]
        results[index] = train_and_evaluate(spec, task, member.hparams, budget, member.seed, device, forward,
                                            num_threads,
                                            checkpoint=None if checkpoints is None else checkpoints[index],
                                            batching=config)

    if config.enabled:
        groups = group_by_shape(spec, task, [m.hparams for m in members], config.max_members)
    else:
        groups = [[i] for i in range(len(members))]
    if halves:
        # the runs train_settings makes below, as RungRuns interleaved rung by rung (same builds, same results)
        solo_build = build_for(SingleMember.build, config, task, budget, device)
        plan: list[tuple[list[int], Callable]] = []
        for group in groups:
            if len(group) == 1 or not trains_together(spec, task, members[group[0]].hparams, device, config):
                plan += [([index], solo_build) for index in group]
            else:
                plan.append((group, build_for(BatchedMembers.build, config, task, budget, device)))
        return train_halving(spec, task, members, budget, device, progress, num_threads, plan, halving, solo_build)
    for group in groups:
        if len(group) == 1 or not trains_together(spec, task, members[group[0]].hparams, device, config):
            for index in group:
                solo(index)
            continue
        forward = None if progress is None else (
            lambda event, group=group: progress({**event, "member": group[event["member"]]}))
        group_checkpoints = None if checkpoints is None else [checkpoints[i] for i in group]
        for index, result in zip(group, train_group(spec, task, [members[i] for i in group], budget, device, forward,
                                                    num_threads, group_checkpoints, config)):
            results[index] = result
        for index in group:
            if results[index].status == "oom":
                solo(index)
    return results


# ------------------------------------------------------------------------------- oneDNN route
_ROUTE_CHECKS: dict[str, Any] = {}


def configure_cpu_matmul(mode: str = "auto"):
    """Choose the CPU float32 matmul route once per process and mode (see :mod:`cellsearch.compiler.onednn`).

    Returns the :class:`~cellsearch.compiler.onednn.MatmulRouteCheck`; the check costs a few
    milliseconds and runs once per mode (the route is process-wide torch state).
    """
    check = _ROUTE_CHECKS.get(mode)
    if check is None:
        check = _ROUTE_CHECKS[mode] = verify_route(mode)
    torch.backends.mkldnn.matmul.fp32_precision = "ieee" if check.route == "default" else check.route
    return check
