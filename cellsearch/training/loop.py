"""The one training loop: every search, ``cellsearch train`` and every retraining goes through it.

:func:`train_and_evaluate` trains a language-model-shaped network (embedding of
the hidden width -> :class:`~cellsearch.compiler.CellRNN` -> linear softmax)
with plain SGD, gradient-norm clipping and the paper's learning-rate decay on a
:class:`~cellsearch.tasks.base.Task`, and scores it on held-out data. The
hidden width is solved from the parameter budget (:func:`~cellsearch.model.solve_hidden_size`),
so that different cells are compared at equal size, as in the paper.

The loop is :func:`run_members`: it trains one or several settings of a cell in lockstep
through a *members* object (:class:`~cellsearch.training.members.Members`, whose docstring is
the contract). A single run is the one-member case (:class:`SingleMember`, a plain
:class:`~cellsearch.model.SequenceModel`); :mod:`cellsearch.training.groups` supplies the
batched case (K settings of one shape as one stacked model). Steps, clipping, evaluation, the
schedule, budgets and failure statuses are this one loop for both. The models, their sizing and
their losses are :mod:`cellsearch.model`; checkpoints are :mod:`cellsearch.training.checkpoint`
and the compiled training step :mod:`cellsearch.training.capture`, both used from here.

Size: one module on purpose. The loop's state machine (steps, evaluation, schedule, members leaving,
budgets, failures, checkpoints, and pausing at the rungs of successive halving in :class:`RungRun`)
shares one set of per-member records; split apart, a change to one exit path (a new status, a new way
to leave) would have to be made in several places that must agree.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cellsearch.config import ConfigError
from cellsearch.hparams import HyperParams
from cellsearch.model import SequenceModel, build_model, masked_loss, model_parameter_count, solve_hidden_size
from cellsearch.spec import CellSpec
from cellsearch.tasks.base import Budget, Split, Task
from cellsearch.training.capture import build_for
from cellsearch.training.checkpoint import GroupCheckpoint
from cellsearch.training.members import Members

__all__ = [
    "Budget",
    "TrainResult",
    "STATUSES",
    "PlateauHalving",
    "batchify",
    "evaluate",
    "train_and_evaluate",
    "GroupMember",
    "SingleMember",
    "run_members",
    "RungRun",
    "evaluate_members",
]

#: ``ok``: finished within its budget; ``timeout``: the wall-clock cap ended it
#: early (the score is still the best held-out score reached); ``diverged``: a
#: NaN or infinite loss or gradient (score 0); ``oom``: out of memory (score 0); ``pruned``: successive
#: halving stopped it at a rung (:class:`RungRun`; the score is the best held-out score reached by then).
STATUSES = ("ok", "timeout", "diverged", "oom", "pruned")


# ------------------------------------------------------------------------ data
def batchify(split: Split, batch_size: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a stream into ``batch_size`` parallel columns: tokens (rows, batch) and the mask alike.

    Trailing tokens that do not fill a row are dropped, as in PyTorch's word_language_model example.
    """
    rows = len(split) // batch_size
    if rows < 2:
        # A ConfigError (a ValueError): the task file's batch sizes or the budget's eval_tokens chose this.
        raise ConfigError(f"a stream of {len(split)} tokens is too short for batch size {batch_size} (it needs "
                          f"at least {2 * batch_size}: raise eval_tokens or lower the batch size)")
    tokens = torch.from_numpy(np.asarray(split.tokens[: rows * batch_size], dtype=np.int64))
    tokens = tokens.view(batch_size, rows).t().contiguous().to(device)
    mask = None
    if split.mask is not None:
        mask = torch.from_numpy(np.array(split.mask[: rows * batch_size]))
        mask = mask.view(batch_size, rows).t().contiguous().to(device)
    return tokens, mask


def _detach(state: Any) -> Any:
    """Cut the graph behind the carried state (truncated backpropagation)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(_detach(s) for s in state)


def _window(tokens: torch.Tensor, mask: torch.Tensor | None, row: int, unroll: int):
    length = min(unroll, tokens.shape[0] - 1 - row)
    inputs = tokens[row : row + length]
    targets = tokens[row + 1 : row + 1 + length]
    scored = None if mask is None else mask[row + 1 : row + 1 + length]
    return inputs, targets, scored


@torch.no_grad()
def evaluate(model: SequenceModel, tokens: torch.Tensor, mask: torch.Tensor | None, unroll: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the scored targets of a batchified stream (state carried)."""
    return evaluate_members(SingleMember(model), tokens, mask, unroll)[0]


# -------------------------------------------------------------------- schedule
class PlateauHalving:
    """The paper's learning-rate decay, one held-out score per epoch.

    Once the score has not improved for ``patience`` consecutive epochs, the
    learning rate is multiplied by ``factor`` before each of the next
    ``decay_epochs`` epochs; after those the run stops. Improvements during the
    decay do not restart it. :meth:`update` takes an epoch's score and returns
    whether training goes on; :attr:`learning_rate` is the rate for the next epoch.
    """

    def __init__(self, learning_rate: float, patience: int = 3, decay_epochs: int = 4, factor: float = 0.5):
        self.learning_rate = learning_rate
        self.patience = patience
        self.decay_epochs = decay_epochs
        self.factor = factor
        self.best = -math.inf
        self.epochs_without_improvement = 0
        self.decay_epochs_left: int | None = None

    @property
    def decaying(self) -> bool:
        return self.decay_epochs_left is not None

    def update(self, score: float) -> bool:
        if score > self.best:
            self.best = score
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if self.decay_epochs_left is None:
            if self.epochs_without_improvement < self.patience:
                return True
            self.decay_epochs_left = self.decay_epochs
        else:
            self.decay_epochs_left -= 1
        if self.decay_epochs_left <= 0:
            return False
        self.learning_rate *= self.factor
        return True


# ---------------------------------------------------------------------- result
@dataclass(frozen=True)
class TrainResult:
    """What one training run produced.

    ``score``: the best held-out score over the run's evaluations (higher is
    better; 0 when ``status`` is ``diverged`` or ``oom``). ``metrics``: the held-out
    loss, accuracy (and perplexity for ptb) at the best evaluation, and test
    metrics when the budget asks for them. ``curve``: one entry per evaluation
    (epoch, step, learning rate, mean training loss, score and held-out metrics;
    no timings, so that equal seeds give equal curves).
    """

    status: str
    score: float
    metrics: dict[str, float]
    steps: int
    epochs: int
    duration_s: float
    curve: tuple[dict[str, float], ...]
    hidden_size: int
    parameter_count: int
    hparams: dict[str, Any]
    seed: int
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["curve"] = [dict(point) for point in self.curve]
        return data


def _is_out_of_memory(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    if isinstance(error, MemoryError):
        return True
    # CUDA says "out of memory"; the CPU allocator says "can't allocate memory".
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------ loop
def train_and_evaluate(
    spec: CellSpec,
    task: Task,
    hparams: HyperParams,
    budget: Budget,
    seed: int,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, Any]], None] | None = None,
    num_threads: int | None = 1,
    checkpoint: Any = None,
    batching: Any = None,
) -> TrainResult:
    """Train ``spec`` on ``task`` with ``hparams`` within ``budget`` and score it on held-out data.

    The model is :class:`~cellsearch.model.SequenceModel` at the width that fits
    ``hparams.parameter_budget``, initialised uniformly in
    +-init_scale/sqrt(width). Training: plain SGD on the mean cross-entropy of the
    scored targets, over ``task.batch_size`` parallel columns and windows of
    ``task.unroll`` steps with the hidden state carried across windows
    (truncated backpropagation), gradients clipped to norm
    ``hparams.max_grad_norm``. After each epoch (``budget.steps_per_epoch``
    steps, or one full pass over the training stream when that is null) the
    model is scored on the validation split and :class:`PlateauHalving` (the
    paper's decay) sets the next learning rate or stops the run. The run also
    stops after ``budget.max_epochs`` epochs, ``budget.max_steps`` steps or
    ``budget.max_seconds`` seconds (then it is scored where it stands).

    Contract:

    - Never raises for a numerical failure: a NaN or infinite loss, gradient
      norm or held-out loss ends the run with status ``diverged`` and score 0;
      out of memory (``torch.OutOfMemoryError``, ``MemoryError``, or a
      ``RuntimeError`` saying "out of memory" (CUDA) or "can't allocate memory"
      (the CPU allocator)) ends it with status ``oom`` and score 0. Other
      exceptions (a bad spec, a bug) propagate.
    - Status ``timeout``: the wall-clock cap was reached; the score is the best
      held-out score so far (the model is evaluated at the cap if no epoch had
      ended) and is a valid but truncated result.
    - Deterministic: on CPU, the same arguments give a bit-identical result
      (score and curve) except when ``max_seconds`` cuts the run, since all
      randomness (init, dropout) comes from ``seed`` inside a forked RNG; the
      caller's global RNG state is left untouched. Retrying ``ok`` or
      ``diverged`` with the same seed reproduces it, so only ``oom`` (on another
      device or with more memory) and ``timeout`` (with a larger cap) are worth
      retrying.
    - Runs with ``num_threads`` torch threads (1 by default: one process per
      core is the fast layout on CPU), restoring the previous setting after.
    - ``checkpoint``, when given (a :class:`cellsearch.training.checkpoint.Checkpointer`),
      restores a saved loop state before training and saves one after every
      completed epoch; a run resumed that way ends with the same result as an
      uninterrupted one (on CPU; ``max_seconds`` counts from the resume).
    - ``batching``, when given (a :class:`~cellsearch.batching.BatchingConfig`), may run the
      training step through ``torch.compile`` (its ``compile`` switch; see
      :mod:`cellsearch.training.capture`); results equal the eager run up to float rounding.
    - ``progress``, when given, is called with a dict after every step
      (``kind='step'``: step, total_steps, epoch, loss, learning_rate) and every
      evaluation (``kind='epoch'``: also score, valid_loss, valid_accuracy).
    """
    if checkpoint is not None:
        checkpoint = GroupCheckpoint([checkpoint])
    build = SingleMember.build
    if batching is not None:
        build = build_for(build, batching, task, budget, device)
    return run_members(spec, task, [GroupMember(hparams, seed)], budget, device, progress, num_threads, build,
                       checkpoint=checkpoint)[0]


@dataclass
class _RunState:
    steps: int = 0
    epochs: int = 0
    best_score: float = 0.0
    best_metrics: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)


def _held_out_metrics(task: Task, prefix: str, loss: float, accuracy: float) -> dict[str, float]:
    metrics = {f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}
    if task.metric == "inverse_perplexity":
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else math.inf
    return metrics


@dataclass(frozen=True)
class GroupMember:
    """One setting of a group: its hyperparameters and training seed."""

    hparams: HyperParams
    seed: int


# ------------------------------------------------------------------- the one training loop
class SingleMember:
    """The one-member case of :func:`run_members`: a plain :class:`~cellsearch.model.SequenceModel`.

    Exactly the computation of a single run (``clip_grad_norm_``, an SGD step, the default
    generator for dropout), so that a single run is bit-reproducible as before.
    """

    count = 1

    def __init__(self, model: SequenceModel):
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    @classmethod
    def build(cls, spec: CellSpec, task: Task, members: Sequence[Any], device: torch.device) -> "SingleMember":
        (member,) = members
        torch.manual_seed(member.seed)
        return cls(build_model(spec, task, member.hparams).to(device))

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def losses(self, inputs, targets, scored, state):
        logits, state = self.model(inputs, state)
        loss, count, correct = masked_loss(logits, targets, scored)
        return loss.reshape(1), count, correct.reshape(1), state

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def clip_and_update(self, learning_rates: Sequence[float], max_norms: Sequence[float]) -> list[float]:
        norm = float(nn.utils.clip_grad_norm_(self.parameters, max_norms[0]))
        if math.isfinite(norm):
            with torch.no_grad():
                # plain SGD as torch.optim.SGD does it; a parameter without a gradient this step (the
                # embedding of a cell whose output ignores x) is skipped
                for parameter in self.parameters:
                    if parameter.grad is not None:
                        parameter.add_(parameter.grad, alpha=-learning_rates[0])
        return [norm]

    def keep(self, indices: Sequence[int]) -> None:
        if list(indices) != [0]:
            raise ValueError("a single run has one member")

    def snapshot(self, index: int) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    # What a checkpoint (cellsearch.training.checkpoint.GroupCheckpoint) reads and writes per member.
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_member_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        (state,) = states
        self.model.load_state_dict(state)

    def rng_state(self, index: int) -> dict[str, torch.Tensor | None]:
        """Where dropout draws from alone: the default generators (CPU, and the model's CUDA device)."""
        device = self.device
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def set_rng_states(self, states: Sequence[dict[str, torch.Tensor | None]]) -> None:
        (state,) = states
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def member_carried(self, carried: Any, index: int) -> Any:
        return carried

    def join_carried(self, parts: Sequence[Any]) -> Any:
        (carried,) = parts
        return carried

    def restored(self, snapshots: Sequence[dict[str, torch.Tensor]]) -> "SingleMember":
        (snapshot,) = snapshots
        self.model.load_state_dict(snapshot)
        return self


def evaluate_members(members: Members, tokens: torch.Tensor, mask: torch.Tensor | None,
                     unroll: int) -> list[tuple[float, float]]:
    """Per member: mean cross-entropy and accuracy over the scored targets of a batchified stream (state carried)."""
    members.eval()
    state = None
    total_loss = [0.0] * members.count
    total_correct = [0] * members.count
    total_count = 0
    with torch.no_grad():
        for row in range(0, tokens.shape[0] - 1, unroll):
            inputs, targets, scored = _window(tokens, mask, row, unroll)
            losses, count, correct, state = members.losses(inputs, targets, scored, state)
            for index, (loss, right) in enumerate(zip(losses.tolist(), correct.tolist())):
                total_loss[index] += loss * count
                total_correct[index] += int(right)
            total_count += count
    if total_count == 0:
        raise ValueError("the held-out stream has no scored targets")
    return [(loss / total_count, right / total_count) for loss, right in zip(total_loss, total_correct)]


@dataclass(eq=False)  # identity: members are compared by who they are, not by their numbers
class _Member:
    """Everything the loop keeps for one member besides its weights."""

    position: int
    hparams: HyperParams
    seed: int
    schedule: PlateauHalving
    run: _RunState = field(default_factory=_RunState)
    status: str = "ok"
    message: str = ""
    best_state: dict[str, torch.Tensor] | None = None
    epoch_loss: float = 0.0
    end: float | None = None  # when it left the group
    done: bool = False  # its result is final (nothing left to evaluate)


def run_members(spec: CellSpec, task: Task, members: Sequence[Any], budget: Budget, device: str | torch.device,
                progress: Callable[[dict[str, Any]], None] | None, num_threads: int | None,
                build: Callable[..., Members], checkpoint: GroupCheckpoint | None = None) -> list[TrainResult]:
    """Train ``members`` (objects with ``hparams`` and ``seed``, one shape) in lockstep; a TrainResult each.

    ``build(spec, task, members, device)`` makes the members object (a
    :class:`~cellsearch.training.members.Members`: :class:`SingleMember` for one run,
    :class:`cellsearch.training.groups.BatchedMembers` for a group); everything else (data, steps,
    clipping, evaluation, the schedule, budgets, divergence, out of memory) is this loop.
    """
    clock = _Clock()
    device = torch.device(device)
    if checkpoint is not None and len(checkpoint.checkpointers) != len(members):
        raise ValueError(f"{len(members)} members but {len(checkpoint.checkpointers)} checkpointers")
    group = _loop_members(members, budget)
    hidden_size, parameter_count = _sizes(spec, task, group)
    try:
        with _threads(num_threads), torch.random.fork_rng(devices=_fork_devices(device)):
            trained = build(spec, task, members, device)
            for _ in _run(trained, group, task, budget, device, progress, clock, checkpoint):
                pass  # no rungs: it never stops before the end
    except Exception as error:  # noqa: BLE001 - only out-of-memory is turned into a status
        if not _is_out_of_memory(error):
            raise
        _out_of_memory(group, error, device)
    return _results(group, clock.elapsed(), hidden_size, parameter_count)


class RungRun:
    """:func:`run_members` that stops at rung boundaries and goes on exactly where it stopped (successive halving).

    Made with the arguments of ``run_members`` (no checkpoints) and ``stops``: the training steps
    (whole epochs, below the run's planned total) after whose evaluation it stops. Nothing runs at
    construction. Each :meth:`advance` trains on to the next stop (or to the end) and returns whether
    it stopped at one; :attr:`active` then lists the positions (in ``members``) of the members still
    training, and the next :meth:`advance` first ends the members at the positions it is given with
    status ``pruned`` (their score: the best held-out score so far; their curve ends at the stop),
    then goes on with the others. :meth:`results` gives a :class:`TrainResult` per member, in order,
    once :attr:`ended`.

    Everything the run needs to go on stays in memory between calls: the members object (weights,
    dropout generators), the loop's own state (row in the training stream, carried hidden state,
    schedules, curves; the loop is a generator suspended at the stop) and the default random
    generators' state. Several runs interleaved in one process do not disturb each other's random
    streams: each :meth:`advance` runs inside ``torch.random.fork_rng`` (the caller's state is left
    untouched, as ``run_members`` leaves it) and, from the second call on, first sets the default
    generators (CPU, and the run's CUDA device) to the state this run left them in at its last stop.
    So a member that is never pruned gets exactly the result ``run_members`` gives it. (``progress`` is
    called inside the run's random state, as in ``run_members``: a callback that draws from torch's
    default generator changes the run's dropout masks.) The run's wall clock (``max_seconds``,
    ``duration_s``, ``elapsed_s``) counts only its own :meth:`advance` calls.

    Out of memory, at the build or any step, ends the run as in ``run_members`` (status ``oom`` for
    every member without a final result); other exceptions propagate.
    """

    def __init__(self, spec: CellSpec, task: Task, members: Sequence[Any], budget: Budget,
                 device: str | torch.device, progress: Callable[[dict[str, Any]], None] | None,
                 num_threads: int | None, build: Callable[..., Members], stops: Sequence[int]):
        self._spec, self._task, self._members, self._budget = spec, task, list(members), budget
        self._progress, self._num_threads, self._build = progress, num_threads, build
        self._stops = sorted(set(stops))
        self.device = torch.device(device)
        self._group = _loop_members(self._members, budget)
        self.hidden_size, self.parameter_count = _sizes(spec, task, self._group)
        self._clock = _Clock()
        self._clock.pause()
        self._steps: Any = None  # the suspended loop (a generator), from the first advance to the end
        self._rng: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the default generators at the stop
        self.active: list[int] = []  # positions of the members still training, at the last stop
        self.ended = False

    def best_score(self, position: int) -> float:
        """The best held-out score of member ``position`` so far (0 before its first evaluation)."""
        return self._group[position].run.best_score

    def advance(self, prune: Sequence[int] = ()) -> bool:
        """Prune the members at positions ``prune`` (of :attr:`active`), then train on to the next stop.

        True: stopped at a stop (:attr:`active` lists who is still training); False: the run has ended.
        """
        if self.ended:
            raise RuntimeError("advance: the run has ended")
        if not set(prune) <= set(self.active):
            raise ValueError(f"advance: {sorted(set(prune) - set(self.active))} are not training")
        self._clock.resume()
        try:
            with _threads(self._num_threads), torch.random.fork_rng(devices=_fork_devices(self.device)):
                if self._rng is not None:
                    _set_default_rng(self._rng, self.device)
                try:
                    if self._steps is None:
                        self._steps = self._loop()
                        stopped = next(self._steps, None)
                    else:
                        stopped = self._steps.send([self._group[p] for p in prune])
                except StopIteration:
                    stopped = None  # the loop has ended
                finally:
                    self._rng = _default_rng(self.device)
            if stopped is None:
                self._end()
            else:
                self.active = [m.position for m in stopped]
        except Exception as error:  # noqa: BLE001 - only out-of-memory is turned into a status
            if not _is_out_of_memory(error):
                raise
            self._end()
            _out_of_memory(self._group, error, self.device)
        finally:
            self._clock.pause()
        return not self.ended

    def _loop(self) -> Iterator[list[_Member]]:
        trained = self._build(self._spec, self._task, self._members, self.device)
        return (yield from _run(trained, self._group, self._task, self._budget, self.device, self._progress,
                                self._clock, stops=self._stops))

    def _end(self) -> None:
        self.ended, self.active, self._steps, self._rng = True, [], None, None

    def results(self) -> list[TrainResult]:
        """One TrainResult per member, in order (once the run has ended)."""
        if not self.ended:
            raise RuntimeError("results: the run has not ended")
        return _results(self._group, self._clock.elapsed(), self.hidden_size, self.parameter_count)


class _Clock:
    """Seconds a run has trained: stands still while a :class:`RungRun` waits at a stop."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._paused_at: float | None = None

    def elapsed(self) -> float:
        now = time.perf_counter() if self._paused_at is None else self._paused_at
        return now - self._start

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._start += time.perf_counter() - self._paused_at
            self._paused_at = None


def _fork_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _default_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The default generators' state: the CPU's, and the CUDA device's when the run is on one."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_default_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _loop_members(members: Sequence[Any], budget: Budget) -> list[_Member]:
    return [
        _Member(index, m.hparams, m.seed,
                PlateauHalving(m.hparams.learning_rate, budget.patience, budget.decay_epochs, budget.decay_factor))
        for index, m in enumerate(members)
    ]


def _sizes(spec: CellSpec, task: Task, group: list[_Member]) -> tuple[int, int]:
    shape = group[0].hparams  # every member has the same shape
    hidden_size = solve_hidden_size(spec, task.vocab_size, shape.num_layers, shape.parameter_budget)
    return hidden_size, model_parameter_count(spec, task.vocab_size, shape.num_layers, hidden_size)


def _out_of_memory(group: list[_Member], error: BaseException, device: torch.device) -> None:
    for member in group:
        if not member.done:
            member.status, member.message = "oom", str(error).splitlines()[0][:300]
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _results(group: list[_Member], completed: float, hidden_size: int, parameter_count: int) -> list[TrainResult]:
    """A TrainResult per member; ``completed``: the run's clock at its end (``end`` of those still in it)."""
    results = []
    for member in group:
        failed = member.status in ("diverged", "oom")
        end = completed if member.end is None else member.end
        results.append(TrainResult(
            status=member.status,
            score=0.0 if failed else member.run.best_score,
            metrics={} if failed else dict(member.run.best_metrics),
            steps=member.run.steps,
            epochs=member.run.epochs,
            duration_s=end / len(group),
            curve=tuple(member.run.curve),
            hidden_size=hidden_size,
            parameter_count=parameter_count,
            hparams=member.hparams.to_dict(),
            seed=member.seed,
            message=member.message,
        ))
    return results


def _run(trained: Members, group: list[_Member], task, budget, device, progress, clock: _Clock, checkpoint=None,
         stops: Sequence[int] = ()) -> Iterator[list[_Member]]:
    """The loop, as a generator: it yields (the members still training) only after the evaluation that ends at
    one of ``stops`` (step counts), and takes back the members to prune there (``pruned``); without stops it
    runs to the end at the first ``next``."""
    train_tokens, train_mask = batchify(task.splits["train"], task.batch_size, device)
    valid_tokens, valid_mask = batchify(task.splits["valid"].head(budget.eval_tokens), task.eval_batch_size, device)
    windows_per_pass = math.ceil((train_tokens.shape[0] - 1) / task.unroll)
    steps_per_epoch = budget.steps_per_epoch or windows_per_pass
    total_steps = budget.max_epochs * steps_per_epoch
    if budget.max_steps is not None:
        total_steps = min(total_steps, budget.max_steps)
    # A group shares the wall clock: each member's share of it is what it would have alone.
    max_seconds = None if budget.max_seconds is None else budget.max_seconds * len(group)
    active = list(group)
    finished: list[_Member] = []  # left with status ok, awaiting the test evaluation
    row, carried = 0, None
    steps = epochs = 0

    def leave(leaving: list[_Member]) -> None:
        nonlocal active, carried
        if not leaving:
            return
        now = clock.elapsed()
        for member in leaving:
            member.end = now
            if member.status in ("ok", "timeout") and budget.evaluate_test and "test" in task.splits:
                finished.append(member)
            else:
                member.done = True
        kept = [i for i, m in enumerate(active) if m not in leaving]
        active = [active[i] for i in kept]
        if active and len(kept) < trained.count:
            trained.keep(kept)
            carried = _select(carried, kept)

    def evaluate_now(epoch_steps: int) -> None:
        held_out = evaluate_members(trained, valid_tokens, valid_mask, task.unroll)
        diverged = []
        for member, (loss, accuracy) in zip(active, held_out):
            if not math.isfinite(loss):
                member.status, member.message = "diverged", f"held-out loss {loss} after step {member.run.steps}"
                diverged.append(member)
                continue
            state = member.run
            score = task.score(loss, accuracy)
            point = {
                "epoch": state.epochs,
                "step": state.steps,
                "learning_rate": member.schedule.learning_rate,
                "train_loss": member.epoch_loss / max(epoch_steps, 1),
                "score": score,
                **_held_out_metrics(task, "valid", loss, accuracy),
            }
            state.curve.append(point)
            if score > state.best_score or not state.best_metrics:
                state.best_score = score
                state.best_metrics = {"best_epoch": state.epochs, **_held_out_metrics(task, "valid", loss, accuracy)}
                if budget.evaluate_test:
                    member.best_state = trained.snapshot(active.index(member))
            if progress is not None:
                progress({"kind": "epoch", **point, "total_steps": total_steps,
                          "elapsed_s": clock.elapsed(), "member": member.position})
        leave(diverged)

    running = True
    if checkpoint is not None:
        resumed = checkpoint.restore(trained, group)
        if resumed is not None:
            row, carried, running = resumed.row, resumed.carried, not resumed.finished
            steps, epochs = group[0].run.steps, group[0].run.epochs
    while running and active and epochs < budget.max_epochs:
        trained.train()
        if budget.steps_per_epoch is None:
            row, carried = 0, None
        epoch_steps = 0
        for member in active:
            member.epoch_loss = 0.0
        for _ in range(steps_per_epoch):
            if row >= train_tokens.shape[0] - 1:
                row, carried = 0, None
            inputs, targets, scored = _window(train_tokens, train_mask, row, task.unroll)
            row += inputs.shape[0]
            losses, _, _, carried = trained.losses(inputs, targets, scored, _detach(carried))
            loss_values = losses.tolist()
            trained.zero_grad()
            losses.sum().backward()
            norms = trained.clip_and_update([m.schedule.learning_rate for m in active],
                                            [m.hparams.max_grad_norm for m in active])
            diverged = []
            for member, loss_value, norm in zip(active, loss_values, norms):
                if not math.isfinite(loss_value):
                    member.status, member.message = "diverged", f"training loss {loss_value} at step {steps + 1}"
                elif not math.isfinite(norm):
                    member.status, member.message = "diverged", f"gradient norm {norm} at step {steps + 1}"
                else:
                    member.run.steps += 1
                    member.epoch_loss += loss_value
                    if progress is not None:
                        progress({
                            "kind": "step", "step": member.run.steps, "total_steps": total_steps,
                            "epoch": member.run.epochs, "loss": loss_value,
                            "learning_rate": member.schedule.learning_rate, "member": member.position,
                        })
                    continue
                diverged.append(member)
            steps += 1
            epoch_steps += 1
            leave(diverged)
            if not active:
                break
            if budget.max_steps is not None and steps >= budget.max_steps:
                running = False
                break
            if max_seconds is not None and clock.elapsed() >= max_seconds:
                running = False
                for member in active:
                    member.status, member.message = "timeout", f"wall-clock cap of {budget.max_seconds:g} s reached"
                break
        if not active:
            break
        if epoch_steps == steps_per_epoch:
            epochs += 1
            for member in active:
                member.run.epochs += 1
        if epoch_steps or not active[0].run.curve:
            evaluate_now(epoch_steps)
        ending = []
        if running and active and epoch_steps == steps_per_epoch:
            ending = [m for m in active if not m.schedule.update(m.run.curve[-1]["score"])]
        if checkpoint is not None and epoch_steps == steps_per_epoch:
            # saved before the ending members leave the batched model: their last weights are still in it
            checkpoint.save(trained, [(index, m, not running or m in ending) for index, m in enumerate(active)
                                      if m.status == "ok"], row=row, carried=carried)
        leave(ending)
        if running and active and epoch_steps == steps_per_epoch and steps in stops:
            pruned = (yield list(active)) or []
            rung = list(stops).index(steps) + 1
            for member in pruned:
                member.status, member.message = "pruned", f"pruned at rung {rung} (step {steps})"
                if progress is not None:
                    progress({"kind": "pruned", "step": member.run.steps, "total_steps": total_steps,
                              "epoch": member.run.epochs, "score": member.run.best_score, "rung": rung,
                              "elapsed_s": clock.elapsed(), "member": member.position})
            leave(pruned)
    leave(list(active))
    if finished:
        tested = [m for m in group if m in finished]
        restored = trained.restored([m.best_state for m in tested])
        test_tokens, test_mask = batchify(task.splits["test"], task.eval_batch_size, device)
        for member, (loss, accuracy) in zip(tested, evaluate_members(restored, test_tokens, test_mask, task.unroll)):
            member.run.best_metrics.update(_held_out_metrics(task, "test", loss, accuracy))
            member.done = True


def _select(state: Any, indices: list[int]) -> Any:
    """The carried state of the members at ``indices`` (leading member dimension)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state[indices]
    return tuple(_select(s, indices) for s in state)
