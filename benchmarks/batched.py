"""Per-member training throughput: K settings of a cell batched versus the same settings one after another.

Usage::

    python benchmarks/batched.py                         # gru, K = 1, 8, 20, hidden 64/128/256, CPU, 1 thread
    python benchmarks/batched.py --cell lstm --repeats 7
    python benchmarks/batched.py --device cuda --members 1 8 20 64   # compiled = CUDA graphs; reference = cuDNN
    python benchmarks/batched.py --no-compile                         # eager only (compilation takes minutes)

What is timed is the training loop's own step (:func:`cellsearch.training.loop.run_members` calls these
methods): forward over one window (batch 20, 35 steps, vocabulary 64), per-member losses, backward,
per-member clipping and SGD update. *Sequential* runs K separate ``SequenceModel`` (one step each,
as ``train_and_evaluate`` would one after another); *batched* runs one ``BatchedSequenceModel`` of
the same K members. Each repeat times both back to back (alternating which goes first) so that the
machine's load hits both alike; the table shows medians over repeats of per-member steps per second
and their ratio (batched / sequential, higher is better).

Compiled (``--compile``, on by default): the same members objects wrapped in
:class:`~cellsearch.training.capture.CapturedMembers` (``torch.compile``, inductor; on CUDA
``reduce-overhead``, i.e. CUDA graphs), timed in the same repeats as the eager variants: *seq
compiled* (K single models, one compilation shared by all of one width) and *batched compiled*
(K > 1). Their first step compiles; its wall time is printed with the number of steps after which
the faster step has paid for it. Every timed compiled step is checked to have run compiled.

Reference (cells ``gru`` and ``lstm``): the single model with ``nn.GRU`` / ``nn.LSTM`` in place of
the compiled cell (same embedding, width, softmax, step), one after another like *sequential*; with
``--device cuda`` that is cuDNN, on a CPU PyTorch's native CPU kernels ("nn CPU"). The columns
``seq compiled/it`` and ``seq/it`` compare the compiled and eager single-model paths against it.

CPU matmul route (``--onednn``, on by default): every configuration is measured with the default route and with
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
from torch import nn

from cellsearch import zoo
from cellsearch.compiler.onednn import verify_route
from cellsearch.model import BatchedSequenceModel, SequenceModel
from cellsearch.training import BatchedMembers, SingleMember
from cellsearch.training.capture import CapturedMembers

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
    with torch.random.fork_rng(devices=[]):
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


class TorchRecurrent(nn.Module):
    """The single model with ``nn.GRU`` / ``nn.LSTM`` (cuDNN on CUDA) in place of the compiled cell: the same shapes."""

    def __init__(self, kind: type, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, hidden)
        self.rnn = kind(hidden, hidden)
        self.decoder = nn.Linear(hidden, VOCAB)

    def forward(self, tokens, state=None):
        output, state = self.rnn(self.embedding(tokens), state)
        return self.decoder(output), state


#: cells of the zoo that ``nn.GRU`` / ``nn.LSTM`` compute (the reference for the single-model path)
TORCH_CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


def _torch_members(cell: str, hidden: int, count: int, device: torch.device) -> list:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return [SingleMember(TorchRecurrent(TORCH_CELLS[cell], hidden).to(device)) for _ in range(count)]


def bench(spec, hidden: int, count: int, args, device: torch.device) -> tuple[dict, dict]:
    """Per-member steps per second of every variant, and the compiled variants' first-step (compile) seconds."""
    singles, batched = _members(spec, hidden, count, device)
    generator = torch.Generator().manual_seed(hidden + count)
    tokens = torch.randint(VOCAB, (UNROLL + 1, BATCH), generator=generator).to(device)
    rates = [0.1 * (1 + i % 5) for i in range(count)]
    caps = [1.0 + i for i in range(count)]

    def one_by_one(group):
        def run():
            for single, rate, cap in zip(group, rates, caps):
                _step(single, tokens, [rate], [cap], None)
        return run

    def together(members):
        return lambda: _step(members, tokens, rates, caps, None)

    variants = {"sequential": one_by_one(singles), "batched": together(batched)}
    captured = {}
    if args.compile:
        # compiled wrappers around the same members objects (same weights); one compilation serves every
        # single model of a width (same shapes), the batched model compiles once per K
        captured["sequential compiled"] = [CapturedMembers(single, device) for single in singles]
        variants["sequential compiled"] = one_by_one(captured["sequential compiled"])
        if count > 1:
            captured["batched compiled"] = [CapturedMembers(batched, device)]
            variants["batched compiled"] = together(captured["batched compiled"][0])
    if args.cell in TORCH_CELLS:
        variants["torch"] = one_by_one(_torch_members(args.cell, hidden, count, device))
    # at least 16 member-steps per timed run, so that a small K's runs are not dominated by the
    # cold caches the other variant leaves behind
    steps = max(args.steps, -(-16 // count))
    routes = {"default": "ieee", "onednn": "bf16"} if device.type == "cpu" and args.onednn else {"default": None}
    # the oneDNN route is a setting of eager matmuls; compiled and nn.GRU/nn.LSTM variants run on the default route only
    pairs = [(v, r) for v in variants for r in routes if r == "default" or v in ("sequential", "batched")]
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    cpu_times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    compile_seconds = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()  # warm-up: allocator, first-call dispatch; compilation for the compiled variants
        if name in captured:
            compile_seconds[name] = time.perf_counter() - start
            print(f"    compiled {name} (hidden {hidden}, K {count}): first step {compile_seconds[name]:.1f} s",
                  flush=True)
    for repeat in range(args.repeats):
        order = list(pairs)
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
    for name, wrappers in captured.items():
        # every timed step must have gone through the compiled graph (no silent eager fallback or recompile)
        assert all(w.eager_calls == 0 and w.compiled_calls >= 1 for w in wrappers), name
    row = {}
    for clock, measured in (("wall", times), ("cpu", cpu_times)):
        for (variant, route), values in measured.items():
            row[(clock, variant, route)] = count * steps / statistics.median(values)
    return row, compile_seconds


def unit_times(settings: int, repeats: int) -> None:
    """One smoke-budget unit per task (``settings`` sampled settings of the GRU) with batching off and on."""
    import numpy as np

    from cellsearch.batching import BatchingConfig
    from cellsearch.tasks import get_task
    from cellsearch.training import GroupMember, batching_pays, train_settings

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
    env = {**os.environ,
           "CELLSEARCH_PTB_DIR": os.environ.get("CELLSEARCH_PTB_DIR", str(REPO.parent / "shared" / "data" / "ptb"))}
    times: dict[bool, list[float]] = {False: [], True: []}
    tables: dict[bool, set[str]] = {False: set(), True: set()}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(repeats):
            for enabled in ((False, True) if repeat % 2 == 0 else (True, False)):
                path = Path(root) / f"smoke-{enabled}-{repeat}.yaml"
                path.write_text(yaml.safe_dump({**config, "batching": {"enabled": enabled}}))
                start = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "cellsearch.cli", "search", str(path), "--executor", "serial",
                     "--no-progress", "--run-dir", str(Path(root) / f"run-{enabled}-{repeat}")],
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
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the training step through torch.compile (inductor; reduce-overhead on CUDA)")
    parser.add_argument("--onednn", action=argparse.BooleanOptionalAction, default=True,
                        help="on a CPU, also time the eager variants with the oneDNN matmul route")
    parser.add_argument("--search", action="store_true", help="also time the smoke search with batching off and on")
    parser.add_argument("--settings-per-unit", type=int,
                        help="with --search: override the smoke config's settings_per_unit")
    parser.add_argument("--search-repeats", type=int, default=1, help="with --search: runs per variant")
    parser.add_argument("--clock", choices=("wall", "cpu", "both"), default="both",
                        help="wall clock, process CPU time (steadier on a shared machine: it does not count waiting "
                             "for a core), or both")
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
    started = time.perf_counter()
    clocks = ("wall", "cpu") if args.clock == "both" else (args.clock,)
    rows, compiles = {}, {}
    for hidden in args.hidden:
        for count in args.members:
            rows[(hidden, count)], compiles[(hidden, count)] = bench(spec, hidden, count, args, device)
            print(f"  measured hidden {hidden}, K {count} ({time.perf_counter() - started:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f})", flush=True)
    onednn = device.type == "cpu" and args.onednn
    reference = "cuDNN" if device.type == "cuda" else "nn CPU"
    for clock in clocks:
        print(f"per-member training steps per second, {clock} clock "
              f"(medians over {args.repeats} repeats of max({args.steps}, 16/K) steps)")
        header = f"{'hidden':>6} {'K':>3}  {'seq steps/s':>11} {'batched':>9} {'ratio':>6}"
        if onednn:
            header += f"  {'seq oneDNN':>10} {'batched oneDNN':>14} {'ratio':>6}  {'batched oneDNN/default':>22}"
        if args.compile:
            header += f"  {'seq compiled':>12} {'/seq':>6} {'batched compiled':>16} {'/batched':>8}"
        if args.cell in TORCH_CELLS:
            header += (f"  {reference + ' ' + args.cell:>12}" + (f" {'seq compiled/it':>15}" if args.compile else "")
                       + f" {'seq/it':>6}")
        print(header)
        for (hidden, count), row in rows.items():
            seq, bat = row[(clock, "sequential", "default")], row[(clock, "batched", "default")]
            line = f"{hidden:>6} {count:>3}  {seq:>11.2f} {bat:>9.2f} {bat / seq:>5.2f}x"
            if onednn:
                seq_o, bat_o = row[(clock, "sequential", "onednn")], row[(clock, "batched", "onednn")]
                line += f"  {seq_o:>10.2f} {bat_o:>14.2f} {bat_o / seq_o:>5.2f}x  {bat_o / bat:>21.2f}x"
            if args.compile:
                seq_c = row[(clock, "sequential compiled", "default")]
                bat_c = row.get((clock, "batched compiled", "default"))
                line += f"  {seq_c:>12.2f} {seq_c / seq:>5.2f}x"
                line += f" {bat_c:>16.2f} {bat_c / bat:>7.2f}x" if bat_c else f" {'-':>16} {'-':>8}"
            if args.cell in TORCH_CELLS:
                ref = row[(clock, "torch", "default")]
                line += f"  {ref:>12.2f}" + (f" {seq_c / ref:>14.2f}x" if args.compile else "") + f" {seq / ref:>5.2f}x"
            print(line)
    if args.compile:
        print("compilation (first compiled step, forward + backward, wall clock; one compilation per shape, shared by "
              "every model of that shape in the process) and steps to amortise it against the eager step of the same "
              "variant (wall-clock medians above):")
        amortise, fresh, seen = [], [], set()
        for (hidden, count), seconds in compiles.items():
            row = rows[(hidden, count)]
            for variant, eager_name, members in (("sequential compiled", "sequential", 1),
                                                 ("batched compiled", "batched", count)):
                if variant not in seconds:
                    continue
                shape = (variant, hidden, members)
                label = f"  hidden {hidden:>4} K {count:>3} {variant:>19}: {seconds[variant]:7.1f} s"
                if shape in seen:
                    print(f"{label} (no compilation: the graph of an earlier row of the same shape was reused)")
                    continue
                seen.add(shape)
                eager_step = members / row[("wall", eager_name, "default")]
                compiled_step = members / row[("wall", variant, "default")]
                saved = eager_step - compiled_step
                fresh.append(seconds[variant])
                if saved > 0:
                    amortise.append(seconds[variant] / saved)
                print(f"{label}; step eager {1e3 * eager_step:7.1f} ms, compiled {1e3 * compiled_step:7.1f} ms; "
                      "amortised after "
                      + (f"{seconds[variant] / saved:,.0f} steps" if saved > 0 else "never (not faster)"))
        if fresh:
            print(f"compile time: median {statistics.median(fresh):.1f} s over {len(fresh)} compilations "
                  f"(min {min(fresh):.1f}, max {max(fresh):.1f}); steps to amortise: "
                  + (f"median {statistics.median(amortise):,.0f} over the {len(amortise)} faster ones" if amortise
                     else "never (no compiled variant was faster)"))
    print(f"took {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()}")
    if args.search:
        unit_times(args.settings_per_unit or 3, 5)
        search_wall_times(args.settings_per_unit, args.search_repeats)


if __name__ == "__main__":
    main()
