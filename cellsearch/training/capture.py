"""The training step's forward (and so its backward) through ``torch.compile``: a wrapper around a members object.

:class:`CapturedMembers` wraps a members object of the training loop
(:class:`~cellsearch.training.loop.SingleMember` or
:class:`~cellsearch.training.groups.BatchedMembers`, the interface
:class:`~cellsearch.training.members.Members` of :func:`~cellsearch.training.loop.run_members`)
and sends the *training* forward of the model through
``torch.compile``: on a CPU the inductor backend's default mode (generated C++ kernels), on CUDA
``reduce-overhead`` (the compiled graph replayed as a CUDA graph, forward and backward). The loss,
clipping and update stay the members object's own. AOTAutograd traces the backward from the
forward, so the compiled step is forward + backward.

What ``torch.compile`` changes, and how each case is handled:

- *Fixed shapes.* The first training call fixes the captured shape (window length, batch, members);
  compilation is ``dynamic=False``. Everything else runs eagerly on the same weights, so it never
  triggers a recompile: evaluation (no gradient, another batch size), a shorter last window of the
  stream, and the first window's missing state, which is passed as explicit zeros (the same
  numbers eager uses) so that the first step and the others share one graph.
- *The deferred weight gradient.* The compiled cells' ``_DeferredWeightGrad`` reads operand lists
  that the time loop fills after the Function is applied; Dynamo traces a Function's backward at
  apply time, with the lists still empty. While compiling, the cell's ``record`` therefore keeps the
  step weights attached (:mod:`cellsearch.compiler.module`) and AOTAutograd derives their gradients
  the ordinary way. Same gradients up to float rounding.
- *Generated layer code.* The layer functions come from generated source, executed in a namespace
  without builtins. Dynamo traces them like any Python function (one graph when nothing breaks);
  after a graph break it compiles them as frames of their own, so the cell's ``record`` must not
  reach a builtin while tracing (it returns before the ``any`` it uses eagerly).
- *Dropout.* Batched members draw their masks from their own ``torch.Generator``
  (:func:`~cellsearch.compiler.batched.member_dropout`); Dynamo cannot trace a draw from an explicit
  generator, so each draw is a graph break: the draws run eagerly, in the same order, giving the
  same masks, and the pieces between them are compiled (more pieces, less gain). A single run's
  dropout uses the default generator; inductor's own random numbers would differ from eager's, so
  ``fallback_random`` makes the compiled graph draw them as eager does.
- *Members leaving.* A batched group shrinks when members diverge or finish; a new member count
  would be a new shape and a new compilation (as long as the first, see the benchmark). The
  wrapper keeps the compiled shape instead: a member that leaves stays in the batched model as a
  *padding* member with zeroed weights, learning rate 0 and no share of the loss, so its rows cost
  compute but nothing is recompiled, and the members still training see exactly the arithmetic
  they saw before (members never mix). Once half the compiled members or more have left, the
  padded step does at least twice the work the members left need, more than compilation saved in
  any configuration measured (at most 1.8x, on a CPU); the wrapper then drops the padding members
  and the compiled graph and goes on eagerly with the members left.

Results equal the eager path up to float rounding (``tests/test_capture.py``: losses, gradients and
weights after several steps for zoo and mutated cells, with and without dropout, and whole group
runs' scores and curves). Compile time is the cost: tens of seconds to minutes per cell and shape
on a CPU (see ``benchmarks/batched.py`` and :class:`cellsearch.batching.BatchingConfig` for when it
pays).

It is a part of training, not of the compiler: it wraps the loop's members objects and computes
their losses (:func:`~cellsearch.model.masked_loss`, :func:`~cellsearch.model.member_losses`).
It imports the models, not the loop or the groups (which import it): whether the wrapped object is
a batched group is read from its model (a :class:`~cellsearch.model.BatchedSequenceModel`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from cellsearch.model import BatchedSequenceModel, masked_loss, member_losses, solve_hidden_size
from cellsearch.training.members import Members

__all__ = ["CapturedMembers", "capture_mode", "compile_options", "captured_build", "planned_steps", "build_for"]


#: Dynamo keeps at most ``recompile_limit`` (8) compiled versions of one code object and then runs it
#: eagerly, silently. Every cell and shape compiles ``SequenceModel.forward`` /
#: ``BatchedSequenceModel.forward`` anew (the generated layer code differs), so a process that trains
#: many cells would stop compiling after eight; the wrapper's calls lift the limit (only while they run).
_RECOMPILE_LIMIT = 100_000


def capture_mode(device: torch.device | str) -> str:
    """The ``torch.compile`` mode for ``device``: ``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def compile_options(device: torch.device | str) -> dict[str, Any]:
    """Inductor options: the device's mode (see :func:`capture_mode`) plus eager-equal random numbers.

    ``torch.compile`` takes a mode or options, not both; the mode's options are spelled out
    (``reduce-overhead`` is ``triton.cudagraphs``) so that ``fallback_random`` can join them.
    """
    from torch._inductor import list_mode_options

    return {**list_mode_options(capture_mode(device)), "fallback_random": True}


def _zeros_state(model: torch.nn.Module, batch: int, like: torch.Tensor) -> Any:
    """The zero initial state eager uses for a missing state, for a SequenceModel or a BatchedSequenceModel."""
    rnn = model.rnn
    lead = (model.members,) if hasattr(model, "members") else ()
    zeros = tuple(like.new_zeros(lead + (rnn.num_layers, batch, rnn.hidden_size), dtype=model.decoder.weight.dtype)
                  for _ in rnn.spec.states)
    return zeros[0] if len(zeros) == 1 else zeros


def _map_state(state: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return function(state)
    return tuple(function(s) for s in state)


class CapturedMembers:
    """A members object whose training forward runs compiled (see the module doc); everything else is the wrapped one's.

    ``members``: a :class:`~cellsearch.training.loop.SingleMember` or
    :class:`~cellsearch.training.groups.BatchedMembers` (a batched one: its ``model`` is a
    :class:`~cellsearch.model.BatchedSequenceModel`, and its ``parameters`` list holds the
    trainable parameters, member dimension first). ``backend``: ``torch.compile``'s backend;
    ``inductor`` is the one that generates faster code (the others serve tests: ``aot_eager`` runs
    Dynamo and AOTAutograd, which decide what is captured, without inductor's minutes of codegen).
    ``compile_seconds`` is the wall time of the first compiled training step (forward, backward: both
    compile there; ``None`` until it happened); ``compiled_calls`` counts the training forwards that
    ran compiled, ``eager_calls`` those that ran eagerly while the compiled graph was there (another
    shape); ``fallback`` says why the wrapper stopped compiling, if it did (later steps are eager and
    not counted).
    """

    def __init__(self, members: Members, device: torch.device | str, backend: str = "inductor"):
        self.inner = members
        self.device = torch.device(device)
        self.batched = isinstance(members.model, BatchedSequenceModel)
        options = compile_options(self.device) if backend == "inductor" else None
        self.compiled = torch.compile(members.model, backend=backend, dynamic=False, options=options)
        # positions in the inner (compiled-size) model of the members still training
        self.active = list(range(members.count))
        self.shape: tuple | None = None
        self.compile_seconds: float | None = None
        self._first_step_started: float | None = None
        self.compiled_calls = 0
        self.eager_calls = 0
        self.fallback = ""

    # ---------------------------------------------------------------- the members interface
    @property
    def count(self) -> int:
        return len(self.active)

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped model (the checkpoint of a single run saves it; names are the eager model's)."""
        return self.inner.model

    def train(self) -> None:
        self.inner.train()

    def eval(self) -> None:
        self.inner.eval()

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def losses(self, inputs, targets, scored, state):
        """As the wrapped object's ``losses``; the training forward of the captured shape runs compiled."""
        if not self._captures(inputs):
            if self.compiled is not None and self.inner.model.training and torch.is_grad_enabled():
                self.eager_calls += 1
            if not self._padded:
                return self.inner.losses(inputs, targets, scored, state)
            losses, count, correct, state = self.inner.losses(inputs, targets, scored, self._pad(state, inputs))
            return losses[self._positions], count, correct[self._positions], self._unpad(state)
        if state is not None:
            full = self._pad(state, inputs)
        else:
            full = _zeros_state(self.inner.model, inputs.shape[1], inputs)
        if self.device.type == "cuda":
            # a new step: the CUDA graph may reuse the previous step's output memory from here on
            torch.compiler.cudagraph_mark_step_begin()
        if self.compiled_calls == 0:
            # inductor compiles the backward at the first backward: the first step is timed to its update
            self._first_step_started = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT):
            logits, full = self.compiled(inputs, full)
        self.compiled_calls += 1
        if self.device.type == "cuda":
            # the loop carries the state into the next step, after the graph's next replay
            full = _map_state(full, torch.clone)
        if self._padded:
            logits = logits.index_select(0, self._positions)
        losses, count, correct = self._loss(logits, targets, scored)
        return losses, count, correct, self._unpad(full)

    def clip_and_update(self, learning_rates: Sequence[float], max_norms: Sequence[float]) -> list[float]:
        """The wrapped update; padding members get learning rate 0 and their norms are not reported."""
        if self.compile_seconds is None and self._first_step_started is not None:
            self.compile_seconds = time.perf_counter() - self._first_step_started
        if not self._padded:
            return self.inner.clip_and_update(learning_rates, max_norms)
        rates, caps = [0.0] * self.inner.count, [1.0] * self.inner.count
        for position, rate, cap in zip(self.active, learning_rates, max_norms):
            rates[position], caps[position] = rate, cap
        norms = self.inner.clip_and_update(rates, caps)
        return [norms[position] for position in self.active]

    def keep(self, indices: Sequence[int]) -> None:
        """Go on with the members at ``indices``; leaving members become padding (see the module doc)."""
        kept = [self.active[i] for i in indices]
        if not self.batched or self.compiled is None:
            self.inner.keep(kept if self.batched else list(indices))
            self.active = list(range(self.inner.count))
            return
        leaving = sorted(set(self.active) - set(kept))
        if 2 * len(kept) <= self.inner.count:
            self.fallback = (f"{self.inner.count - len(kept)} of {self.inner.count} compiled members left: "
                             f"eager from here")
            self.compiled = None
            self.inner.keep(kept)
            self.active = list(range(self.inner.count))
            return
        self.active = kept
        if leaving:
            rows = torch.tensor(leaving, device=self.device)
            with torch.no_grad():
                # zero weights: a padding member computes finite zeros whatever it diverged to
                for parameter in self.inner.parameters:
                    parameter.index_fill_(0, rows, 0.0)

    def snapshot(self, index: int) -> dict[str, torch.Tensor]:
        return self.inner.snapshot(self.active[index])

    def restored(self, snapshots: Sequence[dict[str, torch.Tensor]]):
        """The wrapped object's restored members (eager: the test evaluation runs once)."""
        return self.inner.restored(snapshots)

    def member_model(self, index: int) -> torch.nn.Module:
        return self.inner.member_model(self.active[index])

    # what a checkpoint (cellsearch.training.checkpoint.GroupCheckpoint) reads and writes, at the members' positions
    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        return self.inner.member_state(self.active[index])

    def load_member_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        if len(states) != self.count:
            raise ValueError(f"{self.count} members, {len(states)} states")
        full = [self.inner.member_state(position) for position in range(self.inner.count)]
        for position, state in zip(self.active, states):
            full[position] = state
        self.inner.load_member_states(full)

    def rng_state(self, index: int) -> dict[str, torch.Tensor | None]:
        return self.inner.rng_state(self.active[index])

    def set_rng_states(self, states: Sequence[dict[str, torch.Tensor | None]]) -> None:
        full: list[dict[str, torch.Tensor | None]] = [{} for _ in range(self.inner.count)]  # padding: left as it is
        for position, state in zip(self.active, states, strict=True):
            full[position] = state
        self.inner.set_rng_states(full)

    def member_carried(self, carried: Any, index: int) -> Any:
        # the loop's carried state holds the members still training only (see losses)
        return self.inner.member_carried(carried, index)

    def join_carried(self, parts: Sequence[Any]) -> Any:
        return self.inner.join_carried(parts)

    # ---------------------------------------------------------------- internals
    @property
    def _padded(self) -> bool:
        return len(self.active) < self.inner.count

    @property
    def _positions(self) -> torch.Tensor:
        return torch.tensor(self.active, device=self.device)

    def _captures(self, inputs: torch.Tensor) -> bool:
        if self.compiled is None or not (self.inner.model.training and torch.is_grad_enabled()):
            return False
        if self.shape is None:
            self.shape = tuple(inputs.shape)
        return tuple(inputs.shape) == self.shape

    def _pad(self, state: Any, inputs: torch.Tensor) -> Any:
        """The carried state of the members still training, placed in a compiled-size state (zeros elsewhere)."""
        if state is None or not self._padded:
            return state
        positions = self._positions
        template = _zeros_state(self.inner.model, inputs.shape[1], inputs)
        if isinstance(state, torch.Tensor):
            return template.index_copy(0, positions, state)
        return tuple(t.index_copy(0, positions, s) for t, s in zip(template, state))

    def _unpad(self, state: Any) -> Any:
        if not self._padded:
            return state
        positions = self._positions
        return _map_state(state, lambda s: s.index_select(0, positions))

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None):
        if self.batched:
            return member_losses(logits, targets, scored)
        loss, count, correct = masked_loss(logits, targets, scored)
        return loss.reshape(1), count, correct.reshape(1)


def captured_build(build: Callable, on_build: Callable[[CapturedMembers], None] | None = None,
                   backend: str = "inductor") -> Callable:
    """A ``build`` for :func:`~cellsearch.training.loop.run_members` whose members object is wrapped in
    :class:`CapturedMembers`.

    ``on_build``, when given, receives the wrapper (to read its compile time and call counts after the run).
    """

    def captured(spec, task, members, device):
        wrapped = CapturedMembers(build(spec, task, members, device), device, backend)
        if on_build is not None:
            on_build(wrapped)
        return wrapped

    return captured


def planned_steps(task, budget) -> int:
    """The training steps a run of ``budget`` on ``task`` plans (:func:`~cellsearch.training.loop.run_members`'s total).

    ``max_epochs`` epochs of ``steps_per_epoch`` steps (one pass over the training stream when that
    is null), capped by ``max_steps``; a run that the decay stops early takes fewer.
    """
    rows = len(task.splits["train"]) // task.batch_size
    windows_per_pass = max(-(-(rows - 1) // task.unroll), 1)
    total = budget.max_epochs * (budget.steps_per_epoch or windows_per_pass)
    return total if budget.max_steps is None else min(total, budget.max_steps)


def build_for(build: Callable, config, task, budget, device: torch.device | str) -> Callable:
    """``build``, with its members object wrapped in :class:`CapturedMembers` where ``config`` (a
    :class:`~cellsearch.batching.BatchingConfig`) decides to compile a run of ``budget`` on ``task`` on
    ``device`` at the members' width (:meth:`~cellsearch.batching.BatchingConfig.compile_decision`)."""
    steps = planned_steps(task, budget)

    def decided(spec, task, members, device):
        hparams = members[0].hparams
        width = solve_hidden_size(spec, task.vocab_size, hparams.num_layers, hparams.parameter_budget)
        built = build(spec, task, members, device)
        # a group shares its cap: each member's share is what it would have alone
        cap = None if budget.max_seconds is None else budget.max_seconds * len(members)
        compiled, _ = config.compile_decision(torch.device(device).type, steps, width, cap)
        return CapturedMembers(built, device) if compiled else built

    return decided if config.compile != "off" else build
