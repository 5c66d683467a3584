"""``cellsearch train CELL --task TASK``: train one cell with given or sampled hyperparameters.

The cell is a reference name or a cell file. Without ``--sample`` the task's
default setting for the profile is trained, changed by any ``--set KEY=VALUE``
(hyperparameters such as ``learning_rate`` and budget keys such as
``max_steps``). With ``--sample N`` that many distinct settings are drawn from
the profile's space through Optuna (random sampling, seeded by ``--seed``);
settings of the same shape (layers, width, dropout) train together as one batched
model (same results up to rounding, faster; ``--no-batch`` trains them one after
the other). A progress bar goes to stderr; the final metrics
are printed as a table, or as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

import yaml

from cellsearch.commands._common import resolve_cell
from cellsearch.errors import UserError

PROFILE_NAMES = ("smoke", "small", "medium", "paper")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one cell on one task and print its held-out score")
    parser.add_argument("cell", help="reference cell name or a .json/.yaml cell file")
    parser.add_argument("--task", required=True, help="task name (memorize, arithmetic, xml, ptb) or a task file")
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="small", help="budget profile (default small)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a hyperparameter (init_scale, learning_rate, max_grad_norm, num_layers, parameter_budget, "
        "dropout) or a budget key (max_epochs, steps_per_epoch, max_steps, max_seconds, eval_tokens, ...); repeatable",
    )
    parser.add_argument("--sample", type=int, metavar="N",
                        help="train N distinct settings sampled from the profile's space")
    parser.add_argument("--sampler", choices=("random", "tpe"), default="random",
                        help="how --sample draws (default random)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (and sampling seed) (default 0)")
    parser.add_argument("--data-dir", help="data directory for ptb (else $CELLSEARCH_PTB_DIR)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-batch", action="store_true",
                        help="with --sample: train the settings one after the other instead of batching "
                        "same-shape ones")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _parse_overrides(pairs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``KEY=VALUE`` pairs into hyperparameter and budget changes; values are read as YAML scalars."""
    from cellsearch.hparams import HyperParams
    from cellsearch.tasks.base import Budget

    hparam_keys = {f.name for f in dataclasses.fields(HyperParams)}
    budget_keys = {f.name for f in dataclasses.fields(Budget)}
    hparams: dict[str, Any] = {}
    budget: dict[str, Any] = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        key = key.strip()
        if not separator or not key:
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        if key not in hparam_keys | budget_keys:
            raise UserError(
                f"--set: unknown key {key!r}; hyperparameters: {', '.join(sorted(hparam_keys))}; "
                f"budget: {', '.join(sorted(budget_keys))}"
            )
        (hparams if key in hparam_keys else budget)[key] = _scalar(key, text)
    return hparams, budget


def _scalar(key: str, text: str) -> Any:
    """A number when the text is one (YAML alone reads '1e6' as a string), else a YAML scalar."""
    text = text.strip()
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise UserError(f"--set {key}: cannot read value {text!r}") from None


def _progress_bar(enabled: bool, description: str):
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(event: dict[str, Any]) -> None:
        if bar.total != event["total_steps"]:
            bar.total = event["total_steps"]
        if event["kind"] == "epoch":
            bar.set_postfix(epoch=event["epoch"], score=f"{event['score']:.4f}", lr=f"{event['learning_rate']:.3g}")
        else:
            # update() rather than refresh() so that tqdm throttles redrawing on fast steps.
            bar.set_postfix(loss=f"{event['loss']:.3f}", lr=f"{event['learning_rate']:.3g}", refresh=False)
            bar.update(event["step"] - bar.n)

    return bar, update


def _settings_progress_bar(enabled: bool, description: str, count: int):
    """One bar over the steps of ``count`` settings trained together (events carry a ``member`` key)."""
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
    steps: dict[int, int] = {}

    def update(event: dict[str, Any]) -> None:
        steps[event["member"]] = event["step"]
        total = count * event["total_steps"]
        if bar.total != total:
            bar.total = total
        bar.n = sum(steps.values())
        if event["kind"] == "epoch":
            bar.set_postfix(setting=event["member"] + 1, epoch=event["epoch"], score=f"{event['score']:.4f}")
            bar.refresh()

    return bar, update


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(cell: str, task: str, results: list) -> str:
    metric_keys = sorted({k for r in results for k in r.metrics})
    hparam_keys = list(results[0].hparams)
    header = ["#", "status", "score", *metric_keys, "steps", "epochs", "seconds", "hidden", "params", *hparam_keys]
    rows = []
    for index, result in enumerate(results, start=1):
        rows.append([
            str(index), result.status, _format(result.score),
            *(_format(result.metrics.get(k, "")) for k in metric_keys),
            str(result.steps), str(result.epochs), f"{result.duration_s:.1f}",
            str(result.hidden_size), f"{result.parameter_count:,}",
            *(_format(result.hparams[k]) for k in hparam_keys),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"cell {cell} on task {task}"]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)
    if len(results) > 1:
        best = max(range(len(results)), key=lambda i: results[i].score)
        lines.append(f"best: #{best + 1} with score {results[best].score:.4g}")
    for index, result in enumerate(results, start=1):
        if result.message:
            lines.append(f"#{index}: {result.message}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cellsearch.config import ConfigError
    from cellsearch.devices import check_device
    from cellsearch.hparams import make_sampler, sample_settings
    from cellsearch.tasks import get_task
    from cellsearch.training import train_and_evaluate

    check_device(args.device)
    spec = resolve_cell(args.cell)
    task = get_task(args.task, data_dir=args.data_dir)
    hparam_changes, budget_changes = _parse_overrides(args.overrides)
    budget = task.budget(args.profile)
    if budget_changes:
        budget = budget.replace(**budget_changes)
    space = task.space_for(args.profile)
    if args.sample is not None:
        if args.sample < 1:
            raise UserError("--sample must be at least 1")
        if hparam_changes:
            # Pinning a value narrows the space, so sampling still never repeats a setting.
            space = space.override({key: [value] for key, value in hparam_changes.items()})
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=make_sampler(args.sampler, args.seed))
        settings = sample_settings(study, space, args.sample)
    else:
        study = None
        settings = [(None, task.default_hparams(args.profile).replace(**hparam_changes))]
    if not settings:
        raise ConfigError("the profile's space has no settings left to sample")

    cell_name = spec.name or args.cell
    if len(settings) > 1 and not args.no_batch:
        from cellsearch.training import GroupMember, train_settings

        bar, update = _settings_progress_bar(not args.no_progress, f"{cell_name}/{task.name} {len(settings)} settings",
                                             len(settings))
        try:
            results = train_settings(spec, task, [GroupMember(hparams, args.seed) for _, hparams in settings], budget,
                                     device=args.device, progress=update, num_threads=args.threads)
        finally:
            if bar is not None:
                bar.close()
    else:
        results = []
        for index, (trial, hparams) in enumerate(settings, start=1):
            bar, update = _progress_bar(not args.no_progress, f"{cell_name}/{task.name} {index}/{len(settings)}")
            try:
                results.append(train_and_evaluate(
                    spec, task, hparams, budget, seed=args.seed, device=args.device, progress=update,
                    num_threads=args.threads
                ))
            finally:
                if bar is not None:
                    bar.close()
    if study is not None:
        for (trial, _), result in zip(settings, results):
            study.tell(trial, result.score)

    if args.json:
        payload = {
            "cell": cell_name,
            "cell_hash": spec.hash,
            "task": task.name,
            "profile": args.profile,
            "budget": budget.to_dict(),
            "results": [r.to_dict() for r in results],
            "best": max(range(len(results)), key=lambda i: results[i].score),
        }
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(_table(cell_name, task.name, results))
    return 0
