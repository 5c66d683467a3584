"""The training loop: sizing, schedule, failure statuses, reproducibility, and ``cellsearch train``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsearch import zoo
from cellsearch.cli import main
from cellsearch.hparams import HyperParams
from cellsearch.tasks import get_task
from cellsearch.model import build_model, model_parameter_count, solve_hidden_size
from cellsearch.tasks.base import Split
from cellsearch.training import PlateauHalving, batchify, train_and_evaluate

CELLS = ("tanh_rnn", "lstm", "gru", "mut1")


@pytest.fixture(scope="module")
def memorize():
    return get_task("memorize")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_width_solver_matches_the_built_model(memorize, cell, num_layers):
    spec = zoo.get(cell)
    hparams = HyperParams(num_layers=num_layers, parameter_budget=25_000)
    model = build_model(spec, memorize, hparams)
    width = model.hidden_size
    counted = sum(p.numel() for p in model.parameters())
    assert counted == model_parameter_count(spec, memorize.vocab_size, num_layers, width) <= 25_000
    assert model_parameter_count(spec, memorize.vocab_size, num_layers, width + 1) > 25_000


@settings(max_examples=60, deadline=None)
@given(
    cell=st.sampled_from(sorted(zoo.names())),
    vocab_size=st.integers(2, 20_000),
    num_layers=st.integers(1, 4),
    budget=st.integers(1, 10**9),
)
def test_width_solver_gives_the_largest_width_within_budget(cell, vocab_size, num_layers, budget):
    spec = zoo.get(cell)
    width = solve_hidden_size(spec, vocab_size, num_layers, budget)
    assert width >= 1
    assert model_parameter_count(spec, vocab_size, num_layers, width + 1) > budget
    if width > 1:
        assert model_parameter_count(spec, vocab_size, num_layers, width) <= budget


def test_equal_budgets_give_gated_cells_narrower_layers():
    widths = {cell: solve_hidden_size(zoo.get(cell), 40, 1, 100_000) for cell in ("tanh_rnn", "gru", "lstm")}
    assert widths["tanh_rnn"] > widths["gru"] > widths["lstm"]


def test_schedule_waits_three_epochs_then_halves_four_times_and_stops():
    schedule = PlateauHalving(1.0)
    rates = []
    going = True
    scores = iter([0.1, 0.2, 0.3, 0.3, 0.29, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    while going:
        going = schedule.update(next(scores))
        rates.append(schedule.learning_rate)
    # Epochs 4-6 do not improve on 0.3; the next four epochs run at 1/2, 1/4, 1/8, 1/16, then it stops.
    assert rates == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert schedule.best == 0.8  # the fifth decay epoch never runs


def test_schedule_keeps_going_while_improving():
    schedule = PlateauHalving(2.0, patience=3, decay_epochs=4)
    assert all(schedule.update(score) for score in np.linspace(0, 1, 50))
    assert schedule.learning_rate == 2.0 and not schedule.decaying


def test_batchify_makes_parallel_columns():
    split = Split(np.arange(23, dtype=np.int32), np.arange(23) % 2 == 0)
    tokens, mask = batchify(split, 4)
    assert tokens.shape == (5, 4) and tokens.dtype == torch.int64
    assert tokens[:, 1].tolist() == [5, 6, 7, 8, 9]
    assert mask[:, 1].tolist() == [False, True, False, True, False]


def test_same_seed_same_result_and_no_global_rng_leak(memorize):
    spec = zoo.get("lstm")
    hparams = memorize.default_hparams("smoke").replace(dropout=0.3)
    budget = memorize.budget("smoke")
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    first = train_and_evaluate(spec, memorize, hparams, budget, seed=5)
    again = train_and_evaluate(spec, memorize, hparams, budget, seed=5, num_threads=2)
    other = train_and_evaluate(spec, memorize, hparams, budget, seed=6)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    assert first.status == "ok" and first.steps == 10 and first.epochs == 2 and len(first.curve) == 2
    assert first.score == again.score and first.curve == again.curve
    assert other.curve != first.curve
    assert first.score == max(point["score"] for point in first.curve) > 0
    data = first.to_dict()
    assert json.loads(json.dumps(data))["hparams"] == hparams.to_dict()


@pytest.mark.parametrize(
    "changes", [{"init_scale": 1e38}, {"learning_rate": 1e38, "max_grad_norm": 20.0}], ids=["init", "learning_rate"]
)
def test_divergence_is_a_status_not_an_exception(memorize, changes):
    hparams = memorize.default_hparams("smoke").replace(**changes)
    result = train_and_evaluate(zoo.get("tanh_rnn"), memorize, hparams, memorize.budget("smoke"), seed=0)
    assert result.status == "diverged"
    assert result.score == 0.0 and result.metrics == {}
    assert "inf" in result.message or "nan" in result.message


def test_out_of_memory_is_a_status_not_an_exception(memorize):
    hparams = memorize.default_hparams("smoke").replace(parameter_budget=10**18)
    result = train_and_evaluate(zoo.get("tanh_rnn"), memorize, hparams, memorize.budget("smoke"), seed=0)
    assert result.status == "oom" and result.score == 0.0 and result.steps == 0


def test_wall_clock_cap_reports_the_score_so_far(memorize):
    budget = memorize.budget("smoke").replace(max_epochs=1000, steps_per_epoch=1000, max_seconds=0.5)
    result = train_and_evaluate(zoo.get("gru"), memorize, memorize.default_hparams("smoke"), budget, seed=0)
    assert result.status == "timeout" and "0.5 s" in result.message
    assert len(result.curve) == 1 and 0 < result.score == result.curve[0]["score"]


def test_step_cap_and_test_evaluation(memorize):
    budget = memorize.budget("smoke").replace(max_steps=7, evaluate_test=True)
    result = train_and_evaluate(zoo.get("gru"), memorize, memorize.default_hparams("smoke"), budget, seed=0)
    assert result.status == "ok" and result.steps == 7 and result.epochs == 1
    assert [p["step"] for p in result.curve] == [5, 7]
    assert {"valid_accuracy", "test_accuracy", "test_loss"} <= set(result.metrics)


def test_training_learns_beyond_symbol_frequencies():
    task = get_task("xml")
    budget = task.budget("smoke").replace(max_epochs=2, steps_per_epoch=30)
    result = train_and_evaluate(zoo.get("tanh_rnn"), task, task.default_hparams("smoke"), budget, seed=0)
    valid = task.splits["valid"].tokens[: budget.eval_tokens]
    most_frequent_rate = np.bincount(valid).max() / len(valid)
    losses = [p["train_loss"] for p in result.curve]
    assert losses[-1] < losses[0]
    assert result.score > most_frequent_rate + 0.05


def test_ptb_score_is_inverse_perplexity(ptb_dir):
    task = get_task("ptb", data_dir=ptb_dir)
    budget = task.budget("smoke").replace(max_epochs=1, steps_per_epoch=2)
    result = train_and_evaluate(zoo.get("tanh_rnn"), task, task.default_hparams("smoke"), budget, seed=0)
    assert result.status == "ok"
    assert result.score == pytest.approx(1 / result.metrics["valid_perplexity"])
    assert result.metrics["valid_perplexity"] == pytest.approx(math.exp(result.metrics["valid_loss"]))
    assert result.metrics["valid_perplexity"] < 3 * task.vocab_size


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", "train", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_trains_a_reference_cell_to_json():
    done = _cli("gru", "--task", "memorize", "--profile", "smoke", "--json", "--seed", "3")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["cell"] == "gru" and payload["task"] == "memorize" and payload["profile"] == "smoke"
    (result,) = payload["results"]
    assert result["status"] == "ok" and result["steps"] == 10 and result["seed"] == 3
    assert 0 < result["score"] <= 1
    assert "step" in done.stderr  # the progress bar


def test_cli_samples_settings_and_prints_a_table(tmp_path, capsys):
    cell_file = tmp_path / "cell.json"
    zoo.get("tanh_rnn").save(cell_file)
    code = main(["train", str(cell_file), "--task", "memorize", "--profile", "smoke", "--sample", "2",
                 "--set", "max_steps=3", "--set", "learning_rate=0.5", "--no-progress"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cell ") and "score" in lines[1] and "best: #" in lines[-1]
    rows = [line.split() for line in lines[2:4]]
    assert [row[0] for row in rows] == ["1", "2"] and all(row[1] == "ok" for row in rows)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--set", "momentum=0.9"],
         "unknown key 'momentum'; hyperparameters: dropout, dropout_mode, init_scale, layer_norm, learning_rate"),
        (["--set", "learning_rate=-1"], "learning_rate: -1.0 is out of range"),
        (["--set", "max_steps"], "--set expects KEY=VALUE"),
        (["--task", "chess"], "unknown task 'chess'"),
    ],
)
def test_cli_rejects_unknown_keys_and_bad_values(capsys, arguments, message):
    base = ["train", "gru", "--profile", "smoke", "--no-progress"]
    if "--task" not in arguments:
        base += ["--task", "memorize"]
    assert main(base + arguments) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_a_cell_whose_output_ignores_x_still_trains():
    # x only feeds a state that never reaches the output: the embedding gets no gradient, and the
    # optimizer must skip it rather than fail.
    from cellsearch import CellSpec, get_task, train_and_evaluate

    spec = CellSpec(
        states=["h", "c"],
        nodes={"a": {"op": "linear", "inputs": ["h"]}, "hn": {"op": "tanh", "inputs": ["a"]},
               "cn": {"op": "add", "inputs": ["x", "c"]}},
        outputs={"h": "hn", "c": "cn"},
    )
    task = get_task("memorize")
    result = train_and_evaluate(spec, task, task.default_hparams("smoke"), task.budget("smoke"), seed=0)
    assert result.status == "ok" and result.steps > 0
