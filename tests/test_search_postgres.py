"""The smoke search with its database on a real PostgreSQL server (``.ci/postgres.sh`` starts one).

Set ``CELLSEARCH_TEST_POSTGRES_URL`` to a URL whose role may create databases, e.g.
``export CELLSEARCH_TEST_POSTGRES_URL="$(.ci/postgres.sh)"``; each test run gets a fresh database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from cellsearch.results import load_run
from searchchecks import fresh_postgres_database, needs_postgres, readable_study_name
from cellsearch.search.storage import redact_url

REPO = Path(__file__).resolve().parents[1]
pytestmark = [needs_postgres, pytest.mark.slow]


@pytest.fixture
def database():
    """A fresh database on the server, dropped afterwards."""
    with fresh_postgres_database("cellsearch_test") as url:
        yield url


def test_smoke_search_on_postgres(tmp_path, database, ray_address, ptb_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "CELLSEARCH_PTB_DIR": str(ptb_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "cellsearch.cli", "search", "search_configs/smoke.yaml", "--run-dir", str(run_dir),
         "--storage", database, "--max-steps", "2", "--address", ray_address, "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The URL is stored without its password (the test server trusts local connections).
    assert json.loads((run_dir / "run.json").read_text())["storage"] == redact_url(database)
    assert not (run_dir / "run.db").exists()
    results = load_run(run_dir)
    try:
        cells, evaluations, steps = results.cells(), results.evaluations(), results.steps()
    finally:
        results.close()
    assert (steps["status"] == "done").all() and (steps["kind"] != "seed").sum() == 2
    assert set(evaluations["task"]) >= {"arithmetic", "xml", "ptb"}
    assert cells.loc[cells["name"] == "gru", "score"].item() == pytest.approx(1.0)
    # The Optuna studies live in the same PostgreSQL database (what optuna-dashboard would browse).
    studies = optuna.get_all_study_summaries(optuna.storages.RDBStorage(database))
    pairs = evaluations[["cell_hash", "task"]].drop_duplicates().itertuples(index=False)
    assert {s.study_name for s in studies} == {readable_study_name(run_dir, c, t) for c, t in pairs}
    # Both spellings of the URL work for Optuna's own tools (optuna-dashboard takes the URL a user typed): the
    # plain postgresql:// one goes through psycopg 3, which the `postgres` extra installs beside psycopg2.
    plain = sqlalchemy.engine.make_url(database).set(drivername="postgresql").render_as_string(hide_password=False)
    assert set(optuna.get_all_study_names(storage=plain)) == {s.study_name for s in studies}
    # PTB trials carry the perplexity people read (the objective stays 1/perplexity, named so).
    ptb = optuna.load_study(study_name="gru/ptb", storage=plain)
    assert ptb.metric_names == ["1/perplexity (held-out)"]
    complete = [t for t in ptb.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs["perplexity"] == pytest.approx(1 / t.value) for t in complete)
    top = subprocess.run([sys.executable, "-m", "cellsearch.cli", "top", str(run_dir), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and json.loads(top.stdout)[0]["name"] in ("gru", "lstm", None)
