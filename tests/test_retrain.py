"""Retraining, checkpoints and load_model: real CLI runs, SIGKILL and resume, weights-only loading, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellsearch import zoo
from cellsearch.checkpoint import Checkpointer, CheckpointError, load_checkpoint, load_model
from cellsearch.errors import UserError
from cellsearch.retrain import get_preset, load_presets, resolve_source, retrain
from cellsearch.tasks import get_task, task_names
from cellsearch.training import batchify, build_model, evaluate, solve_hidden_size

REPO = Path(__file__).resolve().parents[1]
TASK, PRESET = "memorize", "tiny"
#: The same retrain everywhere: the gru plus the lstm_b baseline, two seeds each (four runs of 12 steps).
ARGS = ["gru", "--task", TASK, "--preset", PRESET, "--seeds", "2", "--baselines", "lstm_b"]
#: Columns that must be identical between an interrupted-and-resumed retrain and an uninterrupted one.
COMPARED = ["cell", "hash", "seed", "status", "hidden_size", "parameter_count", "score", "valid_accuracy",
            "test_accuracy", "valid_loss", "test_loss", "best_epoch", "epochs", "steps"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "cellsearch.cli", *args], cwd=REPO, capture_output=True,
                               text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and completed.returncode != 0:
        raise AssertionError(f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    return completed


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """An uninterrupted in-process retrain (the ground truth for resume, and checkpoints to reload)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    retrain(resolve_source("gru"), TASK, PRESET, out, seeds=2, baselines=["lstm_b"], in_process=True)
    return out


# --------------------------------------------------------------------------------------------- CLI
def test_cli_retrain_on_ray_end_to_end(tmp_path, ray_address, reference_dir):
    out = tmp_path / "retrain"
    completed = cli("retrain", *ARGS, "--address", ray_address, "--out", str(out))
    assert "| gru | candidate |" in completed.stdout and "| lstm_b | baseline |" in completed.stdout
    assert "mean ± standard deviation" in completed.stdout
    for name in ("plan.json", "results.csv", "curves.csv", "curves.png", "summary.csv", "summary.md"):
        assert (out / name).is_file(), name
    runs = pd.read_csv(out / "results.csv")
    assert sorted(runs["cell"]) == ["gru", "gru", "lstm_b", "lstm_b"]
    # Same seeds for every cell; each cell at its own width within the same parameter budget.
    assert runs.groupby("cell")["seed"].apply(sorted).apply(tuple).nunique() == 1
    preset = get_preset(TASK, PRESET)
    task = get_task(TASK)
    for cell, width in runs.groupby("cell")["hidden_size"].first().items():
        assert width == solve_hidden_size(zoo.get(cell), task.vocab_size, 1, preset.hparams.parameter_budget)
    assert (runs["parameter_count"] <= preset.hparams.parameter_budget).all()
    assert runs["hidden_size"].nunique() == 2
    # Ray workers give bit-identical results to an in-process run.
    expected = pd.read_csv(reference_dir / "results.csv")
    pd.testing.assert_frame_equal(runs[COMPARED], expected[COMPARED])
    curves = pd.read_csv(out / "curves.csv")
    assert set(curves.groupby(["cell", "seed"]).size()) == set(runs["epochs"].clip(lower=1))
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["cell"]) == ["gru", "lstm_b"] and (summary["ok"] == 2).all()


KILL_SCRIPT = """
import os, signal, sys
from cellsearch.retrain import resolve_source, retrain
out, kind, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = 0
def progress(event):
    global seen
    if event["kind"] == kind:
        seen += 1
        if seen == target:
            os.kill(os.getpid(), signal.SIGKILL)
retrain(resolve_source("gru"), "memorize", "tiny", out, seeds=2, baselines=["lstm_b"], in_process=True,
        progress=progress)
raise SystemExit("the kill point was never reached")
"""


#: Runs take 4 epochs of 3 steps: run 1 is steps 1..12, run 2 steps 13..24, and so on.
_MID_EPOCH_STEP = int(np.random.default_rng(6).choice([5, 7, 8, 10, 11]))


@pytest.mark.parametrize("kind, target, resumed_run, resumed_epoch", [
    # A random step in the middle of a later epoch of run 2 (seeded).
    ("step", 12 + _MID_EPOCH_STEP, "gru/seed-1", (_MID_EPOCH_STEP - 1) // 3),
    # The first step after run 3's first checkpoint: the kill lands right on an epoch boundary.
    ("step", 24 + 4, "lstm_b/seed-0", 1),
    # Run 4's second evaluation, before that epoch's checkpoint is written: the epoch is redone.
    ("epoch", 3 * 4 + 2, "lstm_b/seed-1", 1),
])
def test_sigkill_and_resume_gives_the_uninterrupted_result(tmp_path, reference_dir, kind, target, resumed_run,
                                                           resumed_epoch):
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), kind, str(target)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = out / "runs" / resumed_run
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "result.json").exists()
    assert load_checkpoint(run_dir / "checkpoint.pt").epoch == resumed_epoch

    completed = cli("retrain", *ARGS, "--in-process", "--out", str(out))
    assert f"resumed from epoch {resumed_epoch}" in completed.stderr
    record = json.loads((run_dir / "result.json").read_text())
    assert record["resumed_from_epoch"] == resumed_epoch
    resumed = pd.read_csv(out / "results.csv")
    expected = pd.read_csv(reference_dir / "results.csv")
    pd.testing.assert_frame_equal(resumed[COMPARED], expected[COMPARED])
    pd.testing.assert_frame_equal(pd.read_csv(out / "curves.csv"), pd.read_csv(reference_dir / "curves.csv"))


def test_rerun_with_other_arguments_is_refused(reference_dir):
    completed = cli("retrain", *ARGS[:-4], "--seeds", "3", "--baselines", "lstm_b", "--in-process",
                    "--out", str(reference_dir), check=False)
    assert completed.returncode == 2
    assert "holds a different retrain" in completed.stderr and "seeds" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_checkpoint_of_another_cell_is_not_resumed(tmp_path, reference_dir):
    import shutil

    out = tmp_path / "swapped"
    shutil.copytree(reference_dir, out)
    target = out / "runs" / "lstm_b" / "seed-0"
    (target / "result.json").unlink()
    shutil.copy(out / "runs" / "gru" / "seed-0" / "checkpoint.pt", target / "checkpoint.pt")
    with pytest.raises(UserError, match=r"1 retrain run\(s\) failed.*checkpoint of cell gru .* not of lstm_b"):
        retrain(resolve_source("gru"), TASK, PRESET, out, seeds=2, baselines=["lstm_b"], in_process=True)
    # The other runs were left alone.
    assert (out / "runs" / "lstm_b" / "seed-1" / "result.json").is_file()


# --------------------------------------------------------------------------------------- load_model
def test_load_model_reproduces_the_recorded_test_metrics(reference_dir):
    task = get_task(TASK)
    tokens, mask = batchify(task.splits["test"], task.eval_batch_size)
    for result_path in sorted(reference_dir.glob("runs/*/seed-*/result.json")):
        record = json.loads(result_path.read_text())
        model = load_model(result_path.parent / "checkpoint.pt", device="cpu")
        assert not model.training
        loss, accuracy = evaluate(model, tokens, mask, task.unroll)
        assert loss == record["metrics"]["test_loss"] and accuracy == record["metrics"]["test_accuracy"]
        loaded = load_checkpoint(result_path.parent / "checkpoint.pt")
        assert loaded.finished and loaded.result["score"] == record["score"]
        assert loaded.spec.hash == record["cell_hash"]


def test_load_model_round_trip_gives_the_same_outputs(tmp_path):
    task = get_task(TASK)
    preset = get_preset(TASK, PRESET)
    spec = zoo.get("lstm_b")
    torch.manual_seed(3)
    model = build_model(spec, task, preset.hparams).eval()
    checkpointer = Checkpointer(tmp_path / "c.pt", spec, task=TASK, vocab_size=task.vocab_size,
                                hidden_size=model.hidden_size, hparams=preset.hparams.to_dict(),
                                budget=preset.budget.to_dict(), seed=0)
    from cellsearch.training import PlateauHalving, _RunState

    checkpointer.save(model, PlateauHalving(1.0), _RunState(), row=0, carried=None, best_model=None, finished=False)
    loaded = load_model(tmp_path / "c.pt", device=torch.device("cpu"), weights="last")
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, task.vocab_size, (35, 4)))
    with torch.no_grad():
        expected, expected_state = model(tokens)
        actual, actual_state = loaded(tokens)
    assert torch.equal(expected, actual)
    assert all(torch.equal(a, b) for a, b in zip(expected_state, actual_state))
    # The cell alone is a CellRNN with the trained weights.
    assert type(loaded.rnn).__name__ == "CellRNN" and loaded.rnn.hidden_size == model.hidden_size
    import cellsearch

    assert cellsearch.load_model is load_model


# ------------------------------------------------------------------------------------ bad checkpoints
class _Payload:
    """Pickles as a call to ``open(marker, 'w')``: loading it with full unpickling would create the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, reference_dir):
    source = reference_dir / "runs" / "gru" / "seed-0" / "checkpoint.pt"
    data = torch.load(source, weights_only=True)
    marker = tmp_path / "executed"
    torch.save({**data, "config": {"payload": _Payload(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_checkpoints_are_rejected_clearly(tmp_path, reference_dir):
    source = reference_dir / "runs" / "gru" / "seed-0" / "checkpoint.pt"
    content = source.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(content[: len(content) // 2])
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a cellsearch checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")

    data = torch.load(source, weights_only=True)
    with pytest.raises(CheckpointError, match=r"checkpoint of cell gru .* not of lstm_b"):
        load_checkpoint(source, expected=zoo.get("lstm_b"))
    torch.save({**data, "spec_hash": zoo.get("lstm").hash}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="spec mismatch"):
        load_checkpoint(tmp_path / "mismatch.pt")
    torch.save({**data, "spec": zoo.get("lstm").to_dict(), "spec_hash": zoo.get("lstm").hash},
               tmp_path / "other_weights.pt")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(tmp_path / "other_weights.pt")
    # Every one of these is a UserError: the CLI prints it as one line.
    assert issubclass(CheckpointError, UserError)


# ------------------------------------------------------------------------------------------- presets
def test_every_task_has_valid_presets_and_zaremba_sizes_match_the_paper():
    for name in task_names():
        presets = load_presets(name)
        assert {"tiny", "quick"} <= set(presets), name
    ptb = load_presets("ptb")
    lstm = zoo.get("lstm")
    small, medium = ptb["zaremba_small"], ptb["zaremba_medium"]
    # The budgets are the 2-layer LSTM's at Zaremba et al.'s widths, so an LSTM gets exactly that width.
    assert solve_hidden_size(lstm, 10_000, 2, small.hparams.parameter_budget) == 200
    assert solve_hidden_size(lstm, 10_000, 2, medium.hparams.parameter_budget) == 650
    assert (small.hparams.num_layers, small.hparams.dropout, small.budget.max_epochs) == (2, 0.0, 13)
    assert (medium.hparams.num_layers, medium.hparams.dropout, medium.budget.max_epochs) == (2, 0.5, 39)
    # Their rate 1 and clipping at 5 on a loss summed over the 35 unrolled steps, on our averaged loss.
    for preset in (small, medium):
        assert preset.hparams.learning_rate / 35 == 1.0
        assert preset.hparams.max_grad_norm * 35 == pytest.approx(5.0, rel=1e-5)
    # Zaremba's uniform +-0.1 (small) and +-0.05 (medium) under our +-init_scale/sqrt(width) rule.
    assert small.hparams.init_scale / np.sqrt(200) == pytest.approx(0.1, rel=1e-3)
    assert medium.hparams.init_scale / np.sqrt(650) == pytest.approx(0.05, rel=1e-3)


def test_unknown_preset_and_source_fail_with_one_line(tmp_path):
    completed = cli("retrain", "gru", "--task", TASK, "--preset", "huge", "--in-process", "--out", str(tmp_path),
                    check=False)
    assert completed.returncode == 2 and "no retrain preset 'huge'" in completed.stderr
    completed = cli("retrain", "no_such_cell", "--task", TASK, "--in-process", "--out", str(tmp_path), check=False)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
