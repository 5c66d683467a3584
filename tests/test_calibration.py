"""The fidelity study: statistics on known inputs, shared runs equal separate runs, the CLI end to end
(in-process, on a Ray instance through --address, killed with SIGKILL and resumed), bad input in one line."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellsearch import stats, zoo
from cellsearch.calibration import StudyConfig, parse_budget, plan_study, study_cells, truncate_result
from cellsearch.config import ConfigError
from cellsearch.tasks import get_task
from cellsearch.training import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def cellsearch(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellsearch.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------------------------ statistics
def test_kendall_and_spearman_on_known_inputs():
    assert stats.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one discordant pair of six: (6 - 2 * 1) / 6
    assert stats.kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = (0, 0, 1, -1): 1 - 12 / 60
    assert stats.spearman_rho([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert math.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))  # a constant ranking ranks nothing


def test_intervals_on_known_inputs():
    assert stats.mean_interval([0.5]).low == 0.5 == stats.mean_interval([0.5]).high
    assert math.isnan(stats.mean_interval([]).estimate)
    interval = stats.mean_interval([0.1, 0.2, 0.3, 0.4, 0.5], seed=3)
    assert interval.estimate == pytest.approx(0.3)
    assert 0.1 <= interval.low < 0.3 < interval.high <= 0.5
    assert stats.mean_interval([0.1, 0.2, 0.3, 0.4, 0.5], seed=3) == interval  # seeded: the same table twice
    apart = stats.difference_interval([0.9, 0.91, 0.92], [0.1, 0.12, 0.11])
    assert apart.estimate == pytest.approx(0.8) and apart.low > 0.75
    overlapping = stats.difference_interval([0.5, 0.6], [0.55, 0.58])
    assert overlapping.low < 0 < overlapping.high
    rate = stats.wilson_interval(0, 10)  # Wilson: 0 of 10 -> [0, 0.2775]
    assert rate.estimate == 0 and rate.low == pytest.approx(0, abs=1e-12)
    assert rate.high == pytest.approx(0.2775, abs=1e-3)
    assert stats.wilson_interval(10, 10).low == pytest.approx(0.7225, abs=1e-3)


@pytest.mark.slow
def test_rank_agreement_pairs_seeds():
    rng = np.random.default_rng(0)
    means = np.linspace(0.1, 0.9, 12)
    runs = [means[i] + 0.01 * rng.standard_normal(3) for i in range(12)]
    same = stats.rank_agreement([(r, r) for r in runs])
    assert same.tau.estimate == pytest.approx(1.0) and same.tau.low == pytest.approx(1.0)  # paired: exactly 1
    reversed_ = stats.rank_agreement([(r, runs[11 - i]) for i, r in enumerate(runs)])
    assert reversed_.tau.estimate == pytest.approx(-1.0) and reversed_.rho.high < -0.9
    noisy = stats.rank_agreement([(r, rng.random(3)) for r in runs])
    assert noisy.tau.low < 0.3 and noisy.cells == 12


# --------------------------------------------------------------------------------- shared runs
def test_a_budget_read_off_a_longer_run_equals_its_own_run():
    task = get_task("memorize")
    hparams = task.default_hparams("smoke")
    long_budget = task.budget("smoke").replace(steps_per_epoch=5, max_epochs=6, patience=2, decay_epochs=2)
    long = train_and_evaluate(zoo.get("gru"), task, hparams, long_budget, seed=4).to_dict()
    for epochs in (1, 2, 3, 5):
        short = train_and_evaluate(zoo.get("gru"), task, hparams, long_budget.replace(max_epochs=epochs), seed=4)
        read = truncate_result(long, 5 * epochs, 30)
        assert (read["status"], read["score"], read["steps"]) == (short.status, short.score, short.steps)
        assert read["curve"] == list(short.curve)


def test_truncating_a_diverged_or_timed_out_run():
    curve = [{"epoch": 1, "step": 10, "score": 0.2}, {"epoch": 2, "step": 20, "score": 0.3}]
    diverged = {"status": "diverged", "score": 0.0, "steps": 24, "curve": curve,
                "message": "training loss nan at step 25"}
    assert truncate_result(diverged, 20, 40)["status"] == "ok" and truncate_result(diverged, 20, 40)["score"] == 0.3
    assert truncate_result(diverged, 30, 40)["status"] == "diverged"
    held_out = {**diverged, "steps": 20, "message": "held-out loss nan after step 20"}
    assert truncate_result(held_out, 20, 40)["status"] == "diverged"
    assert truncate_result(held_out, 10, 40) == {**held_out, "status": "ok", "score": 0.2, "steps": 10,
                                                 "curve": curve[:1], "epochs": 1, "cpu_s": 0.0, "duration_s": 0.0,
                                                 "message": ""}
    timeout = {"status": "timeout", "score": 0.3, "steps": 20, "curve": curve, "message": "cap", "cpu_s": 8.0}
    assert truncate_result(timeout, 10, 40)["status"] == "ok" and truncate_result(timeout, 10, 40)["cpu_s"] == 4.0
    assert truncate_result(timeout, 30, 40)["status"] == "timeout"


# ------------------------------------------------------------------------------------ the design
def test_budgets_from_the_command_line():
    budget = parse_budget("b3k=small,max_steps=3000,learning_rate=5,space.init_scale=0.7|1.4,patience=4")
    assert budget.profile == "small" and budget.budget == {"max_steps": 3000, "patience": 4}
    assert budget.hparams == {"learning_rate": 5} and budget.space == {"init_scale": [0.7, 1.4]}
    assert parse_budget("small").profile == "small"
    for text, words in (("b=small,max_stepz=3", "unknown key 'max_stepz'"), ("b=small,max_steps=-1", "max_steps"),
                        ("b=small,learning_rate", "expected KEY=VALUE"), ("1b=small", "name")):
        with pytest.raises(ConfigError, match=words):
            parse_budget(text)


def test_study_config_rejects_bad_designs():
    budgets = [{"name": "small"}]
    with pytest.raises(ConfigError, match="unknown key seedz"):
        StudyConfig.from_dict({"task": "memorize", "budgets": budgets, "seedz": 3})
    with pytest.raises(ConfigError, match="used twice"):
        StudyConfig.from_dict({"task": "memorize", "budgets": budgets * 2})
    with pytest.raises(ConfigError, match="not a reference cell"):
        StudyConfig.from_dict({"task": "memorize", "budgets": budgets, "zoo_cells": ["gru", "nope"]})
    with pytest.raises(ConfigError, match="reference_budget"):
        StudyConfig.from_dict({"task": "memorize", "budgets": budgets, "reference_budget": "big"})


def test_mutated_cells_are_reproducible_and_distinct():
    config = StudyConfig.from_dict({"task": "memorize", "budgets": [{"name": "small"}], "mutated_cells": 8, "seed": 5})
    cells = study_cells(config)
    # by default the paper's 11 cells (a study made before Greff's family joined the zoo resumes with the same cells)
    assert [c.name for c in cells if c.origin == "zoo"] == list(zoo.PAPER_CELLS)
    assert len(cells) == len(zoo.PAPER_CELLS) + 8
    assert len({c.hash for c in cells}) == len(cells)
    assert [c.hash for c in cells] == [c.hash for c in study_cells(config)]
    assert [c.hash for c in cells] != [c.hash for c in study_cells(config.with_overrides(seed=6))]
    assert all(c.parent in ("gru", "lstm") and c.mutations for c in cells if c.origin == "mutated")


def test_budgets_that_stop_at_whole_epochs_share_a_run():
    config = StudyConfig.from_dict({"task": "memorize", "zoo_cells": ["gru"], "mutated_cells": 0, "budgets": [
        {"name": "small"}, {"name": "a", "budget": {"steps_per_epoch": 10, "max_epochs": 2}},
        {"name": "b", "budget": {"steps_per_epoch": 10, "max_epochs": 5}},
        {"name": "c", "budget": {"steps_per_epoch": 10, "max_epochs": 5, "max_steps": 25}},  # mid-epoch: alone
        {"name": "d", "budget": {"steps_per_epoch": 10, "max_epochs": 2}, "hparams": {"learning_rate": 2}}]})
    plan = plan_study(config, get_task("memorize"))
    assert {g.name: g.members for g in plan.groups} == {"small": ("small",), "b": ("a", "b"), "c": ("c",), "d": ("d",)}
    assert plan.reference_budget == "small"  # 10 epochs x 80 steps is the longest


# ------------------------------------------------------------------------------------ end to end
TINY = ["--task", "memorize", "--cells", "gru,tanh_rnn,lstm_b,lstm_f", "--mutated", "2", "--seeds", "2",
        "--budget", "b6=smoke,steps_per_epoch=3,max_epochs=2", "--budget", "b12=smoke,steps_per_epoch=3,max_epochs=4",
        "--no-progress"]


@pytest.mark.slow
def test_cli_in_process_writes_the_tables_and_resumes(tmp_path):
    out = tmp_path / "study"
    first = cellsearch("calibrate", *TINY, "--out", str(out), "--in-process")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Kendall" in first.stdout and "6 unit(s) trained now, 0 before" in first.stdout
    for name in ("runs.csv", "cells.csv", "budgets.csv", "orderings.csv", "summary.txt", "score_vs_budget.png"):
        assert (out / name).is_file(), name
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 * 2 * 2  # cells x budgets x seeds
    assert set(runs.budget) == {"b6", "b12"} and (runs[runs.budget == "b6"].steps <= 6).all()
    budgets = pd.read_csv(out / "budgets.csv").set_index("budget")
    assert budgets.loc["b12", "tau"] == pytest.approx(1.0) and {"tau_low", "rho", "cpu_s_per_evaluation_median",
                                                                "filter_pass_rate"} <= set(budgets.columns)
    cells = pd.read_csv(out / "cells.csv")
    assert {"mean", "ci_low", "ci_high", "std", "divergence_rate", "cpu_s_per_evaluation"} <= set(cells.columns)
    assert (cells.ci_low <= cells["mean"] + 1e-12).all() and (cells["mean"] <= cells.ci_high + 1e-12).all()
    again = cellsearch("calibrate", "--resume", str(out), "--in-process")
    assert again.returncode == 0 and "0 unit(s) trained now, 6 before" in again.stdout
    other = cellsearch("calibrate", *TINY[:-1], "--seeds", "3", "--out", str(out), "--in-process")
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "another design (differs in seeds)" in other.stderr


@pytest.mark.parametrize("args, words", [
    (["--task", "memorize", "--budget", "b=smoke,max_stepz=1"], "unknown key 'max_stepz'"),
    (["--task", "nope", "--budget", "smoke"], "nope"),
    (["--task", "memorize", "--budget", "smoke", "--cells", "gru,elman"], "'elman' is not a reference cell"),
    (["--task", "memorize", "--budget", "smoke", "--seeds", "0"], "seeds"),
    (["--task", "memorize", "--budget", "smoke", "--workers", "0"], "--workers must be at least 1"),
    (["--task", "memorize", "--budget", "smoke", "--address", "127.0.0.1:1"], "cannot attach to the Ray cluster"),
    (["--task", "memorize", "--budget", "smoke", "--device", "banana"], "banana"),
])
@pytest.mark.slow
def test_cli_rejects_bad_input_in_one_line(tmp_path, args, words):
    result = cellsearch("calibrate", *args, "--out", str(tmp_path / "s"), "--mutated", "0")
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()  # checked before anything is written


@pytest.mark.slow
def test_cli_refuses_resume_of_a_missing_study(tmp_path):
    result = cellsearch("calibrate", "--resume", str(tmp_path))
    assert result.returncode == 2 and "holds no fidelity study" in result.stderr


def _recorded(out: Path) -> list[tuple]:
    if not (out / "study.db").is_file():
        return []
    with sqlite3.connect(out / "study.db") as connection:
        try:
            return connection.execute("select run_group, cell_hash, setting_index, seed_index, score from evaluations"
                                      ).fetchall()
        except sqlite3.OperationalError:
            return []


@pytest.mark.slow
def test_kill_9_then_resume_loses_and_repeats_nothing(tmp_path):
    out = tmp_path / "study"
    args = ["calibrate", "--task", "memorize", "--cells", "gru,tanh_rnn,lstm_b,lstm_f,mut1,mut2", "--mutated", "2",
            "--seeds", "2", "--budget", "b=smoke,steps_per_epoch=20,max_epochs=4", "--out", str(out), "--in-process",
            "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "cellsearch.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(_recorded(out)) < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _recorded(out)
    assert 4 <= len(before) < 16, "the kill should land mid-study"
    resumed = cellsearch(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _recorded(out)
    keys = [row[:4] for row in after]
    assert len(after) == 16 and len(set(keys)) == 16  # every member once
    assert set(before) <= set(after)  # nothing recorded before the kill was lost or changed
    assert f"{(16 - len(before)) // 2} unit(s) trained now, {len(before) // 2} before" in resumed.stdout
    # the same numbers as a study that was never interrupted (training is deterministic on CPU)
    clean = cellsearch(*args[:-4], "--out", str(tmp_path / "clean"), "--in-process", "--no-progress")
    assert clean.returncode == 0
    assert sorted(_recorded(tmp_path / "clean")) == sorted(after)


@pytest.mark.slow
def test_cli_on_a_ray_cluster_through_address(tmp_path, ray_address):
    out = tmp_path / "study"
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    result = cellsearch("calibrate", *TINY, "--out", str(out), "--address", ray_address, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 24 and (runs.status != "error").all()
    # the numbers do not depend on where a unit ran
    local = cellsearch("calibrate", *TINY, "--out", str(tmp_path / "here"), "--in-process")
    assert local.returncode == 0
    there = runs.sort_values(["budget", "cell", "seed_index"]).score.to_numpy()
    here = pd.read_csv(tmp_path / "here" / "runs.csv").sort_values(["budget", "cell", "seed_index"]).score.to_numpy()
    assert np.allclose(there, here)


def test_the_readme_budgets_parse():
    import re

    readme = (REPO / "README.md").read_text()
    specs = re.findall(r"--budget '([^']+)'", readme)
    assert len(specs) >= 2
    plan = plan_study(StudyConfig.from_dict({"task": "arithmetic", "mutated_cells": 0, "zoo_cells": ["gru"],
                                             "budgets": [parse_budget(s).to_dict() for s in ["small", *specs]]}),
                      get_task("arithmetic"))
    assert plan.budget("a1000").group == plan.budget("a4000").group == "a4000"  # one run serves the ladder


@pytest.mark.slow
def test_a_study_keeps_its_budgets_and_cells_when_the_task_file_changes(tmp_path):
    task_file = tmp_path / "memo.yaml"
    task_file.write_text((REPO / "tasks" / "memorize.yaml").read_text())
    out = tmp_path / "study"
    args = ["calibrate", "--task", str(task_file), "--cells", "gru,lstm_f", "--mutated", "1", "--seeds", "1",
            "--budget", "smoke", "--out", str(out), "--in-process", "--no-progress"]
    assert cellsearch(*args).returncode == 0
    before = pd.read_csv(out / "runs.csv")
    text = task_file.read_text().replace("budget: {max_epochs: 2, steps_per_epoch: 5, eval_tokens: 2000}",
                                         "budget: {max_epochs: 9, steps_per_epoch: 9, eval_tokens: 2000}", 1)
    assert text != task_file.read_text()
    task_file.write_text(text)
    again = cellsearch(*args)
    assert again.returncode == 0 and "keeps the budgets it began with" in again.stderr
    assert "0 unit(s) trained now, 3 before" in again.stdout
    after = pd.read_csv(out / "runs.csv")
    assert after[["cell", "steps", "score"]].equals(before[["cell", "steps", "score"]])
