"""Training checkpoints: save every epoch, resume exactly, reload a trained model.

A checkpoint is one file written with :func:`torch.save` that holds only
tensors and plain data (dicts, lists, strings, numbers, booleans, None), so it
loads with ``torch.load(..., weights_only=True)``: no pickled code is ever
executed. It holds

- the cell (``spec`` as a dict and ``spec_hash``), the task name, vocabulary
  size, width, layers and dropout (enough to rebuild the model);
- the hyperparameters, the budget, the seed and the resolved retrain config;
- the model's weights, and the best weights so far (the ones the test split is
  scored with);
- the optimizer's state dict (plain SGD keeps none beyond its settings; a
  momentum buffer would be saved) and the loop's state: position in the
  training stream, the carried hidden state, the learning-rate schedule, steps,
  epochs, best score and metrics, the curve, and the random state its dropout
  draws from;
- ``commit``: null, or the group save that wrote it (:class:`GroupCheckpoint`);
- ``finished`` and, once training is over, the final ``result``
  (``TrainResult.to_dict()``).

A run's :class:`Checkpointer` holds its file's identity and writes it;
:class:`GroupCheckpoint` is the hook the training loop
(:func:`cellsearch.training.loop.run_members`) calls, for one run or for several seeds
trained as one batched model: it restores before training and saves after every
completed epoch, one file per member. Writes are atomic (a temporary file, then
``os.replace``), and a group's files are committed together (see
:class:`GroupCheckpoint`), so a process killed at any moment leaves the previous
checkpoints intact and consistent.

:func:`load_model` rebuilds the trained :class:`~cellsearch.model.SequenceModel`
on any device; :func:`load_checkpoint` returns the validated contents.
Anything wrong with a file (missing, truncated, garbage, pickled objects,
another cell, a spec that does not match its hash, a field of the wrong type,
weights or a carried state whose names, shapes or dtypes do not fit the cell)
raises :class:`CheckpointError` (a :class:`~cellsearch.errors.UserError`) with a
one-line reason. Every field is checked before it is used, and the weights are
compared with a model built on torch's ``meta`` device (no memory), so a file
that claims a huge width costs nothing to refuse.

This module imports the models (:mod:`cellsearch.model`), not the loop: the loop imports it, and
it reads and writes the loop's per-member records only through their attributes (``schedule``,
``run``, ``best_state``, ``position``) and the members object's checkpoint methods (see
:class:`~cellsearch.training.members.Members`).

Size: one module on purpose. Most of it is validation of untrusted files (every field, every tensor,
before use); the reader, the writer and the group commit protocol must agree on one format.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cellsearch.errors import UserError, shown
from cellsearch.model import SequenceModel
from cellsearch.spec import CellSpec, CellSpecError
from cellsearch.training.members import Members

__all__ = ["CheckpointError", "Checkpoint", "Resumed", "Checkpointer", "GroupCheckpoint", "load_checkpoint",
           "load_model", "FORMAT", "VERSION"]

FORMAT = "cellsearch-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "spec", "spec_hash", "task", "vocab_size", "hidden_size", "num_layers",
             "dropout", "hparams", "budget", "seed", "config", "epoch", "finished", "model", "best_model",
             "optimizer", "loop", "rng", "result")


class CheckpointError(UserError):
    """A checkpoint file that cannot be used (the message says why)."""


@dataclass(frozen=True)
class Checkpoint:
    """The validated contents of a checkpoint file (see the module docstring)."""

    path: Path
    spec: CellSpec
    task: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    dropout: float
    hparams: dict[str, Any]
    budget: dict[str, Any]
    seed: int
    config: dict[str, Any]
    epoch: int
    finished: bool
    model_state: dict[str, torch.Tensor]
    best_model_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any] | None
    loop: dict[str, Any]
    rng: dict[str, Any]
    result: dict[str, Any] | None
    commit: dict[str, Any] | None = None  # the group save that wrote it (see GroupCheckpoint)

    @property
    def resume_point(self) -> tuple[int, int, int, bool]:
        """Where training goes on from: (epoch, steps, row in the training stream, finished).

        Members of one group resume together only from the same point.
        """
        return (self.epoch, int(self.loop["run_state"]["steps"]), int(self.loop["row"]), self.finished)

    @property
    def curve(self) -> list[dict[str, float]]:
        """Held-out evaluations so far, one per epoch."""
        return list(self.loop["run_state"]["curve"])


@dataclass(frozen=True)
class Resumed:
    """What the training loop takes back from a checkpoint besides the model, schedule and counters."""

    row: int
    carried: Any
    finished: bool


# ------------------------------------------------------------------------------ reading
def _unpickler_reason(text: str) -> str:
    """The one informative line of torch's weights-only error (it wraps it in several lines of advice)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not reason and index + 1 < len(lines):
                reason = lines[index + 1]
            # "Unsupported global: GLOBAL io.open was not an allowed global ..." -> up to the global's name.
            return reason.split(" was not an allowed global")[0][:200]
        if "unsupported global" in line.lower():
            # A blocked module (os, posix, subprocess, ...): "Trying to load unsupported GLOBAL posix.system ...".
            return line[:200]
    return (lines[0] if lines else "unpickling failed")[:200]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}" + (" (not a regular file)" if path.exists() else ""))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if "unsupported global" in reason.lower():
            raise CheckpointError(f"{path} holds pickled Python objects, which weights-only loading refuses "
                                  f"(not a cellsearch checkpoint, or a tampered one): {reason}") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or not a torch file): {reason}") from None
    except Exception as error:  # noqa: BLE001 - torch's reader fails in many ways on garbage (IndexError, struct.error, ...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt): {first[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a cellsearch checkpoint")
    if type(data.get("version")) is not int or data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {data.get('version')!r}; this cellsearch "
                              f"reads version {VERSION}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    _check_fields(data, path)
    return data


def _integer(low: int) -> Any:
    return lambda value: type(value) is int and value >= low  # type(): bool is an int subclass


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _weights(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in value.items())


def _carried(value: Any) -> bool:
    return value is None or isinstance(value, torch.Tensor) or (
        isinstance(value, (list, tuple)) and all(isinstance(part, torch.Tensor) for part in value))


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


def _of_type(kind: type) -> Any:
    return lambda value: isinstance(value, kind)


#: (key path, check, what the value must be), parents before children: every field a reader uses.
_FIELDS = (
    (("spec_hash",), _of_type(str), "a string"),
    (("task",), _of_type(str), "a string"),
    (("vocab_size",), _integer(1), "a positive integer"),
    (("hidden_size",), _integer(1), "a positive integer"),
    # HyperParams' range: a file claiming a million layers would cost minutes just to build the template.
    (("num_layers",), lambda v: _integer(1)(v) and v <= 16, "an integer in 1..16"),
    (("dropout",), lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    (("hparams",), _of_type(dict), "a mapping"),
    (("budget",), _of_type(dict), "a mapping"),
    (("seed",), _integer(0), "a non-negative integer"),
    (("config",), _of_type(dict), "a mapping"),
    (("epoch",), _integer(0), "a non-negative integer"),
    (("finished",), _of_type(bool), "true or false"),
    (("model",), _weights, "a mapping of names to tensors"),
    (("best_model",), _optional(_weights), "null or a mapping of names to tensors"),
    (("optimizer",), _optional(_of_type(dict)), "null or a mapping"),
    (("result",), _optional(_of_type(dict)), "null or a mapping"),
    (("loop",), _of_type(dict), "a mapping"),
    (("loop", "row"), _integer(0), "a non-negative integer"),
    (("loop", "carried"), _carried, "null, a tensor or a list of tensors"),
    (("loop", "schedule"), _of_type(dict), "a mapping"),
    # A tampered rate or factor (NaN, infinite, not positive) would train to a wrong result instead of failing.
    (("loop", "schedule", "learning_rate"), lambda v: _number(v) and math.isfinite(v) and v > 0,
     "a finite positive number"),
    (("loop", "schedule", "patience"), _integer(1), "a positive integer"),
    (("loop", "schedule", "decay_epochs"), _integer(0), "a non-negative integer"),
    (("loop", "schedule", "factor"), lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    (("loop", "schedule", "best"), _number, "a number"),
    (("loop", "schedule", "epochs_without_improvement"), _integer(0), "a non-negative integer"),
    (("loop", "schedule", "decay_epochs_left"), _optional(_integer(0)), "null or a non-negative integer"),
    (("loop", "run_state"), _of_type(dict), "a mapping"),
    (("loop", "run_state", "steps"), _integer(0), "a non-negative integer"),
    (("loop", "run_state", "epochs"), _integer(0), "a non-negative integer"),
    (("loop", "run_state", "best_score"), _number, "a number"),
    (("loop", "run_state", "best_metrics"), _of_type(dict), "a mapping"),
    (("loop", "run_state", "curve"), lambda v: isinstance(v, list) and all(
        isinstance(point, dict) and _number(point.get("score")) for point in v), "a list of evaluations with scores"),
    (("rng",), _of_type(dict), "a mapping"),
    (("rng", "torch"), lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.ndim == 1,
     "a byte tensor"),
    (("rng", "cuda"), lambda v: v is None or (isinstance(v, torch.Tensor) and v.dtype == torch.uint8),
     "null or a byte tensor"),
)


def _check_fields(data: dict[str, Any], path: Path) -> None:
    """Every field a reader uses has the type it needs (a tampered file fails here, not deep in training)."""
    for keys, check, what in _FIELDS:
        value: Any = data
        for depth, key in enumerate(keys):
            if key not in value:
                raise CheckpointError(f"{path} lacks {'.'.join(keys[: depth + 1])}")
            value = value[key]
        if not check(value):
            raise CheckpointError(f"{path}: {'.'.join(keys)} must be {what}, got {shown(value, 60)}")


def _check_weights(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path,
                   which: str, spec: CellSpec, hidden_size: int) -> None:
    """``state`` has exactly the names, shapes and dtypes of ``expected`` (a model's state dict)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problem = None
    if missing or unexpected:
        problem = (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") \
            + (f"unexpected {', '.join(shown(name, 40) for name in unexpected[:3])}" if unexpected else "")
    else:
        for name, tensor in expected.items():
            stored = state[name]
            if stored.shape != tensor.shape or stored.dtype != tensor.dtype:
                problem = (f"{name} is {stored.dtype} {tuple(stored.shape)}, the cell needs {tensor.dtype} "
                           f"{tuple(tensor.shape)}")
                break
            # training saves only finite weights (a run that diverged is not checkpointed): NaN or inf is damage
            if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
                problem = f"{name} holds NaN or infinite values"
                break
    if problem is not None:
        raise CheckpointError(f"{path}: the {which} weights do not fit cell {spec.short_hash} at width {hidden_size}: "
                              f"{problem}")


def _commit(value: Any, path: Path) -> dict[str, Any] | None:
    """The optional ``commit`` field: null, or the token and the other members' files of a group save."""
    if value is None:
        return None
    members = value.get("members") if isinstance(value, dict) else None
    fits = (isinstance(value.get("token"), str) and len(value["token"]) <= 100 and isinstance(members, list)
            and 0 < len(members) <= MAX_GROUP_MEMBERS and len(set(map(str, members))) == len(members)
            and all(isinstance(member, str) and _MEMBER_FILE.fullmatch(member) for member in members)) \
        if isinstance(value, dict) else False
    if not fits:
        raise CheckpointError(f"{path}: commit must be null or a token with the files of the group's other seeds "
                              f"(../seed-N/checkpoint.pt, at most {MAX_GROUP_MEMBERS}), got {shown(value, 60)}")
    return {"token": value["token"], "members": list(value["members"])}


def load_checkpoint(path: str | os.PathLike, expected: CellSpec | None = None) -> Checkpoint:
    """Read and validate a checkpoint; with ``expected``, also require that it holds that cell.

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file, a
    file holding pickled objects, a spec that does not match its stored hash,
    or (with ``expected``) another cell.
    """
    path = Path(path)
    data = _read(path)
    try:
        spec = CellSpec.from_dict(data["spec"])
    except (CellSpecError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path}: the stored cell is invalid: {error}") from None
    if spec.hash != data["spec_hash"]:
        raise CheckpointError(f"{path}: spec mismatch: the stored cell hashes to {spec.short_hash}, the checkpoint "
                              f"says {str(data['spec_hash'])[:12]}")
    if expected is not None and expected.hash != spec.hash:
        raise CheckpointError(f"{path} is a checkpoint of cell {spec.name or spec.short_hash} "
                              f"({spec.short_hash}), not of {expected.name or expected.short_hash} "
                              f"({expected.short_hash})")
    return Checkpoint(
        path=path, spec=spec, task=str(data["task"]), vocab_size=int(data["vocab_size"]),
        hidden_size=int(data["hidden_size"]), num_layers=int(data["num_layers"]), dropout=float(data["dropout"]),
        hparams=dict(data["hparams"]), budget=dict(data["budget"]), seed=int(data["seed"]),
        config=dict(data["config"]), epoch=int(data["epoch"]), finished=bool(data["finished"]),
        model_state=data["model"], best_model_state=data["best_model"], optimizer_state=data["optimizer"],
        loop=dict(data["loop"]),
        rng=dict(data["rng"]), result=data["result"], commit=_commit(data.get("commit"), path),
    )


def load_model(checkpoint: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu",
               weights: str = "best") -> torch.nn.Module:
    """The trained model of a checkpoint, on ``device``, in eval mode (call ``.train()`` to fine-tune).

    It is a :class:`~cellsearch.model.SequenceModel`: ``logits, state =
    model(tokens, state)`` with ``tokens`` of shape (time, batch); its cell is
    ``model.rnn`` (a :class:`~cellsearch.compiler.CellRNN`). ``weights='best'``
    (default) gives the weights with the best held-out score (those the test
    metrics were measured with) when the checkpoint has them, ``'last'`` the
    weights at the checkpoint's epoch.
    """
    if weights not in ("best", "last"):
        raise UserError(f"weights must be 'best' or 'last', got {weights!r}")
    loaded = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    state = loaded.best_model_state if weights == "best" and loaded.best_model_state is not None else loaded.model_state
    # the regularisers change the model's parameters (layer-norm gains); a checkpoint from before they existed has none
    options = {"dropout_mode": str(loaded.hparams.get("dropout_mode", "standard")),
               "layer_norm": bool(loaded.hparams.get("layer_norm", False))}
    # Shapes are checked on a model without storage first: the sizes in the file are not trusted.
    with torch.device("meta"):
        template = SequenceModel(loaded.spec, loaded.vocab_size, loaded.hidden_size, loaded.num_layers,
                                 loaded.dropout, **options)
    expected = template.state_dict()
    for which, stored in (("last", loaded.model_state), ("best", loaded.best_model_state)):
        if stored is not None:
            _check_weights(stored, expected, loaded.path, which, loaded.spec, loaded.hidden_size)
    model = SequenceModel(loaded.spec, loaded.vocab_size, loaded.hidden_size, loaded.num_layers, loaded.dropout,
                          **options)
    model.load_state_dict(state)
    return model.to(device).eval()


# ------------------------------------------------------------------------------ writing
def _state_to_cpu(state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    if state is None:
        return None
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def _optimizer_state_to_cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer's state dict with its tensors (momentum buffers, if any) on the CPU."""
    return {
        "state": {index: {key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
                          for key, value in entry.items()} for index, entry in state["state"].items()},
        "param_groups": [dict(group) for group in state["param_groups"]],
    }


def _carried_to_cpu(carried: Any) -> Any:
    if carried is None:
        return None
    if isinstance(carried, torch.Tensor):
        return carried.detach().to("cpu", copy=True)
    return [_carried_to_cpu(part) for part in carried]


def _carried_to(carried: Any, device: torch.device) -> Any:
    if carried is None:
        return None
    if isinstance(carried, torch.Tensor):
        return carried.to(device)
    return tuple(_carried_to(part, device) for part in carried)


def atomic_save(data: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-shaped data (tuples become lists), so that a stored identity compares equal to a fresh one."""
    return json.loads(json.dumps(dict(data)))


#: A group save names its members' files relative to each member's directory: siblings only.
_MEMBER_FILE = re.compile(r"(\.\./seed-\d{1,6}/)?checkpoint\.pt")
#: More members than a group may have (BatchingConfig.max_members is 20 by default): a bigger list is damage.
MAX_GROUP_MEMBERS = 1024

_SCHEDULE_FIELDS = ("learning_rate", "patience", "decay_epochs", "factor", "best", "epochs_without_improvement",
                    "decay_epochs_left")
_RUN_STATE_FIELDS = ("steps", "epochs", "best_score", "best_metrics", "curve")


class Checkpointer:
    """The checkpoint hook of one training run (one cell, task, setting and seed) writing to ``path``.

    ``identity`` is the plain data that must match for a saved file to be
    resumed (task, hyperparameters, budget, seed, vocabulary size and the
    resolved retrain config); a file written for another cell or configuration
    is refused with :class:`CheckpointError` rather than silently continued.
    """

    def __init__(self, path: str | os.PathLike, spec: CellSpec, *, task: str, vocab_size: int, hidden_size: int,
                 hparams: Mapping[str, Any], budget: Mapping[str, Any], seed: int,
                 config: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.spec = spec
        self.header = {
            "format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "spec_hash": spec.hash, "task": task,
            "vocab_size": int(vocab_size), "hidden_size": int(hidden_size),
            "num_layers": int(hparams["num_layers"]), "dropout": float(hparams["dropout"]),
            "hparams": _plain(hparams), "budget": _plain(budget), "seed": int(seed), "config": _plain(config or {}),
        }

    def _check_identity(self, loaded: Checkpoint) -> None:
        for key in ("task", "vocab_size", "hidden_size", "hparams", "budget", "seed", "config"):
            stored = getattr(loaded, key)
            if stored != self.header[key]:
                raise CheckpointError(f"{self.path} was written with another {key} ({stored!r}, now "
                                      f"{self.header[key]!r}); delete it or use another output directory")

    def existing(self) -> Checkpoint | None:
        """The validated checkpoint at :attr:`path` for this run, or None when there is none yet."""
        if not self.path.exists():
            return None
        loaded = load_checkpoint(self.path, expected=self.spec)
        self._check_identity(loaded)
        return loaded

    @property
    def pending_path(self) -> Path:
        """Where a group save writes this member's next checkpoint before the group commits it."""
        return self.path.with_name(f"{self.path.name}.pending")

    def check_loaded(self, loaded: Checkpoint, expected: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        """``loaded`` fits the model being trained: weight names, shapes, dtypes, the carried state, the RNG."""
        _check_weights(loaded.model_state, expected, self.path, "last", self.spec, loaded.hidden_size)
        if loaded.best_model_state is not None:
            _check_weights(loaded.best_model_state, expected, self.path, "best", self.spec, loaded.hidden_size)
        self._check_carried(loaded, dtype)
        if torch.get_rng_state().shape != loaded.rng["torch"].shape:
            raise CheckpointError(f"{self.path}: rng.torch is not a torch random state")

    def _check_carried(self, loaded: Checkpoint, dtype: torch.dtype) -> None:
        """The hidden state carried across windows: one (layers, batch, width) tensor per state of the cell."""
        carried = loaded.loop["carried"]
        if carried is None:
            return
        parts = [carried] if isinstance(carried, torch.Tensor) else list(carried)
        count = len(self.spec.states)
        fits = len(parts) == count and (count == 1) == isinstance(carried, torch.Tensor) and all(
            part.ndim == 3 and part.dtype == dtype and part.shape[0] == loaded.num_layers
            and part.shape[2] == loaded.hidden_size and part.shape[1] == parts[0].shape[1] for part in parts)
        if not fits:
            shapes = ", ".join(f"{part.dtype} {tuple(part.shape)}" for part in parts[:4])
            raise CheckpointError(f"{self.path}: loop.carried ({shapes}) is not {count} state(s) of shape "
                                  f"({loaded.num_layers}, batch, {loaded.hidden_size}) in {dtype}")

    def payload(self, model_state: Mapping[str, torch.Tensor], schedule: Any, run_state: Any, *, row: int,
                carried: Any, best_model: Mapping[str, torch.Tensor] | None, finished: bool,
                rng: Mapping[str, torch.Tensor | None], commit: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The file's contents for the loop's state after a completed epoch (weights by ``SequenceModel`` name)."""
        return {
            **self.header,
            "epoch": int(run_state.epochs),
            "finished": bool(finished),
            "model": _state_to_cpu(model_state),
            "best_model": _state_to_cpu(best_model),
            "optimizer": None,  # plain SGD keeps no state; the field is where a momentum buffer would go
            "loop": {
                "row": int(row),
                "carried": _carried_to_cpu(carried),
                "schedule": {name: getattr(schedule, name) for name in _SCHEDULE_FIELDS},
                "run_state": {
                    "steps": int(run_state.steps), "epochs": int(run_state.epochs),
                    "best_score": float(run_state.best_score), "best_metrics": dict(run_state.best_metrics),
                    "curve": [dict(point) for point in run_state.curve],
                },
            },
            "rng": {"torch": rng["torch"].to("cpu", copy=True),
                    "cuda": None if rng.get("cuda") is None else rng["cuda"].to("cpu", copy=True)},
            "result": None,
            "commit": None if commit is None else dict(commit),
        }

    def save(self, data: dict[str, Any]) -> None:
        """Write :meth:`payload` output as this run's checkpoint (atomically)."""
        atomic_save(data, self.path)

    def save_pending(self, data: dict[str, Any]) -> None:
        """Write :meth:`payload` output beside the checkpoint, for :class:`GroupCheckpoint` to commit."""
        atomic_save(data, self.pending_path)

    def promote(self) -> None:
        """Make the pending file the checkpoint."""
        os.replace(self.pending_path, self.path)

    def finish(self, result: Mapping[str, Any]) -> None:
        """Record the final result (``TrainResult.to_dict()``) in the checkpoint once training is over."""
        # Read back rather than kept from the last save: a group would hold every member's weights twice.
        if self.existing() is None:
            return  # the run ended before its first epoch (diverged or a time cap): nothing to reload
        data = torch.load(self.path, map_location="cpu", weights_only=True)
        atomic_save({**data, "finished": True, "result": dict(result)}, self.path)


# ------------------------------------------------------------------------------ groups
class GroupCheckpoint:
    """The checkpoint hook of the training loop (:func:`cellsearch.training.loop.run_members`): one file per member.

    Every member of a run (one setting alone, or several seeds trained as one batched model) has
    its own :class:`Checkpointer` and its own file, in the format of a single run: a member's
    checkpoint loads with :func:`load_model` and resumes alone or in a group alike.

    A group writes its members' files as one commit: each member's new file goes beside the old one
    (``checkpoint.pt.pending``), and only when all are written does each replace its checkpoint.
    :meth:`settle` (called before resuming) finishes a commit that a kill interrupted while replacing
    (every member of it has its new file) and discards one interrupted while writing, so the members
    of a group resume from the same epoch and an interrupted group ends as an uninterrupted one.

    The members object of the loop (a :class:`~cellsearch.training.members.Members`) supplies, per
    member: ``member_state(i)`` (weights by ``SequenceModel`` name), ``load_member_states``,
    ``rng_state(i)`` / ``set_rng_states`` (the generator its dropout draws from) and
    ``member_carried`` / ``join_carried`` (its slice of the state carried across windows).
    """

    def __init__(self, checkpointers: Sequence[Checkpointer]):
        self.checkpointers = list(checkpointers)
        if not self.checkpointers:
            raise ValueError("a group checkpoint needs at least one member")

    @staticmethod
    def settle(checkpointers: Sequence[Checkpointer]) -> None:
        """Finish or discard a group save that a kill interrupted (see the class doc)."""
        commits: dict[Path, dict[str, Any] | None] = {}  # each file is read once, however many members name it

        def commit_of(path: Path) -> dict[str, Any] | None:
            path = Path(os.path.normpath(path))
            if path not in commits:
                commits[path] = _commit_of(path)
            return commits[path]

        def written_by(member_file: Path, token: str) -> bool:
            return any((commit := commit_of(candidate)) is not None and commit["token"] == token
                       for candidate in (member_file.with_name(f"{member_file.name}.pending"), member_file))

        decisions = []
        for checkpointer in checkpointers:
            pending = checkpointer.pending_path
            if not pending.exists() and not pending.is_symlink():
                continue
            if not pending.is_file():
                raise CheckpointError(f"{pending} is not a checkpoint file; delete it to resume from "
                                      f"{checkpointer.path}")
            commit = commit_of(pending)
            complete = commit is not None and all(written_by(pending.parent / member, commit["token"])
                                                  for member in commit["members"])
            decisions.append((pending, checkpointer.path, complete))
        # decided first, applied after: replacing a file must not change what another member's decision reads
        for pending, path, complete in decisions:
            if complete:
                os.replace(pending, path)
            else:
                pending.unlink()

    def restore(self, trained: Members, members: Sequence[Any]) -> Resumed | None:
        """Load the members' saved states into the loop's objects (inside its forked RNG); None when starting afresh.

        ``members`` are the loop's per-member records (``schedule``, ``run``, ``best_state``), in the
        order of the checkpointers. All members must resume from the same point (or all start afresh).
        """
        self.settle(self.checkpointers)
        loaded = [checkpointer.existing() for checkpointer in self.checkpointers]
        if all(item is None for item in loaded):
            return None
        points = {None if item is None else item.resume_point for item in loaded}
        if len(points) > 1:
            raise ValueError(f"members of one group resume from different points {sorted(map(str, points))}: "
                             f"group them by Checkpoint.resume_point")
        device = trained.device
        for index, (checkpointer, item) in enumerate(zip(self.checkpointers, loaded)):
            state = trained.member_state(index)
            checkpointer.check_loaded(item, state, next(iter(state.values())).dtype)
        trained.load_member_states([item.model_state for item in loaded])
        trained.set_rng_states([{key: item.rng.get(key) for key in ("torch", "cuda")} for item in loaded])
        for member, item in zip(members, loaded):
            for name in _SCHEDULE_FIELDS:
                setattr(member.schedule, name, item.loop["schedule"][name])
            for name in _RUN_STATE_FIELDS:
                value = item.loop["run_state"][name]
                setattr(member.run, name, [dict(point) for point in value] if name == "curve" else
                        dict(value) if name == "best_metrics" else value)
            best = item.best_model_state
            member.best_state = None if best is None else {name: tensor.to(device) for name, tensor in best.items()}
        first = loaded[0]
        carried = None if first.loop["carried"] is None else trained.join_carried(
            [_carried_to(item.loop["carried"], device) for item in loaded])
        return Resumed(row=int(first.loop["row"]), carried=carried, finished=first.finished)

    def save(self, trained: Members, saved: Sequence[tuple[int, Any, bool]], *, row: int, carried: Any) -> None:
        """Write the checkpoints of ``saved`` = (position in ``trained``, loop record, finished) after an epoch.

        The loop record's ``position`` is the member's index among the checkpointers.
        """
        if not saved:
            return
        writes = [(self.checkpointers[member.position], index, member, finished) for index, member, finished in saved]
        if len(writes) == 1:
            checkpointer, index, member, finished = writes[0]
            checkpointer.save(self._payload(trained, checkpointer, index, member, finished, row, carried, None))
            return
        # one token per group save: the members share epoch and step counts
        token = f"epoch-{saved[0][1].run.epochs}-step-{saved[0][1].run.steps}"
        files = [checkpointer.path for checkpointer, *_ in writes]
        for checkpointer, index, member, finished in writes:
            commit = {"token": token, "members": [os.path.relpath(path, checkpointer.path.parent) for path in files]}
            checkpointer.save_pending(
                self._payload(trained, checkpointer, index, member, finished, row, carried, commit))
        for checkpointer, *_ in writes:
            checkpointer.promote()

    @staticmethod
    def _payload(trained: Members, checkpointer: Checkpointer, index: int, member: Any, finished: bool, row: int,
                 carried: Any, commit: Mapping[str, Any] | None) -> dict[str, Any]:
        return checkpointer.payload(
            trained.member_state(index), member.schedule, member.run, row=row,
            carried=trained.member_carried(carried, index), best_model=member.best_state, finished=finished,
            rng=trained.rng_state(index), commit=commit)


def _commit_of(path: Path) -> dict[str, Any] | None:
    """The group save that wrote the checkpoint file at ``path``; None when none did, or it cannot be read."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path).commit
    except CheckpointError:
        return None  # unreadable: it cannot complete a commit, and the previous checkpoint stands
