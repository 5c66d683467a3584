"""Progress of the long commands (retrain, calibrate, report): a bar on stderr, or one log line per event."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cellsearch.cli import main
from cellsearch.commands import _progress
from cellsearch.commands._progress import CommandProgress
from cellsearch.retrain import load_retrain, summary_markdown
from searchchecks import serial_search

# whole commands (retrain, calibrate, report) run in process: in the slow tier with the other CLI tests
pytestmark = pytest.mark.slow

#: The retrain of tests/test_retrain.py: the gru and the lstm_b baseline, two seeds each (four tiny runs).
RETRAIN = ["retrain", "gru", "--task", "memorize", "--preset", "tiny", "--seeds", "2", "--baselines", "lstm_b",
           "--in-process"]
#: A smaller study than tests/test_calibration.py's: two cells, one budget, one seed (two units).
CALIBRATE = ["calibrate", "--task", "memorize", "--cells", "gru,tanh_rnn", "--mutated", "0", "--seeds", "1",
             "--budget", "b6=smoke,steps_per_epoch=3,max_epochs=2", "--in-process"]


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture
def terminal(monkeypatch):
    """stderr counts as a terminal: the bar is drawn (capsys, like a pipe, is not one)."""
    monkeypatch.setattr(_progress, "_interactive", lambda: True)


def test_log_lines_one_per_event_and_none_before_the_start(capsys, terminal):
    with CommandProgress("retrain", "runs", enabled=False) as progress:
        progress.start(3, 1, "1 finished before")
        progress.advance(2, "gru seed 1: ok")
        progress.write("a line of its own")
        progress.advance(note="lstm_b seed 0: ok")
    assert capsys.readouterr().err.splitlines() == [
        "retrain: 1/3 runs done (1 finished before)", "retrain: 2/3 runs done (gru seed 1: ok)", "a line of its own",
        "retrain: 3/3 runs done (lstm_b seed 0: ok)"]
    with CommandProgress("retrain", "runs", enabled=False) as progress:
        progress.start(3)  # nothing finished yet: nothing to say, a refused run stays one error line
    assert capsys.readouterr().err == ""


def test_no_bar_where_stderr_is_not_a_terminal(capsys):
    with CommandProgress("retrain", "runs") as progress:
        progress.start(2)
        progress.advance(note="gru seed 0: ok")
    assert capsys.readouterr().err == "retrain: 1/2 runs done (gru seed 0: ok)\n"


def test_the_bar_counts_and_is_erased_when_stopped_while_planning(capsys, terminal):
    with CommandProgress("report", "steps") as progress:
        progress.start(4, 1)
        progress.advance(note="ratios")
        progress.write("above the bar")
    err = capsys.readouterr().err
    assert "report: planning" in err and "above the bar\n" in err
    assert "1/4" in err and "2/4 [" in err and "step/s" in err and err.endswith("\n")
    with CommandProgress("report", "steps"):
        pass
    err = capsys.readouterr().err
    assert "report: planning" in err and not err.endswith("\n")  # the bar erased itself: no line is left


def _retrain_stdout(out: Path) -> str:
    return f"{summary_markdown(load_retrain(out))}\nresults, curves (CSV, PNG), summary (CSV, markdown) and " \
           f"checkpoints in {out.resolve()}\n"


def test_retrain_logs_each_run_and_shows_a_bar(tmp_path, capsys, monkeypatch):
    out = tmp_path / "quiet"
    assert main([*RETRAIN, "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out == _retrain_stdout(out)  # the table is as before
    logged = lines(captured.err, "retrain: ")
    assert [re.match(r"retrain: (\d)/4 runs done \((\w+) seed", line).groups() for line in logged] == [
        ("1", "gru"), ("2", "gru"), ("3", "lstm_b"), ("4", "lstm_b")], captured.err
    assert all("valid_accuracy" in line for line in logged)

    # Again: every run finished before, one line each, and the count.
    assert main([*RETRAIN, "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out == _retrain_stdout(out)
    assert len(lines(captured.err, "retrain: finished before: ")) == 4
    assert lines(captured.err, "retrain: 4/4") == ["retrain: 4/4 runs done (4 finished before)"]

    out = tmp_path / "bar"
    monkeypatch.setattr(_progress, "_interactive", lambda: True)
    assert main([*RETRAIN, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == _retrain_stdout(out)
    assert "retrain: planning" in captured.err and "0/4 [" in captured.err and "4/4 [" in captured.err
    # each run also as a line of its own above the bar
    assert "run/s" in captured.err and len(re.findall(r"\[\d/4\] \w+ seed \d: ok", captured.err)) == 4


def test_calibrate_logs_each_unit_and_shows_a_bar(tmp_path, capsys, monkeypatch):
    out = tmp_path / "quiet"
    assert main([*CALIBRATE, "--out", str(out), "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert "Kendall" in quiet.out and "2 unit(s) trained now, 0 before" in quiet.out
    assert lines(quiet.err, "calibrate: ") == ["calibrate: 1/2 units done (b6/gru: 1 ok)",
                                               "calibrate: 2/2 units done (b6/tanh_rnn: 1 ok)"]

    assert main([*CALIBRATE, "--out", str(out), "--no-progress"]) == 0  # resumed: nothing left to train
    again = capsys.readouterr()
    assert lines(again.err, "calibrate: ") == ["calibrate: 2/2 units done (2 done before)"]

    loud = tmp_path / "bar"
    monkeypatch.setattr(_progress, "_interactive", lambda: True)
    assert main([*CALIBRATE, "--out", str(loud)]) == 0
    captured = capsys.readouterr()
    # the tables do not depend on the progress shown (the cpu-s column is a timing: masked)
    cpu_seconds = re.compile(r"(?m)^(\S+\s+\d+\s+)\d+\.\d+")
    assert cpu_seconds.sub(r"\1-", captured.out) == cpu_seconds.sub(r"\1-", quiet.out.replace(str(out), str(loud)))
    assert "calibrate: planning" in captured.err and "0/2 [" in captured.err and "2/2 [" in captured.err


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    """A two-step serial search on smoke budgets (see tests/test_report.py)."""
    return serial_search(tmp_path_factory.mktemp("search") / "run", {
        "tasks": ["arithmetic"], "budget_profile": "smoke", "population_size": 2, "settings_per_task": 1,
        "settings_per_unit": 1, "memorize_threshold": 0.0, "early_stop_fraction": 0.0, "seed": 11,
        "max_steps": 2})


def test_report_logs_each_step_and_shows_a_bar(search_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "quiet"
    assert main(["report", str(search_run), "--out", str(out), "--drawn", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"report written to {out / 'index.html'} (12 files)"]
    logged = lines(captured.err, "report: ")
    assert len(logged) == 8, captured.err
    notes = [re.match(rf"report: {n}/8 steps done \((.*)\)$", line).group(1) for n, line in enumerate(logged, 1)]
    assert notes[:4] == ["leaderboard", "best score curve", "ratios", "filters"]
    assert notes[4].startswith("cell #1 ") and notes[5].startswith("cell #2 ") and notes[6:] == ["lineage", "page"]

    out = tmp_path / "bar"
    monkeypatch.setattr(_progress, "_interactive", lambda: True)
    assert main(["report", str(search_run), "--out", str(out), "--drawn", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"report written to {out / 'index.html'} (12 files)"]
    assert "report: reading the run" in captured.err and "8/8 [" in captured.err and "step/s" in captured.err
