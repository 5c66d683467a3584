"""Training: the one loop every search, ``cellsearch train`` and every retraining goes through.

The package, in import order (each module imports only those above it, at module level):

- :mod:`cellsearch.training.members`: the :class:`Members` protocol, the contract between the loop
  and what it drives (one run, a batched group, a compiled step);
- :mod:`cellsearch.training.checkpoint`: checkpoint files (save every epoch, resume exactly,
  :func:`load_model`);
- :mod:`cellsearch.training.capture`: the training step through ``torch.compile``, a wrapper around
  a members object;
- :mod:`cellsearch.training.loop`: the loop (:func:`run_members`, :func:`train_and_evaluate`), its
  schedule (:class:`PlateauHalving`), data windows and results (:class:`TrainResult`), and the loop
  stopping at rungs and going on (:class:`RungRun`);
- :mod:`cellsearch.training.halving`: successive halving over a unit's runs, interleaved rung by rung
  (:func:`train_halving`; its switch, :class:`~cellsearch.fidelity.HalvingConfig`, in the torch-free
  :mod:`cellsearch.fidelity`);
- :mod:`cellsearch.training.groups`: same-shape settings of a cell trained as one batched model
  (:func:`train_settings`, :func:`train_group`, :class:`BatchedMembers`).

The models, their sizing from a parameter budget and their losses live in :mod:`cellsearch.model`;
the switch for batched training, :class:`~cellsearch.batching.BatchingConfig`, in
:mod:`cellsearch.batching` (torch-free, for configs). This package re-exports the public names of
its modules, so ``from cellsearch.training import train_and_evaluate, TrainResult`` works.
"""

from cellsearch.training.capture import CapturedMembers, build_for, captured_build, compile_options, planned_steps
from cellsearch.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    Checkpointer,
    GroupCheckpoint,
    Resumed,
    load_checkpoint,
    load_model,
)
from cellsearch.training.halving import train_halving, unit_rungs
from cellsearch.training.groups import (
    BatchedMembers,
    batching_pays,
    configure_cpu_matmul,
    group_by_shape,
    shape_key,
    train_group,
    train_settings,
    trains_together,
)
from cellsearch.training.loop import (
    STATUSES,
    Budget,
    GroupMember,
    PlateauHalving,
    RungRun,
    SingleMember,
    TrainResult,
    batchify,
    evaluate,
    evaluate_members,
    run_members,
    train_and_evaluate,
)
from cellsearch.training.members import Members

__all__ = [
    # the loop
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
    "Members",
    # successive halving
    "train_halving",
    "unit_rungs",
    # groups
    "BatchedMembers",
    "train_group",
    "train_settings",
    "group_by_shape",
    "batching_pays",
    "trains_together",
    "shape_key",
    "configure_cpu_matmul",
    # checkpoints
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "GroupCheckpoint",
    "Resumed",
    "load_checkpoint",
    "load_model",
    # the compiled step
    "CapturedMembers",
    "build_for",
    "captured_build",
    "compile_options",
    "planned_steps",
]
