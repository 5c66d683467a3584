"""Retraining, checkpoints and load_model: real CLI runs, SIGKILL and resume, weights-only loading, bad files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import cellsearch
from cellsearch import zoo
from cellsearch.batching import BatchingConfig
from cellsearch.errors import UserError
from cellsearch.model import build_model, solve_hidden_size
from cellsearch.retrain import (
    RetrainOptions, RunFailure, baseline_cells, get_preset, load_presets, plan_jobs, resolve_source, retrain, run_job,
)
from cellsearch.tasks import get_task, task_names
from cellsearch.training import GroupMember, PlateauHalving, batchify, evaluate
from cellsearch.training.checkpoint import Checkpointer, CheckpointError, load_checkpoint, load_model
from cellsearch.training.groups import train_group
from cellsearch.training.loop import _RunState

REPO = Path(__file__).resolve().parents[1]
TASK, PRESET = "memorize", "tiny"
#: The same retrain everywhere: the gru plus the lstm_b baseline, two seeds each (four runs of 12 steps).
ARGS = ["gru", "--task", TASK, "--preset", PRESET, "--seeds", "2", "--baselines", "lstm_b"]
#: Columns that must be identical between an interrupted-and-resumed retrain and an uninterrupted one.
COMPARED = ["cell", "cell_hash", "seed", "status", "hidden_size", "parameter_count", "metric", "valid_accuracy",
            "test_accuracy", "valid_loss", "test_loss", "best_epoch", "epochs", "steps"]
#: How the reference retrain runs (the options ARGS give the CLI).
OPTIONS = RetrainOptions(seeds=2, baselines=("lstm_b",), in_process=True)


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
    retrain(resolve_source("gru"), TASK, PRESET, out, OPTIONS)
    return out


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
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
from cellsearch.retrain import RetrainOptions, resolve_source, retrain
from cellsearch.training.checkpoint import Checkpointer
out, kind, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = 0
def count(what):
    global seen
    if what == kind:
        seen += 1
        if seen == target:
            os.kill(os.getpid(), signal.SIGKILL)
def after(name):
    method = getattr(Checkpointer, name)
    def wrapped(self, *args):
        method(self, *args)
        count(name)
    setattr(Checkpointer, name, wrapped)
after("save_pending")
after("promote")
retrain(resolve_source("gru"), "memorize", "tiny", out, RetrainOptions(seeds=2, baselines=("lstm_b",), in_process=True),
        progress=lambda event: count(event["kind"]))
raise SystemExit("the kill point was never reached")
"""


#: A cell's two seeds train as one batched model: 4 epochs of 3 steps, one step event per seed (the
#: gru's steps are events 1..24, the lstm_b's 25..48) and one epoch event per seed (1..8, 9..16).
_MID_EPOCH_STEP = int(np.random.default_rng(6).choice([5, 7, 8, 10, 11]))


@pytest.mark.parametrize("kind, target, resumed_run, resumed_epoch, other_pending", [
    # A random step in the middle of a later epoch of the gru's seeds (seeded).
    ("step", 2 * _MID_EPOCH_STEP, "gru/seed-1", (_MID_EPOCH_STEP - 1) // 3, False),
    # The first step after the lstm_b seeds' first checkpoint: the kill lands right on an epoch boundary.
    ("step", 24 + 2 * 3 + 1, "lstm_b/seed-0", 1, False),
    # The lstm_b's second evaluation, before that epoch's checkpoints are written: the epoch is redone.
    ("epoch", 8 + 2 + 2, "lstm_b/seed-1", 1, False),
    # Between the seeds' writes of epoch 2: seed 0's new file is written, seed 1's not; the commit is
    # discarded and both resume from epoch 1.
    ("save_pending", 3, "gru/seed-1", 1, True),
    # Between the seeds' replacements of epoch 2: seed 0's checkpoint is replaced, seed 1's new file waits
    # beside its old one; the commit is finished and both resume from epoch 2.
    ("promote", 3, "gru/seed-0", 2, True),
])
@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_result(tmp_path, reference_dir, kind, target, resumed_run,
                                                           resumed_epoch, other_pending):
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), kind, str(target)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = out / "runs" / resumed_run
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "result.json").exists()
    assert load_checkpoint(run_dir / "checkpoint.pt").epoch == resumed_epoch
    pending = sorted(path.parent.name for path in out.glob("runs/*/*/checkpoint.pt.pending"))
    assert pending == (["seed-0" if resumed_run.endswith("1") else "seed-1"] if other_pending else [])

    completed = cli("retrain", *ARGS, "--in-process", "--out", str(out))
    cell = resumed_run.split("/")[0]
    assert completed.stderr.count(f"resumed from epoch {resumed_epoch}") == 2, completed.stderr  # both seeds
    for seed_dir in (out / "runs" / cell).glob("seed-*"):
        assert json.loads((seed_dir / "result.json").read_text())["resumed_from_epoch"] == resumed_epoch
    assert not list(out.glob("runs/*/*/*.pending"))
    resumed = pd.read_csv(out / "results.csv")
    expected = pd.read_csv(reference_dir / "results.csv")
    pd.testing.assert_frame_equal(resumed[COMPARED], expected[COMPARED])
    pd.testing.assert_frame_equal(pd.read_csv(out / "curves.csv"), pd.read_csv(reference_dir / "curves.csv"))


@pytest.mark.slow
def test_rerun_with_other_arguments_is_refused(reference_dir):
    completed = cli("retrain", *ARGS[:-4], "--seeds", "3", "--baselines", "lstm_b", "--in-process",
                    "--out", str(reference_dir), check=False)
    assert completed.returncode == 2
    assert "holds a different retrain" in completed.stderr and "seeds" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_checkpoint_of_another_cell_is_not_resumed(tmp_path, reference_dir):
    out = tmp_path / "swapped"
    shutil.copytree(reference_dir, out)
    target = out / "runs" / "lstm_b" / "seed-0"
    (target / "result.json").unlink()
    shutil.copy(out / "runs" / "gru" / "seed-0" / "checkpoint.pt", target / "checkpoint.pt")
    with pytest.raises(UserError, match=r"1 retrain run\(s\) failed.*checkpoint of cell gru .* not of lstm_b"):
        retrain(resolve_source("gru"), TASK, PRESET, out, OPTIONS)
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
    checkpointer.save(checkpointer.payload(model.state_dict(), PlateauHalving(1.0), _RunState(), row=0, carried=None,
                                           best_model=None, finished=False, rng={"torch": torch.get_rng_state()}))
    loaded = load_model(tmp_path / "c.pt", device=torch.device("cpu"), weights="last")
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, task.vocab_size, (35, 4)))
    with torch.no_grad():
        expected, expected_state = model(tokens)
        actual, actual_state = loaded(tokens)
    assert torch.equal(expected, actual)
    assert all(torch.equal(a, b) for a, b in zip(expected_state, actual_state))
    # The cell alone is a CellRNN with the trained weights.
    assert type(loaded.rnn).__name__ == "CellRNN" and loaded.rnn.hidden_size == model.hidden_size
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


@pytest.mark.slow
def test_unknown_preset_and_source_fail_with_one_line(tmp_path):
    completed = cli("retrain", "gru", "--task", TASK, "--preset", "huge", "--in-process", "--out", str(tmp_path),
                    check=False)
    assert completed.returncode == 2 and "no retrain preset 'huge'" in completed.stderr
    completed = cli("retrain", "no_such_cell", "--task", TASK, "--in-process", "--out", str(tmp_path), check=False)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr


def test_seeds_trained_as_one_batched_model_equal_separate_runs(tmp_path, reference_dir):
    """The reference retrain trains each cell's two seeds together; one run per seed gives the same results."""
    plan = json.loads((reference_dir / "plan.json").read_text())
    out = tmp_path / "separate"
    retrain(resolve_source("gru"), TASK, PRESET, out,
            dataclasses.replace(OPTIONS, batching=BatchingConfig(enabled=False)))
    assert json.loads((out / "plan.json").read_text()) == plan  # batching is not part of the plan: either resumes
    separate, together = pd.read_csv(out / "results.csv"), pd.read_csv(reference_dir / "results.csv")
    exact = ["cell", "cell_hash", "seed", "status", "hidden_size", "parameter_count", "best_epoch", "epochs", "steps"]
    pd.testing.assert_frame_equal(separate[exact], together[exact])
    close = [column for column in COMPARED if column not in exact]
    np.testing.assert_allclose(separate[close].to_numpy(float), together[close].to_numpy(float), rtol=2e-5, atol=1e-6)
    curves_separate, curves_together = pd.read_csv(out / "curves.csv"), pd.read_csv(reference_dir / "curves.csv")
    assert curves_separate.shape == curves_together.shape
    numeric = curves_together.select_dtypes("number").columns
    np.testing.assert_allclose(curves_separate[numeric].to_numpy(float), curves_together[numeric].to_numpy(float),
                               rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_a_batched_seed_checkpoint_resumes_as_a_separate_run(tmp_path, reference_dir):
    """Each seed of a batched group has a single run's checkpoint: killed mid-group, it resumes with --no-batch."""
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), "step", str(2 * 7)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    completed = cli("retrain", *ARGS, "--in-process", "--no-batch", "--out", str(out))
    assert completed.stderr.count("resumed from epoch 2") == 2, completed.stderr
    resumed, expected = pd.read_csv(out / "results.csv"), pd.read_csv(reference_dir / "results.csv")
    assert list(resumed["status"]) == list(expected["status"]) and list(resumed["steps"]) == list(expected["steps"])
    np.testing.assert_allclose(resumed["metric"], expected["metric"], rtol=2e-5)
    np.testing.assert_allclose(resumed["test_loss"], expected["test_loss"], rtol=2e-5)


def test_jobs_fill_the_executor_slots(tmp_path):
    """A cell's seeds share a job where they train together, split into more jobs when slots would stay idle."""
    task = get_task(TASK)
    preset = get_preset(TASK, PRESET)
    cells = [*resolve_source("mut1"), *baseline_cells(["gru", "lstm_b"], [])]
    seeds = list(range(5))

    def sizes(slots, **batching):
        jobs = plan_jobs(cells, TASK, PRESET, preset, seeds, tmp_path, task=task, slots=slots,
                         batching=BatchingConfig(**batching))
        assert sorted((job.label, run.seed_index) for job in jobs for run in job.runs) == sorted(
            (cell.label, seed) for cell in cells for seed in seeds)  # every run exactly once
        return [len(job.runs) for job in jobs]

    assert sizes(1) == [5, 5, 5] and sizes(3) == [5, 5, 5]
    assert sizes(8) == [2, 2, 1] * 3  # 9 jobs for 8 slots
    assert sizes(100) == [1] * 15
    assert sizes(1, max_members=2) == [2, 2, 1] * 3
    assert sizes(1, enabled=False) == [1] * 15


@pytest.mark.slow
def test_a_bad_checkpoint_stops_only_its_own_run(tmp_path, reference_dir):
    """One seed's checkpoint is damaged: the other seeds of the cell still train; the error names the file."""
    out = tmp_path / "damaged"
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), "step", str(2 * 7)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    bad = out / "runs" / "gru" / "seed-1" / "checkpoint.pt"
    bad.write_bytes(b".not a checkpoint")  # torch's reader fails on this with an IndexError
    garbage = out / "runs" / "gru" / "seed-0" / "checkpoint.pt.pending"
    garbage.write_bytes(b"\x00" * 64)  # an unreadable pending file completes nothing: it is discarded
    completed = cli("retrain", *ARGS, "--in-process", "--out", str(out), check=False)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert "1 retrain run(s) failed" in last and "gru seed 1:" in last and f"delete {bad}" in last, last
    assert not garbage.exists()
    runs = pd.read_csv(out / "results.csv")
    expected = pd.read_csv(reference_dir / "results.csv")
    assert len(runs) == 3 and not ((runs["cell"] == "gru") & (runs["seed"] == expected["seed"][1])).any()
    kept = expected[~((expected["cell"] == "gru") & (expected["seed"] == expected["seed"][1]))].reset_index(drop=True)
    pd.testing.assert_frame_equal(runs[COMPARED], kept[COMPARED])


@pytest.mark.parametrize("where", ["in_process", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_damaged_checkpoint_is_a_typed_failure_of_its_run(tmp_path, reference_dir, where, request):
    """A job returns a RunFailure (plain data, through Ray too) for a run whose checkpoint is damaged, not an
    exception to read back from a traceback; the driver makes it the usual one line naming the file to delete."""
    out = tmp_path / "damaged"
    shutil.copytree(reference_dir, out)
    bad = out / "runs" / "gru" / "seed-1" / "checkpoint.pt"
    (bad.parent / "result.json").unlink()
    bad.write_bytes(b".not a checkpoint")
    task = get_task(TASK)
    seeds = json.loads((out / "plan.json").read_text())["seeds"]
    if where == "in_process":
        jobs = plan_jobs(resolve_source("gru"), TASK, PRESET, get_preset(TASK, PRESET), seeds, out.resolve(), task=task)
        items = [item for job in jobs for item in run_job(job, task)]
        assert isinstance(items[0], dict) and items[0]["seed_index"] == 0  # finished before: read back
        failure = items[1]
        assert isinstance(failure, RunFailure) and (failure.label, failure.seed_index) == ("gru", 1)
        assert failure.checkpoint == str(bad.resolve()) and "not a readable checkpoint" in failure.error
        assert RunFailure.from_record(failure.to_dict()) == failure and RunFailure.from_record(items[0]) is None
        options = OPTIONS
    else:
        options = dataclasses.replace(OPTIONS, in_process=False, address=request.getfixturevalue("ray_address"))
    with pytest.raises(UserError) as raised:
        retrain(resolve_source("gru"), TASK, PRESET, out, options)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("1 retrain run(s) failed (the others are done; the same command retries these): "
                              f"gru seed 1: {bad.resolve()} is not a readable checkpoint"), message
    assert message.endswith(f"(delete {bad.resolve()} to start this run over)"), message
    assert "Traceback" not in message and "CheckpointError" not in message
    assert len(pd.read_csv(out / "results.csv")) == 3


def test_commit_fields_naming_files_outside_the_group_are_refused(tmp_path, reference_dir):
    source = next(reference_dir.glob("runs/gru/seed-0/checkpoint.pt"))
    data = torch.load(source, weights_only=True)
    for members in (["../../../../etc/passwd"], ["checkpoint.pt"] * 2,
                    [f"../seed-{i}/checkpoint.pt" for i in range(2000)], ["/abs/checkpoint.pt"], [3]):
        torch.save({**data, "commit": {"token": "epoch-1-step-3", "members": members}}, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match="commit must be"):
            load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_group_checkpoints_mid_training_resume_to_the_uninterrupted_result(tmp_path, device):
    """Members with dropout (each its own generator) leaving at different epochs; the files copied mid-training
    resume, as a group, to exactly the uninterrupted results (on CUDA too: the dropout generators live there)."""
    task = get_task("memorize")
    spec = zoo.get("mut1")
    base = task.default_hparams("smoke").replace(num_layers=2, dropout=0.3)
    budget = task.budget("smoke").replace(evaluate_test=True, max_epochs=6, steps_per_epoch=3, patience=1,
                                          decay_epochs=1)
    members = [GroupMember(base.replace(learning_rate=lr, init_scale=scale, max_grad_norm=cap), seed)
               for seed, (lr, scale, cap) in enumerate([(0.5, 1.0, 5.0), (5.0, 2.8, 1.0), (0.1, 0.3, 20.0)], start=3)]
    width = solve_hidden_size(spec, task.vocab_size, base.num_layers, base.parameter_budget)

    def checkpointers(directory: Path) -> list[Checkpointer]:
        return [Checkpointer(directory / f"seed-{m.seed}" / "checkpoint.pt", spec, task=task.name,
                             vocab_size=task.vocab_size, hidden_size=width, hparams=m.hparams.to_dict(),
                             budget=budget.to_dict(), seed=m.seed) for m in members]

    copied = tmp_path / "copied"

    def copy_after_epoch_two(event):
        if event["kind"] == "step" and event["step"] == 7 and event["member"] == 0:
            shutil.copytree(tmp_path / "full", copied)

    full = train_group(spec, task, members, budget, device, copy_after_epoch_two, checkpoints=checkpointers(
        tmp_path / "full"))
    assert len({result.epochs for result in full}) > 1  # members left the group at different epochs
    assert {load_checkpoint(path).epoch for path in copied.glob("*/checkpoint.pt")} == {2}
    resumed = train_group(spec, task, members, budget, device, checkpoints=checkpointers(copied))
    for ours, theirs in zip(resumed, full):
        assert (ours.status, ours.epochs, ours.steps, len(ours.curve)) == \
            (theirs.status, theirs.epochs, theirs.steps, len(theirs.curve))
        if device == "cpu":
            assert (ours.score, ours.curve, ours.metrics) == (theirs.score, theirs.curve, theirs.metrics)
        else:  # CUDA's embedding backward adds with atomics: two runs agree to float rounding, not bit for bit
            assert ours.score == pytest.approx(theirs.score, rel=1e-4)
            assert ours.metrics == pytest.approx(theirs.metrics, rel=1e-4)
            for point, other in zip(ours.curve, theirs.curve):
                assert point == pytest.approx(other, rel=1e-4)
