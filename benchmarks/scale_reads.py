"""The results at paper scale: generate a synthetic run of a million evaluations and time its readers.

``python benchmarks/scale_reads.py generate RUN_DIR --evaluations 1000000 --cells 50000``
    writes a synthetic run through the real storage API (``cellsearch.search.run.create_run``,
    ``RunStorage.start_step``, ``add_units``, ``commit_unit``, ``mark_told``, ``finish_step``), one transaction per
    call as the driver makes them. Cells are real mutations (``cellsearch.mutation.mutate``) of the zoo's GRU and
    LSTM and of earlier children; each evaluation's status, score, hyperparameters, metrics, curve and duration are
    resampled (per task) from the committed archive ``results/small-cal/archive``. Steps follow the driver's
    stages (memorisation filter, then one ratio-gated stage per task), with re-evaluations of the GRU, a population
    of ``population_size`` aged out oldest first, and the last few steps left active with pending units. The
    generation is resumable: run it again (with the same arguments) after an interruption and it continues from
    the run's ``next_step``.

    Optuna: each (cell, task) study the driver would have created is created in Optuna's own tables, in bulk
    (rows of Optuna's ``studies`` / ``study_directions`` models through SQLAlchemy, after ``RDBStorage`` made the
    schema); the studies of the active steps' cells are created through Optuna's API (``create_study`` / ``ask``),
    and their RUNNING trials are the ones the pending units name. Then every evaluation gets its finished trial, in
    bulk through Optuna's models, as the driver's tell leaves it: COMPLETE with the score (FAIL for a failed
    setting, PRUNED for a partial one), the parameters as ``study.ask(space.distributions())`` stores them, the
    learning curve as intermediate values, and the ``status`` (and ``perplexity``) attributes. Read back through
    Optuna's API in ``tests/test_scale_reads.py``.

``python benchmarks/scale_reads.py measure RUN_DIR --csv results/scale/reads.csv --label before``
    times each reader in a fresh subprocess: wall time, CPU time (user + sys) and peak RSS (``wait4``).

``main(argv)`` is what ``benchmarks/scale.py reads`` calls.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "results" / "small-cal" / "archive"
FILTER_PASS = 0.4        # share of candidates that pass the memorisation filter
TASK_PASS = 0.7          # share of those that pass each task's early stop
REEVALUATE = 0.05        # share of steps that re-evaluate the reference cell
ACTIVE_AT_END = 3        # steps left active (pending units) at the end


def _config(settings_per_task: int, settings_per_unit: int, storage: str | None = None):
    """The archive's config, at the synthetic run's settings counts."""
    import yaml

    from cellsearch.config import from_mapping
    from cellsearch.search.config import SearchConfig

    raw = yaml.safe_load((ARCHIVE / "config.yaml").read_text())
    raw.update(storage=storage, settings_per_task=settings_per_task, settings_per_unit=settings_per_unit,
               memorize_settings=2, max_steps=None, max_wall_clock_s=None,
               ptb_dir=os.environ.get("CELLSEARCH_PTB_DIR", raw.get("ptb_dir")))
    return from_mapping(SearchConfig, raw)


def _archive_rows() -> dict[str, list[dict[str, Any]]]:
    connection = sqlite3.connect(f"file:{ARCHIVE / 'run.db'}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in connection.execute("SELECT task, params_json, score, status, duration_s, train_steps, epochs, "
                                  "metrics_json, curve_json, node_id, worker_pid, hostname FROM cs_evaluations"):
        rows.setdefault(row["task"], []).append(dict(row))
    connection.close()
    return rows


class _Generator:
    def __init__(self, run_dir: Path, evaluations: int, cells: int, seed: int, log, storage: str | None = None):
        self.storage_url = storage
        self.run_dir, self.target_evaluations, self.target_cells, self.seed = run_dir, evaluations, cells, seed
        self.log = log
        # per cell: 2 filter settings, then settings_per_task per task while it passes
        passed = FILTER_PASS * sum(TASK_PASS ** k for k in range(3))
        per_cell = max(1.0, (evaluations / cells - 2 * 1.0) / passed)
        self.settings_per_unit = 5
        self.settings_per_task = max(1, int(round(per_cell)))
        self.archive = _archive_rows()
        self.memorize_pass = [r for r in self.archive["memorize"] if r["score"] >= 0.95]
        self.memorize_fail = [r for r in self.archive["memorize"] if r["score"] < 0.95]
        self.trials: dict[tuple[str, str], int] = {}

    # -- the run ----------------------------------------------------------------------------------------------

    def open(self):
        from cellsearch.search.run import create_run, open_run

        if (self.run_dir / "run.json").exists():
            self.config, self.storage = open_run(self.run_dir, log=self.log)
        else:
            self.config, self.storage = create_run(
                _config(self.settings_per_task, self.settings_per_unit, self.storage_url), self.run_dir, log=self.log)
        self.settings_per_task = self.config.settings_per_task
        self.settings_per_unit = self.config.settings_per_unit

    def _optuna_schema(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from cellsearch.search.storage import engine_options

        return optuna.storages.RDBStorage(self.storage.url, engine_kwargs=engine_options(self.storage.url))

    def _row(self, task: str, trial: int, rng, source: dict[str, Any] | None = None) -> dict[str, Any]:
        source = source or self.archive[task][rng.integers(len(self.archive[task]))]
        hparams = json.loads(source["params_json"])
        return {"trial_number": trial, "params_json": json.dumps(hparams), "seed": int(rng.integers(2 ** 62)),
                "score": float(source["score"]), "status": source["status"], "duration_s": source["duration_s"],
                "train_steps": source["train_steps"], "epochs": source["epochs"],
                "metrics_json": source["metrics_json"], "curve_json": source["curve_json"],
                "node_id": source["node_id"], "worker_pid": source["worker_pid"], "hostname": source["hostname"]}

    def _trials(self, cell: str, task: str, count: int) -> list[int]:
        first = self.trials.get((cell, task), 0)
        self.trials[(cell, task)] = first + count
        return list(range(first, first + count))

    def _stage(self, step: int, stage: int, cell: str, task: str, count: int, rng, pending: bool = False,
               sources: list[dict[str, Any]] | None = None) -> float:
        """Plan one stage's units (add_units), then commit each (commit_unit, mark_told); the best score."""
        trials = self._trials(cell, task, count)
        rows = [self._row(task, trial, rng, sources[rng.integers(len(sources))] if sources else None)
                for trial in trials]
        groups = [rows[i:i + self.settings_per_unit] for i in range(0, len(rows), self.settings_per_unit)]
        units = [{"step": step, "stage": stage, "cell_hash": cell, "task": task, "slot": slot,
                  "settings_json": json.dumps([{"trial_number": r["trial_number"], "hparams": json.loads(
                      r["params_json"]), "seed": r["seed"]} for r in group])} for slot, group in enumerate(groups)]
        ids = self.storage.add_units(units)
        if pending:
            return float("nan")
        for unit_id, group in zip(ids, groups):
            self.storage.commit_unit(unit_id, step, cell, task, group)
            self.storage.mark_told(unit_id)
        return max((r["score"] for r in rows if r["status"] == "ok"), default=0.0)

    def _bulk_studies(self, cells: list[tuple[str, str | None]], tasks: list[str]) -> int:
        """Optuna studies for ``cells`` (hash, initial name) x ``tasks``, in bulk through Optuna's models."""
        import sqlalchemy as sa
        from optuna.storages._rdb import models

        from cellsearch.search.driver import study_name

        optuna_storage = self._optuna_schema()
        engine = optuna_storage.engine
        with engine.begin() as connection:
            existing = set(connection.execute(sa.select(models.StudyModel.study_name)).scalars())
            names = [study_name(cell, task, name) for cell, name in cells for task in tasks]
            names = [name for name in names if name not in existing]
            for start in range(0, len(names), 20000):
                chunk = names[start:start + 20000]
                connection.execute(models.StudyModel.__table__.insert(), [{"study_name": n} for n in chunk])
                ids = dict(connection.execute(sa.select(models.StudyModel.study_name, models.StudyModel.study_id)
                                              .where(models.StudyModel.study_name.in_(chunk))).all())
                connection.execute(models.StudyDirectionModel.__table__.insert(), [
                    {"study_id": ids[n], "direction": models.StudyDirection.MAXIMIZE, "objective": 0}
                    for n in chunk])
        optuna_storage.engine.dispose()
        return len(names)

    def search_spaces(self, tasks: list[str]) -> dict[str, Any]:
        """Each task's hyperparameter distributions. PTB's needs its data directory: the run's, as the driver's
        task loader passes it (never the process-wide default, which ``get_task`` would cache)."""
        from cellsearch.tasks import get_task

        return {task: get_task(task, data_dir=self.config.ptb_dir if task == "ptb" else None)
                .space_for(self.config.budget_profile).distributions() for task in tasks}

    def _bulk_trials(self, tasks: list[str]) -> int:
        """The finished Optuna trials a real run holds, one per evaluation, in bulk through Optuna's models: the
        trial (COMPLETE with the score as its value, FAIL for a failed setting, PRUNED for a partial one), its
        parameters (the task's space, as ``study.ask(space.distributions())`` stores them), its intermediate values
        (the learning curve, as the driver's tell reports it) and its ``status`` (and ``perplexity``) attribute.
        Resumable: the evaluations are read in id order in batches, and the last id written is kept in a table of
        this benchmark's own (``scale_reads_progress``), committed with each batch."""
        import datetime
        import math

        import sqlalchemy as sa
        from optuna.distributions import distribution_to_json
        from optuna.storages._rdb import models
        from optuna.trial import TrialState

        from cellsearch.search.driver import _FAILED, study_name
        from cellsearch.scoring import PARTIAL_STATUSES
        from cellsearch.search.storage import EVALUATIONS

        spaces = self.search_spaces(tasks)
        distribution_json = {task: {name: distribution_to_json(d) for name, d in spaces[task].items()}
                             for task in tasks}
        optuna_storage = self._optuna_schema()
        engine = optuna_storage.engine
        progress = sa.Table("scale_reads_progress", sa.MetaData(), sa.Column("last_evaluation_id", sa.Integer))
        progress.create(engine, checkfirst=True)
        with engine.begin() as connection:
            studies = dict(connection.execute(
                sa.select(models.StudyModel.study_name, models.StudyModel.study_id)).all())
            names = {row["hash"]: row["name"] for row in self.storage.cells() if row["step_created"] < 2}
            last = connection.execute(sa.select(sa.func.max(progress.c.last_evaluation_id))).scalar() or 0
        base = datetime.datetime(2026, 1, 1)
        written = 0
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    sa.select(EVALUATIONS.c.id, EVALUATIONS.c.cell_hash, EVALUATIONS.c.task,
                              EVALUATIONS.c.trial_number, EVALUATIONS.c.status, EVALUATIONS.c.score,
                              EVALUATIONS.c.params_json, EVALUATIONS.c.curve_json, EVALUATIONS.c.duration_s)
                    .where(EVALUATIONS.c.id > last).order_by(EVALUATIONS.c.id).limit(20000)).all()
            if not rows:
                break
            trials, keys = [], []
            for row in rows:
                started = base + datetime.timedelta(seconds=row.id)
                state = (TrialState.FAIL if row.status in _FAILED else
                         TrialState.PRUNED if row.status in PARTIAL_STATUSES else TrialState.COMPLETE)
                study_id = studies[study_name(row.cell_hash, row.task, names.get(row.cell_hash))]
                trials.append({"number": row.trial_number, "study_id": study_id, "state": state,
                               "datetime_start": started,
                               "datetime_complete": started + datetime.timedelta(seconds=row.duration_s or 0)})
                keys.append((study_id, row.trial_number))
            with engine.begin() as connection:  # the one writer: the batch's trials get the ids after ``before``
                before = connection.execute(sa.select(sa.func.max(models.TrialModel.trial_id))).scalar() or 0
                connection.execute(models.TrialModel.__table__.insert(), trials)
                ids = {(study, number): trial_id for trial_id, study, number in connection.execute(
                    sa.select(models.TrialModel.trial_id, models.TrialModel.study_id, models.TrialModel.number)
                    .where(models.TrialModel.trial_id > before))}
                params, values, intermediate, attributes = [], [], [], []
                for row, key, trial in zip(rows, keys, trials):
                    trial_id = ids[key]
                    setting = json.loads(row.params_json)
                    for name, distribution in spaces[row.task].items():
                        params.append({"trial_id": trial_id, "param_name": name,
                                       "param_value": distribution.to_internal_repr(setting[name]),
                                       "distribution_json": distribution_json[row.task][name]})
                    if trial["state"] == TrialState.COMPLETE:
                        values.append({"trial_id": trial_id, "objective": 0, "value": row.score,
                                       "value_type": models.TrialValueModel.TrialValueType.FINITE})
                    for point in json.loads(row.curve_json or "[]"):
                        value = float(point.get("score", math.nan))
                        if math.isfinite(value):
                            intermediate.append({
                                "trial_id": trial_id, "step": int(point["step"]), "intermediate_value": value,
                                "intermediate_value_type":
                                    models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE})
                    attributes.append({"trial_id": trial_id, "key": "status", "value_json": json.dumps(row.status)})
                    if row.task == "ptb" and row.score > 0:
                        attributes.append({"trial_id": trial_id, "key": "perplexity",
                                           "value_json": json.dumps(1.0 / row.score)})
                for model, batch in ((models.TrialParamModel, params), (models.TrialValueModel, values),
                                     (models.TrialIntermediateValueModel, intermediate),
                                     (models.TrialUserAttributeModel, attributes)):
                    if batch:
                        connection.execute(model.__table__.insert(), batch)
                last = rows[-1].id
                connection.execute(progress.delete())
                connection.execute(progress.insert(), {"last_evaluation_id": last})
            written += len(rows)
            self.log(f"trials: {written} written (evaluation id {last})")
        engine.dispose()
        return written

def _generate(gen: _Generator) -> dict[str, Any]:
    import optuna

    from cellsearch import zoo
    from cellsearch.mutation import mutate
    from cellsearch.search.driver import study_name
    from cellsearch.search.storage import PARAMETER_WIDTH

    gen.open()
    storage, config = gen.storage, gen.config
    gen.search_spaces(list(config.all_tasks))  # the trials, written last, need them: fail now, not after the cells
    tasks = list(config.tasks)
    reference = zoo.get(config.reference_cell)

    def cell_row(spec, step, name=None, parent=None, mutation=None):
        return {"hash": spec.hash, "name": name or spec.name, "spec_json": spec.to_json(), "parent_hash": parent,
                "mutation_json": json.dumps(mutation, default=str) if mutation is not None else None,
                "step_created": step, "node_count": len(spec.nodes),
                "params_per_width": spec.parameter_count(PARAMETER_WIDTH) / PARAMETER_WIDTH ** 2,
                "status": "evaluating", "rejected_by": None, "duplicate_of": None}

    # resume: what the database already holds
    from cellsearch.spec import CellSpec

    stored = storage.cells()
    specs = {row["hash"]: row["spec_json"] for row in stored}
    population = dict(sorted(storage.population_entries().items(), key=lambda item: item[1]))
    population = {h: s for h, s in population.items()
                  if any(r["hash"] == h and r["status"] == "population" for r in stored)}
    pool = [row["hash"] for row in stored[-200:] if row["rejected_by"] != "duplicate"]
    counts = storage.counts()
    evaluations = counts["evaluations"]
    with storage.engine.connect() as connection:
        import sqlalchemy as sa

        from cellsearch.search.storage import EVALUATIONS
        for cell, task, top in connection.execute(sa.select(EVALUATIONS.c.cell_hash, EVALUATIONS.c.task,
                                                            sa.func.max(EVALUATIONS.c.trial_number))
                                                  .group_by(EVALUATIONS.c.cell_hash, EVALUATIONS.c.task)):
            gen.trials[(cell, task)] = int(top) + 1
    step = storage.counter("next_step")
    started = time.monotonic()
    last_log = started
    n_cells = len(stored)
    active_left = 0
    while True:
        rng = np.random.default_rng([gen.seed, step])
        finishing = evaluations >= gen.target_evaluations or n_cells >= gen.target_cells
        if finishing:
            if active_left >= ACTIVE_AT_END:
                break
        if step < 2:  # the seed steps: GRU and LSTM on every task
            name = config.initial_cells[step]
            spec = zoo.get(name)
            storage.start_step(step, "seed", spec.hash, None, cell_row(spec, step, name=name))
            for task in tasks:
                gen._stage(step, 0, spec.hash, task, config.settings_per_task, rng)
                evaluations += config.settings_per_task
            specs[spec.hash] = spec.to_json()
            population[spec.hash] = step
            pool.append(spec.hash)
            n_cells += 1
            storage.finish_step(step, "seeded", {spec.hash: {"status": "population"}}, [(spec.hash, "enter", 1.0)])
            step += 1
            continue
        if not finishing and rng.random() < REEVALUATE:
            storage.start_step(step, "reevaluate", reference.hash, None, None)
            for task in tasks:
                gen._stage(step, 0, reference.hash, task, 2, rng)
                evaluations += 2
            storage.finish_step(step, "reevaluated", {}, [])
            step += 1
            continue
        parent = pool[int(rng.integers(max(0, len(pool) - 50), len(pool)))]
        try:
            mutation = mutate(CellSpec.from_dict(json.loads(specs[parent])), rng)
        except Exception:  # noqa: BLE001 - a failed mutation is a step too
            storage.start_step(step, "mutate", parent, parent, None, finished_outcome="mutation_failed")
            step += 1
            continue
        child = mutation.child
        if child.hash in specs:
            storage.start_step(step, "mutate", child.hash, parent, None, finished_outcome="duplicate:exact")
            step += 1
            continue
        specs[child.hash] = child.to_json()
        n_cells += 1
        storage.start_step(step, "mutate", child.hash, parent, cell_row(child, step, parent=parent,
                                                                         mutation=mutation.to_dict()))
        if finishing:  # left active: the filter's units pending, with real Optuna trials behind them
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(storage=gen._optuna_schema(), direction="maximize",
                                        study_name=study_name(child.hash, config.memorize_task),
                                        load_if_exists=True)
            for _ in range(2):
                study.ask()
            gen._stage(step, 0, child.hash, config.memorize_task, 2, rng, pending=True)
            active_left += 1
            step += 1
            continue
        passes = rng.random() < FILTER_PASS
        gen._stage(step, 0, child.hash, config.memorize_task, 2, rng,
                   sources=gen.memorize_pass if passes else gen.memorize_fail)
        evaluations += 2
        rejected_by = None if passes else config.memorize_task
        for stage, task in enumerate(tasks, start=1):
            if rejected_by is not None:
                break
            gen._stage(step, stage, child.hash, task, config.settings_per_task, rng)
            evaluations += config.settings_per_task
            if rng.random() > TASK_PASS:
                rejected_by = task
        if rejected_by is not None:
            storage.finish_step(step, f"rejected:{rejected_by}",
                                {child.hash: {"status": "rejected", "rejected_by": rejected_by}}, [])
        else:
            score = float(rng.uniform(0.7, 1.05))
            updates = {child.hash: {"status": "population"}}
            changes = [(child.hash, "enter", score)]
            if len(population) >= config.population_size:
                oldest = min(population, key=population.get)
                del population[oldest]
                updates[oldest] = {"status": "evaluated"}
                changes.append((oldest, "leave", None))
            population[child.hash] = step
            storage.finish_step(step, "admitted", updates, changes)
        pool.append(child.hash)
        step += 1
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            gen.log(f"step {step}: {n_cells} cells, {evaluations} evaluations, "
                    f"{time.monotonic() - started:.0f} s")
    storage.close()
    # the Optuna studies the driver would have made, in bulk (see the module docstring)
    gen.open()
    cells = [(row["hash"], row["name"] if row["step_created"] < 2 else None) for row in gen.storage.cells()
             if row["rejected_by"] != "duplicate"]
    studies = gen._bulk_studies(cells, [config.memorize_task, *tasks])
    trials = gen._bulk_trials([config.memorize_task, *tasks])
    final = gen.storage.counts()
    gen.storage.close()
    return {"cells": n_cells, "evaluations": final["evaluations"], "steps": step, "studies_added": studies,
            "trials_added": trials, "seconds": time.monotonic() - started}


def generate(run_dir: str | Path, evaluations: int, cells: int, seed: int = 0, log=None,
             storage: str | None = None) -> dict[str, Any]:
    """Generate (or continue generating) the synthetic run in ``run_dir`` (its database: ``storage``, a
    SQLAlchemy URL, or ``run_dir/run.db``); see the module docstring."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    return _generate(_Generator(Path(run_dir), evaluations, cells, seed, log, storage))


# -- measuring -------------------------------------------------------------------------------------------------

_REBUILD = """
import dataclasses, sys, time
from cellsearch.search.run import open_run
from cellsearch.search.driver import SearchDriver
from cellsearch.tasks import get_task
config, storage = open_run(sys.argv[1], log=lambda m: None)
if sys.argv[2:] == ["promotion"]:  # as if the run's config had promotion on (a run's stored config cannot change)
    config = dataclasses.replace(config, promotion=dataclasses.replace(config.promotion, enabled=True))
started = time.monotonic()
driver = SearchDriver(config, storage, executor=None, load_task=lambda name: get_task(name))
driver._rebuild()
cells = driver.cell_count if hasattr(driver, "cell_count") else len(driver._specs)  # the code before the change too
print(f"rebuilt: {cells} cells, {len(driver._best)} best scores held, {len(driver._active)} active steps, "
      f"{driver.progress.evaluations} evaluations in {time.monotonic() - started:.1f} s")
storage.close()
"""


_OPEN = """
import sys
from cellsearch.search.run import read_run_info
from cellsearch.search.storage import RunStorage, connect_url
RunStorage(connect_url(read_run_info(sys.argv[1])["storage"])).close()
"""

#: Measurements taken only when named (``--only``).
OPTIONAL = ("open for writing", "resume rebuild, promotion on")


def _measure_one(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    limit = float(os.environ.get("SCALE_READS_TIMEOUT_S", "0")) or None
    timer = None
    if limit:
        import threading

        timer = threading.Timer(limit, process.kill)  # rc -9: it ran past SCALE_READS_TIMEOUT_S
        timer.start()
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if timer is not None:
        timer.cancel()
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "rc": process.returncode,
            "output_tail": output.decode(errors="replace")[-300:].replace("\n", " | ")}


def measurements(run_dir: Path, scratch: Path, cell_hash: str) -> dict[str, list[str]]:
    python = sys.executable
    cli = str(Path(sys.executable).with_name("cellsearch"))  # the entry point, next to this interpreter
    load = "from cellsearch.results import load_run; r = load_run({!r}); t = r.{}(); print(len(t))"
    return {
        "load_run.cells": [python, "-c", load.format(str(run_dir), "cells")],
        "load_run.evaluations": [python, "-c", load.format(str(run_dir), "evaluations")],
        "cellsearch top": [cli, "top", str(run_dir)],
        "cellsearch show": [cli, "show", str(run_dir), cell_hash[:12]],
        "cellsearch export": [cli, "export", str(run_dir), str(scratch / "export"),
                              "--force"],
        "cellsearch report": [cli, "report", str(run_dir), "--out", str(scratch / "report"),
                              "--force", "--no-progress"],
        "resume rebuild": [python, "-c", _REBUILD, str(run_dir)],
        # only with --only: the one-time creation of missing indexes when an older run is first opened for writing
        "open for writing": [python, "-c", _OPEN, str(run_dir)],
        # only with --only: the rebuild with promotion on (it reads the cells' promotion-rung scores too)
        "resume rebuild, promotion on": [python, "-c", _REBUILD, str(run_dir), "promotion"],
    }


def _shown(command: list[str]) -> list[str]:
    """The command as recorded: an embedded script by its name in this file, not its text."""
    scripts = {_REBUILD: "_REBUILD", _OPEN: "_OPEN"}
    if len(command) > 2 and command[2] in scripts:
        return [command[0], f"benchmarks/scale_reads.py({scripts[command[2]]})", *command[3:]]
    return command


def _best_cell(run_dir: Path) -> str:
    from cellsearch.results import load_run

    connection = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True) \
        if (run_dir / "run.db").is_file() else None
    if connection is not None:
        row = connection.execute("SELECT hash FROM cs_cells WHERE status = 'population' ORDER BY step_created DESC "
                                 "LIMIT 1").fetchone()
        connection.close()
        return row[0]
    run = load_run(run_dir)
    try:
        return run.resolve_hash(run.cells()["cell_hash"].iloc[0])
    finally:
        run.close()


def measure(run_dir: str | Path, csv_path: str | Path | None, label: str, only: list[str] | None = None,
            backend: str = "sqlite") -> list[dict[str, Any]]:
    run_dir = Path(run_dir).resolve()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"scale_reads_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # SCALE_READS_CODE: the directory whose cellsearch package is measured (a copy of the code before a change);
    # the subprocesses run in a scratch directory, so that the working tree's package does not shadow it
    code = os.environ.get("SCALE_READS_CODE", str(ROOT))
    env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    cell = _best_cell(run_dir)
    counts = _database_counts(run_dir)
    rows = []
    for name, command in measurements(run_dir, scratch, cell).items():
        if (only and name not in only) or (not only and name in OPTIONAL):
            continue
        result = _measure_one(command, env, scratch)
        row = {"label": label, "backend": backend, "measurement": name, **result, "code": code,
               "cells": counts.get("cs_cells"),
               "evaluations": counts.get("cs_evaluations"), "host": platform.node(), "cpus": os.cpu_count(),
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": " ".join(_shown(command))}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if csv_path is not None:
            path = Path(csv_path)
            new = not path.exists()
            with path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _database_counts(run_dir: Path) -> dict[str, int]:
    import sqlalchemy as sa

    from cellsearch.results import load_run

    run = load_run(run_dir)
    try:
        with run.engine.connect() as connection:
            return {table: int(connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
                    for table in ("cs_cells", "cs_evaluations")}
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate (or continue) a synthetic run")
    g.add_argument("run_dir")
    g.add_argument("--evaluations", type=int, default=1_000_000)
    g.add_argument("--cells", type=int, default=50_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--storage", help="database URL (default RUN_DIR/run.db); a password comes from "
                   "$CELLSEARCH_STORAGE_URL or PGPASSWORD, as for cellsearch itself")
    m = sub.add_parser("measure", help="time the readers, one fresh subprocess each")
    m.add_argument("run_dir")
    m.add_argument("--csv")
    m.add_argument("--label", default="")
    m.add_argument("--backend", default="sqlite")
    m.add_argument("--only", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "generate":
        print(json.dumps(generate(args.run_dir, args.evaluations, args.cells, args.seed, storage=args.storage)))
    else:
        measure(args.run_dir, args.csv, args.label, args.only, args.backend)
    return 0


if __name__ == "__main__":
    from cellsearch.errors import UserError

    try:
        sys.exit(main())
    except UserError as error:  # e.g. no PTB data for the PTB search space: the message says what to do
        sys.exit(f"scale_reads: {error}")
