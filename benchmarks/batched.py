"""Per-member training throughput: K settings of a cell batched versus the same settings one after another.

Usage::

    python benchmarks/batched.py                         # gru, K = 1, 8, 20, hidden 64/128/256, CPU, 1 thread
    python benchmarks/batched.py --cell lstm --repeats 7
    python benchmarks/batched.py --device cuda --members 1 8 20 64

What is timed is the training loop's own step (:func:`cellsearch.training.run_members` calls these
methods): forward over one window (batch 20, 35 steps, vocabulary 64), per-member losses, backward,
per-member clipping and SGD update. *Sequential* runs K separate ``SequenceModel`` (one step each,
as ``train_and_evaluate`` would one after another); *batched* runs one ``BatchedSequenceModel`` of
the same K members. Each repeat times both back to back (alternating which goes first) so that the
machine's load hits both alike; the table shows medians over repeats of per-member steps per second
and their ratio (batched / sequential, higher is better).

CPU matmul route: every configuration is measured with the default route and with
``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` (the oneDNN route; see
:mod:`cellsearch.compiler.onednn`), interleaved in the same repeats. The start-up check's verdict is
printed first: where it finds no route the setting changes nothing (the numbers show the noise).
The machine's load average is printed before and after.

``--search`` also times the smoke search through the real CLI (``cellsearch search
search_configs/smoke.yaml --executor serial``) with ``batching.enabled`` false and true, alternating,
and checks that both print the same final table. The shipped smoke config has
``settings_per_unit: 1`` (groups of one: the switch cannot matter there); ``--settings-per-unit 3``
runs the same search with a task's 3 settings in one unit, where they can train together.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import torch

from cellsearch import zoo
from cellsearch.batched_training import BatchedMembers
from cellsearch.compiler.batched import BatchedSequenceModel
from cellsearch.compiler.onednn import verify_route
from cellsearch.training import SequenceModel, SingleMember

VOCAB, BATCH, UNROLL = 64, 20, 35
REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(members, tokens, learning_rates, caps, state):
    inputs, targets = tokens[:-1], tokens[1:]
    losses, _, _, state = members.losses(inputs, targets, None, state)
    members.zero_grad()
    losses.sum().backward()
    members.clip_and_update(learning_rates, caps)
    return None  # a fresh state each step: the timing should not depend on carried values


def _members(spec, hidden: int, count: int, device: torch.device):
    models = []
    with torch.random.fork_rng():
        for seed in range(count):
            torch.manual_seed(seed)
            model = SequenceModel(spec, VOCAB, hidden).to(device)
            # one init scale for all: small weights make denormal numbers, which slow any run down a lot and
            # would make the comparison depend on which scales a K happens to include
            model.reset_parameters(1.0)
            models.append(model)
    singles = [SingleMember(m) for m in models]
    batched = BatchedMembers(BatchedSequenceModel.from_members(models), device)  # copies the weights
    return singles, batched


def bench(spec, hidden: int, count: int, args, device: torch.device) -> dict[str, float]:
    singles, batched = _members(spec, hidden, count, device)
    generator = torch.Generator().manual_seed(hidden + count)
    tokens = torch.randint(VOCAB, (UNROLL + 1, BATCH), generator=generator).to(device)
    rates = [0.1 * (1 + i % 5) for i in range(count)]
    caps = [1.0 + i for i in range(count)]

    def sequential():
        for single, rate, cap in zip(singles, rates, caps):
            _step(single, tokens, [rate], [cap], None)

    def together():
        _step(batched, tokens, rates, caps, None)

    variants = {"sequential": sequential, "batched": together}
    # at least 16 member-steps per timed run, so that a small K's runs are not dominated by the
    # cold caches the other variant leaves behind
    steps = max(args.steps, -(-16 // count))
    routes = {"default": "ieee", "onednn": "bf16"} if device.type == "cpu" else {"default": None}
    times: dict[tuple[str, str], list[float]] = {(v, r): [] for v in variants for r in routes}
    cpu_times: dict[tuple[str, str], list[float]] = {(v, r): [] for v in variants for r in routes}
    for fn in variants.values():
        fn()  # warm-up: allocator, first-call dispatch
    for repeat in range(args.repeats):
        order = [(v, r) for v in variants for r in routes]
        if repeat % 2:
            order.reverse()
        for variant, route in order:
            if routes[route] is not None:
                torch.backends.mkldnn.matmul.fp32_precision = routes[route]
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                variants[variant]()
            _sync(device)
            times[(variant, route)].append(time.perf_counter() - start)
            cpu_times[(variant, route)].append(time.process_time() - cpu_start)
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    row = {}
    for clock, measured in (("wall", times), ("cpu", cpu_times)):
        for (variant, route), values in measured.items():
            row[(clock, variant, route)] = count * steps / statistics.median(values)
    return row


def unit_times(settings: int, repeats: int) -> None:
    """One smoke-budget unit per task (``settings`` sampled settings of the GRU) with batching off and on."""
    import numpy as np

    from cellsearch.batched_training import BatchingConfig, batching_pays, train_settings
    from cellsearch.tasks import get_task
    from cellsearch.training import GroupMember

    spec = zoo.get("gru")
    ptb_dir = os.environ.get("CELLSEARCH_PTB_DIR", str(REPO.parent / "shared" / "data" / "ptb"))
    print(f"one unit of {settings} settings (smoke budgets, gru), medians of {repeats}, wall clock:")
    for name in ("memorize", "arithmetic", "xml", "ptb"):
        task = get_task(name, data_dir=ptb_dir if name == "ptb" else None)
        rng = np.random.default_rng(0)
        members = [GroupMember(task.space_for("smoke").sample(rng), seed) for seed in range(settings)]
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(repeats):
            for enabled in ((False, True) if repeat % 2 == 0 else (True, False)):
                start = time.perf_counter()
                train_settings(spec, task, members, task.budget("smoke"), config=BatchingConfig(enabled=enabled))
                times[enabled].append(time.perf_counter() - start)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        pays = batching_pays(spec, task, members[0].hparams)
        print(f"  {name:>10}: off {off:.2f} s, on {on:.2f} s, {off / on:.2f}x"
              f"{'' if pays else ' (softmax-bound: trained one by one either way)'}")


def search_wall_times(settings_per_unit: int | None, repeats: int) -> None:
    """Wall time of the smoke search with batching off and on (serial executor, one process), alternating."""
    config = yaml.safe_load((REPO / "search_configs" / "smoke.yaml").read_text())
    if settings_per_unit is not None:
        config["settings_per_unit"] = settings_per_unit
    env = {**os.environ, "CELLSEARCH_PTB_DIR": os.environ.get("CELLSEARCH_PTB_DIR", str(REPO.parent / "shared" / "data" / "ptb"))}
    times: dict[bool, list[float]] = {False: [], True: []}
    tables: dict[bool, set[str]] = {False: set(), True: set()}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(repeats):
            for enabled in ((False, True) if repeat % 2 == 0 else (True, False)):
                path = Path(root) / f"smoke-{enabled}-{repeat}.yaml"
                path.write_text(yaml.safe_dump({**config, "batching": {"enabled": enabled}}))
                start = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "cellsearch.cli", "search", str(path), "--executor", "serial", "--no-progress",
                     "--run-dir", str(Path(root) / f"run-{enabled}-{repeat}")],
                    capture_output=True, text=True, env=env, timeout=1800,
                )
                times[enabled].append(time.perf_counter() - start)
                if done.returncode != 0:
                    raise SystemExit(f"search failed:\n{done.stderr[-2000:]}")
                table = done.stdout[done.stdout.rfind("short_hash"):]
                tables[enabled].add(table)
                print(f"  smoke search, batching {'on ' if enabled else 'off'}: {times[enabled][-1]:.1f} s "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    same = tables[False] == tables[True] and len(tables[True]) == 1
    print(f"smoke search (settings_per_unit {config['settings_per_unit']}, serial executor, {repeats} runs each): "
          f"batching off {off:.1f} s, on {on:.1f} s (medians), speed-up {off / on:.2f}x; "
          f"final tables {'identical' if same else 'DIFFER'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="gru")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 20])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed run (at least 16/K)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--search", action="store_true", help="also time the smoke search with batching off and on")
    parser.add_argument("--settings-per-unit", type=int, help="with --search: override the smoke config's settings_per_unit")
    parser.add_argument("--search-repeats", type=int, default=1, help="with --search: runs per variant")
    parser.add_argument("--clock", choices=("wall", "cpu", "both"), default="both",
                        help="wall clock, process CPU time (steadier on a shared machine: it does not count waiting for a core), or both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = zoo.get(args.cell)
    print(f"torch {torch.__version__}, device {device}, threads {args.threads}, cell {args.cell}, "
          f"batch {BATCH}, unroll {UNROLL}, vocab {VOCAB}; load average before: {os.getloadavg()}")
    if device.type == "cpu":
        check = verify_route("auto")
        print(f"oneDNN route check: route={check.route}; {check.reason}; default error {check.default_error:.2e}; "
              f"candidates {check.candidate_errors}")
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    header = f"{'hidden':>6} {'K':>3}  {'seq steps/s':>11} {'batched':>9} {'ratio':>6}"
    if device.type == "cpu":
        header += f"  {'seq oneDNN':>10} {'batched oneDNN':>14} {'ratio':>6}  {'batched oneDNN/default':>22}"
    started = time.perf_counter()
    clocks = ("wall", "cpu") if args.clock == "both" else (args.clock,)
    rows = {}
    for hidden in args.hidden:
        for count in args.members:
            rows[(hidden, count)] = bench(spec, hidden, count, args, device)
            print(f"  measured hidden {hidden}, K {count} ({time.perf_counter() - started:.0f} s)", flush=True)
    for clock in clocks:
        print(f"per-member training steps per second, {clock} clock (medians over {args.repeats} repeats of max({args.steps}, 16/K) steps)")
        print(header)
        for (hidden, count), row in rows.items():
            seq, bat = row[(clock, "sequential", "default")], row[(clock, "batched", "default")]
            line = f"{hidden:>6} {count:>3}  {seq:>11.2f} {bat:>9.2f} {bat / seq:>5.2f}x"
            if device.type == "cpu":
                seq_o, bat_o = row[(clock, "sequential", "onednn")], row[(clock, "batched", "onednn")]
                line += f"  {seq_o:>10.2f} {bat_o:>14.2f} {bat_o / seq_o:>5.2f}x  {bat_o / bat:>21.2f}x"
            print(line)
    print(f"took {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()}")
    if args.search:
        unit_times(args.settings_per_unit or 3, 5)
        search_wall_times(args.settings_per_unit, args.search_repeats)


if __name__ == "__main__":
    main()
