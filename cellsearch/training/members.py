"""The *members* object: what the training loop drives, one run or a group trained as one model.

:func:`cellsearch.training.loop.run_members` trains one or several settings of a cell in
lockstep. Everything the loop does not decide itself (how the model computes the members'
losses, how each member's gradients are clipped and applied, how members leave, how a member's
weights and random state are read and written for a checkpoint) goes through one object, a
:class:`Members`:

- :class:`~cellsearch.training.loop.SingleMember`: one plain
  :class:`~cellsearch.model.SequenceModel` (a single run, bit-reproducible);
- :class:`~cellsearch.training.groups.BatchedMembers`: K settings of one shape as one
  :class:`~cellsearch.model.BatchedSequenceModel`;
- :class:`~cellsearch.training.capture.CapturedMembers`: either of those with its training
  forward through ``torch.compile``.

This module holds only the protocol (and imports nothing of the loop), so that the loop, the
checkpoints and the compiled step can all name it without importing each other.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Members"]


@runtime_checkable
class Members(Protocol):
    """The members of one training run, in lockstep: the interface :func:`~cellsearch.training.loop.run_members` drives.

    A members object is made by the ``build(spec, task, members, device)`` callable handed to
    ``run_members``, inside the loop's forked RNG (so seeding there, as
    :meth:`SingleMember.build <cellsearch.training.loop.SingleMember.build>` and
    :meth:`BatchedMembers.build <cellsearch.training.groups.BatchedMembers.build>` do with
    ``torch.manual_seed(member.seed)``, leaves the caller's RNG alone), and is driven by one loop in
    one thread; nothing needs to be thread-safe. Each member must be built exactly as it would be
    alone (same seeded initialisation, dropout masks drawn from the state its seed leaves), so that
    a member's result does not depend on the group it trained in (up to float rounding).

    *Positions.* Members are addressed by position ``0 .. count - 1`` in the *current* group, the
    order of the loop's active members. When members leave (:meth:`keep`), the remaining ones are
    renumbered from 0 in their previous order.

    *The carried state* (the hidden state carried across training windows) is whatever
    :meth:`losses` returns and takes back: ``None`` (zeros), a tensor, or a tuple of tensors in
    ``spec.states`` order. An object that can hold more than one member gives every tensor a leading
    member dimension: the loop selects the rows of the members that stay with ``state[kept]``.

    Methods (what each must do):

    - :attr:`count`: the number of members training now.
    - :meth:`train` / :meth:`eval`: switch the model(s) to training / evaluation mode (dropout).
    - :meth:`losses` ``(inputs, targets, scored, state)``: the forward over one window; returns
      per-member mean cross-entropies over the scored targets (a ``(count,)`` tensor, attached to
      the graph in training mode), the number of scored targets (shared by all members), per-member
      counts of exactly predicted targets ``(count,)``, and the new carried state. The loss is
      :func:`~cellsearch.model.masked_loss` per member
      (:func:`~cellsearch.model.member_losses` for a batched model).
    - :meth:`zero_grad`: drop the gradients of the last step.
    - :meth:`clip_and_update` ``(learning_rates, max_norms)``: after ``losses(...).sum().backward()``,
      clip each member's gradients to its own norm cap (the norm over that member's gradients alone,
      as ``clip_grad_norm_`` computes it) and take its plain SGD step at its own learning rate;
      returns each member's gradient norm before clipping. A parameter without a gradient this step
      is skipped.
    - :meth:`keep` ``(indices)``: go on with only the members at ``indices`` (ascending positions);
      called only when at least one member leaves and at least one stays.
    - :meth:`snapshot` ``(index)``: a copy of member ``index``'s weights by
      :class:`~cellsearch.model.SequenceModel` parameter name, unaffected by later steps (the best
      weights so far, for the test evaluation).
    - :meth:`restored` ``(snapshots)``: a members object of the same kind holding one member per
      snapshot (the weights given), used once, for the test evaluation (:meth:`eval` and
      :meth:`losses` without gradients only).
    - For checkpoints (:class:`~cellsearch.training.checkpoint.GroupCheckpoint`), in the layout of a
      single run so that a member's file resumes alone or in a group: :attr:`device`;
      :meth:`member_state` / :meth:`load_member_states` (weights by ``SequenceModel`` name;
      ``load_member_states`` takes one state per current member and checks the count);
      :meth:`rng_state` / :meth:`set_rng_states` (the generator member ``index``'s dropout draws
      from, stored as ``{"torch": ..., "cuda": ...}`` where a single run keeps the default
      generators); :meth:`member_carried` / :meth:`join_carried` (member ``index``'s part of a
      carried state in a single run's layout, and the inverse).
    - :attr:`model`: the ``nn.Module`` trained (what
      :class:`~cellsearch.training.capture.CapturedMembers` compiles).

    Failures (what the methods must let through, and what the loop then does):

    - *NaN or infinite numbers* are not errors: :meth:`losses` and :meth:`clip_and_update` return
      them as they are and must not raise. A member whose training loss or gradient norm (or, at an
      evaluation, held-out loss) is not finite is reported ``diverged`` with score 0, leaves the
      group (:meth:`keep` with the others) and the others go on unchanged. Its weights after a
      non-finite norm do not matter (``SingleMember`` skips the update, ``BatchedMembers`` applies a
      NaN factor): it is never read again.
    - *Out of memory* (``torch.OutOfMemoryError``, ``MemoryError``, or a ``RuntimeError`` saying
      "out of memory" / "can't allocate memory") may be raised by ``build`` or any method and must
      propagate (not be caught or turned into a value). The loop then gives every member without a
      final result status ``oom`` and score 0, empties the CUDA cache and drops the object (no
      method is called on it again). :func:`~cellsearch.training.groups.train_settings` retries a
      group that ran out of memory one member at a time: each member reported ``oom`` trains again
      as a fresh single run (:func:`~cellsearch.training.loop.train_and_evaluate`), which gives
      what it would have got in the group up to float rounding; a single run that runs out of
      memory is reported ``oom`` and not retried.
    - *Retries.* The loop never retries a method call: each either completes or raises, and any
      other exception (a bad spec, a bug, a checkpoint that does not fit) propagates out of
      ``run_members`` unchanged. What may be retried is a whole run, from ``build``: a run is
      deterministic on a CPU (same members, seeds and budget give the same result, except where a
      wall-clock cap cuts it), so only ``oom`` (on another device, with more memory, or alone) and
      ``timeout`` (with a larger cap) are worth retrying; a run resumed from its checkpoints ends as
      an uninterrupted one.
    """

    @property
    def count(self) -> int: ...

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def device(self) -> torch.device: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None,
               state: Any) -> tuple[torch.Tensor, int, torch.Tensor, Any]: ...

    def zero_grad(self) -> None: ...

    def clip_and_update(self, learning_rates: Sequence[float], max_norms: Sequence[float]) -> list[float]: ...

    def keep(self, indices: Sequence[int]) -> None: ...

    def snapshot(self, index: int) -> dict[str, torch.Tensor]: ...

    def restored(self, snapshots: Sequence[dict[str, torch.Tensor]]) -> "Members": ...

    def member_state(self, index: int) -> dict[str, torch.Tensor]: ...

    def load_member_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None: ...

    def rng_state(self, index: int) -> dict[str, torch.Tensor | None]: ...

    def set_rng_states(self, states: Sequence[dict[str, torch.Tensor | None]]) -> None: ...

    def member_carried(self, carried: Any, index: int) -> Any: ...

    def join_carried(self, parts: Sequence[Any]) -> Any: ...
