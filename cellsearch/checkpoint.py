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
  epochs, best score and metrics, the curve, and torch's random state;
- ``finished`` and, once training is over, the final ``result``
  (``TrainResult.to_dict()``).

:class:`Checkpointer` is the hook :func:`cellsearch.training.train_and_evaluate`
calls: :meth:`Checkpointer.restore` before training and :meth:`Checkpointer.save`
after every completed epoch. Writes are atomic (a temporary file, then
``os.replace``), so a process killed at any moment leaves the previous
checkpoint intact.

:func:`load_model` rebuilds the trained :class:`~cellsearch.training.SequenceModel`
on any device; :func:`load_checkpoint` returns the validated contents.
Anything wrong with a file (missing, truncated, garbage, pickled objects,
another cell, a spec that does not match its hash, a field of the wrong type,
weights or a carried state whose names, shapes or dtypes do not fit the cell)
raises :class:`CheckpointError` (a :class:`~cellsearch.errors.UserError`) with a
one-line reason. Every field is checked before it is used, and the weights are
compared with a model built on torch's ``meta`` device (no memory), so a file
that claims a huge width costs nothing to refuse.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from cellsearch.errors import UserError, shown
from cellsearch.spec import CellSpec, CellSpecError

__all__ = ["CheckpointError", "Checkpoint", "Resumed", "Checkpointer", "load_checkpoint", "load_model",
           "FORMAT", "VERSION"]

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

    @property
    def curve(self) -> list[dict[str, float]]:
        """Held-out evaluations so far, one per epoch."""
        return list(self.loop["run_state"]["curve"])


@dataclass(frozen=True)
class Resumed:
    """What the training loop takes back from a checkpoint besides the model, schedule and counters."""

    row: int
    carried: Any
    best_model: dict[str, torch.Tensor] | None
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
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if "unsupported global" in reason.lower():
            raise CheckpointError(f"{path} holds pickled Python objects, which weights-only loading refuses "
                                  f"(not a cellsearch checkpoint, or a tampered one): {reason}") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or not a torch file): {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
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
    (("loop", "schedule", "learning_rate"), _number, "a number"),
    (("loop", "schedule", "patience"), _integer(1), "a positive integer"),
    (("loop", "schedule", "decay_epochs"), _integer(0), "a non-negative integer"),
    (("loop", "schedule", "factor"), _number, "a number"),
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
    if problem is not None:
        raise CheckpointError(f"{path}: the {which} weights do not fit cell {spec.short_hash} at width {hidden_size}: "
                              f"{problem}")


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
        rng=dict(data["rng"]), result=data["result"],
    )


def load_model(checkpoint: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu",
               weights: str = "best") -> torch.nn.Module:
    """The trained model of a checkpoint, on ``device``, in eval mode (call ``.train()`` to fine-tune).

    It is a :class:`~cellsearch.training.SequenceModel`: ``logits, state =
    model(tokens, state)`` with ``tokens`` of shape (time, batch); its cell is
    ``model.rnn`` (a :class:`~cellsearch.compiler.CellRNN`). ``weights='best'``
    (default) gives the weights with the best held-out score (those the test
    metrics were measured with) when the checkpoint has them, ``'last'`` the
    weights at the checkpoint's epoch.
    """
    from cellsearch.training import SequenceModel

    if weights not in ("best", "last"):
        raise UserError(f"weights must be 'best' or 'last', got {weights!r}")
    loaded = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    state = loaded.best_model_state if weights == "best" and loaded.best_model_state is not None else loaded.model_state
    # Shapes are checked on a model without storage first: the sizes in the file are not trusted.
    with torch.device("meta"):
        template = SequenceModel(loaded.spec, loaded.vocab_size, loaded.hidden_size, loaded.num_layers,
                                 loaded.dropout)
    expected = template.state_dict()
    for which, stored in (("last", loaded.model_state), ("best", loaded.best_model_state)):
        if stored is not None:
            _check_weights(stored, expected, loaded.path, which, loaded.spec, loaded.hidden_size)
    model = SequenceModel(loaded.spec, loaded.vocab_size, loaded.hidden_size, loaded.num_layers, loaded.dropout)
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
        self.saves = 0
        self._last: dict[str, Any] | None = None

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

    # The two methods below are the hook called by the training loop.
    def restore(self, model: torch.nn.Module, schedule: Any, run_state: Any,
                optimizer: torch.optim.Optimizer | None = None) -> Resumed | None:
        """Load the saved state into the loop's objects (inside its forked RNG); None when starting afresh."""
        loaded = self.existing()
        if loaded is None:
            return None
        device = next(model.parameters()).device
        expected = model.state_dict()
        _check_weights(loaded.model_state, expected, self.path, "last", self.spec, loaded.hidden_size)
        if loaded.best_model_state is not None:
            _check_weights(loaded.best_model_state, expected, self.path, "best", self.spec, loaded.hidden_size)
        self._check_carried(loaded, next(model.parameters()).dtype)
        if torch.get_rng_state().shape != loaded.rng["torch"].shape:
            raise CheckpointError(f"{self.path}: rng.torch is not a torch random state")
        model.load_state_dict(loaded.model_state)
        if optimizer is not None and loaded.optimizer_state is not None:
            try:
                optimizer.load_state_dict(loaded.optimizer_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as error:
                raise CheckpointError(f"{self.path}: the optimizer state does not fit this run: "
                                      f"{shown(str(error), 120)}") from None
        for name in _SCHEDULE_FIELDS:
            setattr(schedule, name, loaded.loop["schedule"][name])
        for name in _RUN_STATE_FIELDS:
            value = loaded.loop["run_state"][name]
            setattr(run_state, name, [dict(point) for point in value] if name == "curve" else
                    dict(value) if name == "best_metrics" else value)
        torch.set_rng_state(loaded.rng["torch"])
        if device.type == "cuda" and loaded.rng.get("cuda") is not None:
            torch.cuda.set_rng_state(loaded.rng["cuda"], device)
        best = loaded.best_model_state
        return Resumed(
            row=int(loaded.loop["row"]),
            carried=_carried_to(loaded.loop["carried"], device),
            best_model=None if best is None else {name: tensor.to(device) for name, tensor in best.items()},
            finished=loaded.finished,
        )

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

    def save(self, model: torch.nn.Module, schedule: Any, run_state: Any, *, row: int, carried: Any,
             best_model: Mapping[str, torch.Tensor] | None, finished: bool,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write the loop's state after a completed epoch (atomically)."""
        device = next(model.parameters()).device
        data = {
            **self.header,
            "epoch": int(run_state.epochs),
            "finished": bool(finished),
            "model": _state_to_cpu(model.state_dict()),
            "best_model": _state_to_cpu(best_model),
            "optimizer": None if optimizer is None else _optimizer_state_to_cpu(optimizer.state_dict()),
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
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "result": None,
        }
        atomic_save(data, self.path)
        self._last = data
        self.saves += 1

    def finish(self, result: Mapping[str, Any]) -> None:
        """Record the final result (``TrainResult.to_dict()``) in the checkpoint once training is over."""
        data = self._last
        if data is None:
            loaded = self.existing()
            if loaded is None:
                # The run ended before its first epoch (diverged or a time cap): nothing to reload.
                return
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        atomic_save({**data, "finished": True, "result": dict(result)}, self.path)
