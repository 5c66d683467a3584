"""Forward+backward time of compiled ``gru``/``lstm`` against ``nn.GRU``/``nn.LSTM``, measured in one run.

Usage::

    python benchmarks/compiler.py                    # CPU, 1 thread, batch 32, length 35, hidden 128 and 256
    python benchmarks/compiler.py --threads 2
    python benchmarks/compiler.py --device cuda      # batch 64, hidden 256 and 1024, against cuDNN

Each repeat times one forward and backward pass (loss = sum of outputs and final states) of the
reference module and of ``CellRNN.from_torch(reference)`` back to back, alternating which goes first;
the table shows medians over repeats and the ratio of the medians (compiled / reference, lower is
better). On CPU it shows both wall-clock time and the process's CPU time: on a machine shared with
other work, CPU time does not count the time the process waits for a core, so its ratio is the
steadier one. The same run measures the machine's matrix-multiply peak (GFLOP/s of a large
sgemm, best of 15, same clock) and reports what fraction of it each model reaches, counting only the models'
matrix-multiply FLOPs (forward, the input gradient of every layer but the first, and every weight
gradient). Plan and code generation happen in the ``CellRNN`` constructor and are reported
separately as compile time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from cellsearch.compiler import CellRNN


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_peak(device: torch.device, size: int, repeats: int) -> tuple[float, float]:
    """Best GFLOP/s of a ``size``-cubed float32 matrix multiply, by wall clock and by CPU time.

    The best repeat, not the median: a peak is what the machine can do, and on a shared machine
    the median of a long multiply mostly measures the neighbours.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    for _ in range(2):
        a.mm(b)
    times = [_time(lambda: a.mm(b), device) for _ in range(repeats)]
    flops = 2 * size**3
    return flops / min(t[0] for t in times) / 1e9, flops / min(t[1] for t in times) / 1e9


def model_flops(layers: int, gates: int, input_size: int, hidden: int, batch: int, length: int) -> float:
    """Matrix-multiply FLOPs of forward+backward (the input needs no gradient)."""
    rows = batch * length
    total = 0.0
    for layer in range(layers):
        width = input_size if layer == 0 else hidden
        input_passes = 2 if layer == 0 else 3  # forward, weight gradient (+ input gradient above layer 0)
        total += input_passes * 2 * rows * width * gates * hidden
        total += 3 * 2 * rows * hidden * gates * hidden
    return total


def bench_one(
    kind: str, hidden: int, args: argparse.Namespace, device: torch.device, peak: tuple[float, float]
) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(hidden)
    torch.manual_seed(hidden)  # nn.GRU/nn.LSTM initialise from the default generator
    reference_class = nn.GRU if kind == "gru" else nn.LSTM
    reference = reference_class(hidden, hidden, args.layers).to(device)
    start = time.perf_counter()
    compiled = CellRNN.from_torch(reference)
    compile_s = time.perf_counter() - start
    inputs = torch.randn(args.length, args.batch, hidden, generator=generator).to(device)

    def step(module):
        def run():
            output, state = module(inputs)
            states = state if isinstance(state, tuple) else (state,)
            loss = output.sum() + sum(s.sum() for s in states)
            loss.backward()

        return run

    runs = {"reference": step(reference), "compiled": step(compiled)}
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times: dict[str, list[tuple[float, float]]] = {"reference": [], "compiled": []}
    for repeat in range(args.repeats):
        order = ("reference", "compiled") if repeat % 2 == 0 else ("compiled", "reference")
        for name in order:
            reference.zero_grad(set_to_none=True)
            compiled.zero_grad(set_to_none=True)
            times[name].append(_time(runs[name], device))
    flops = model_flops(args.layers, 3 if kind == "gru" else 4, hidden, hidden, args.batch, args.length)
    row = {"cell": kind, "hidden": hidden, "compile_ms": compile_s * 1e3}
    for clock, position in (("wall", 0), ("cpu", 1)):
        reference_s = statistics.median(t[position] for t in times["reference"])
        compiled_s = statistics.median(t[position] for t in times["compiled"])
        spread = [t[position] for t in times["compiled"]]
        row[clock] = {
            "reference_ms": reference_s * 1e3,
            "compiled_ms": compiled_s * 1e3,
            "ratio": compiled_s / reference_s,
            "reference_peak": flops / reference_s / 1e9 / peak[position],
            "compiled_peak": flops / compiled_s / 1e9 / peak[position],
            "spread": (max(spread) - min(spread)) / compiled_s,
        }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--batch", type=int, help="default 32 on CPU, 64 on CUDA")
    parser.add_argument("--length", type=int, default=35)
    parser.add_argument("--hidden", type=int, nargs="+", help="default 128 256 on CPU, 256 1024 on CUDA")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    args.batch = args.batch or (64 if device.type == "cuda" else 32)
    args.hidden = args.hidden or ([256, 1024] if device.type == "cuda" else [128, 256])
    peak = matmul_peak(device, 4096 if device.type == "cuda" else 1024, 15)
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)  # CPU time says nothing about GPU work
    baseline = "cuDNN" if device.type == "cuda" else "nn.GRU/nn.LSTM (CPU)"
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"length {args.length}, layers {args.layers}, repeats {args.repeats} (medians)"
    )
    print(f"measured float32 matmul peak: {peak[0]:.1f} GFLOP/s (wall), {peak[1]:.1f} GFLOP/s (CPU time); "
          f"baseline: {baseline}")
    header = (
        f"{'cell':<5} {'hidden':>6} {'clock':>5} {'torch ms':>9} {'compiled ms':>11} {'ratio':>6} "
        f"{'torch %peak':>11} {'comp %peak':>10} {'spread':>7} {'compile ms':>10}"
    )
    print(header)
    for kind in ("gru", "lstm"):
        for hidden in args.hidden:
            row = bench_one(kind, hidden, args, device, peak)
            for clock in clocks:
                r = row[clock]
                print(
                    f"{row['cell']:<5} {row['hidden']:>6} {clock:>5} "
                    f"{r['reference_ms']:>9.2f} {r['compiled_ms']:>11.2f} "
                    f"{r['ratio']:>5.2f}x {100 * r['reference_peak']:>10.1f}% {100 * r['compiled_peak']:>9.1f}% "
                    f"{100 * r['spread']:>6.0f}% {row['compile_ms']:>10.1f}"
                )
    print("ratio = compiled / torch (lower is better); spread = (max - min) / median of the compiled timings;")
    print("compile ms = building CellRNN.from_torch (plan, code generation, weight copy), not in the timings")


if __name__ == "__main__":
    main()
