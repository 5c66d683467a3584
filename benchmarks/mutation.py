"""Mutation throughput, rejection and duplicate rates from the GRU and the LSTM, measured in one run.

Usage::

    python benchmarks/mutation.py                       # 10,000 mutations per cell and mode
    python benchmarks/mutation.py --count 2000 --modes reference
    python benchmarks/mutation.py --profile             # also where the time of mutate() goes

Two ways of choosing the parent:

``reference``
    every mutation starts from the reference cell itself (a fixed, 12-13 node parent);
``pool``
    the parent is drawn uniformly from a growing pool: the reference cell plus
    every child that the deduplicator found new, as a search without selection
    would (parents drift towards the size limit).

For each cell and mode it reports: mutations per CPU-second of ``mutate``
alone (median over chunks of 500, and overall), the same for building the
parent ``CellSpec`` from plain data measured after every chunk (the baseline:
one validated, hashed spec), the median ratio of the two; the share of attempts rejected (unchanged, invalid,
degenerate, too large, too few linear nodes) and attempts per child; and the
share of children that the deduplicator (seeded with the reference cell) calls
structural or functional duplicates, with its checks per second. All on one
core, in one process.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import numpy as np

from cellsearch import CellSpec, zoo
from cellsearch.dedup import Deduplicator
from cellsearch.mutation import REJECTION_REASONS, mutate

CHUNK = 500


def _spec_construction_rate(spec: CellSpec, count: int) -> float:
    data = spec.to_dict()
    start = time.process_time()
    for _ in range(count):
        CellSpec(states=data["states"], nodes=data["nodes"], outputs=data["outputs"])
    return count / (time.process_time() - start)


def run(cell: str, mode: str, count: int, seed: int) -> dict:
    reference = zoo.get(cell)
    rng = np.random.default_rng(
        np.random.SeedSequence([seed, zoo.names().index(cell), ("reference", "pool").index(mode)])
    )
    dedup = Deduplicator.from_specs([reference])
    pool = [reference]
    rejected = dict.fromkeys(REJECTION_REASONS, 0)
    kinds = {"new": 0, "structural": 0, "functional": 0}
    chunk_rates, spec_rates, nodes = [], [], []
    mutate_time = dedup_time = chunk_time = 0.0
    wall_start = time.perf_counter()
    for index in range(count):
        parent = reference if mode == "reference" else pool[int(rng.integers(len(pool)))]
        start = time.process_time()
        mutation = mutate(parent, rng)
        elapsed = time.process_time() - start
        mutate_time += elapsed
        chunk_time += elapsed
        if (index + 1) % CHUNK == 0:
            chunk_rates.append(CHUNK / chunk_time)
            # The baseline is measured between chunks, so that both see the same machine.
            spec_rates.append(_spec_construction_rate(reference, 100))
            chunk_time = 0.0
        for reason, number in mutation.rejected.items():
            rejected[reason] += number
        start = time.process_time()
        check = dedup.add(mutation.child)
        dedup_time += time.process_time() - start
        kinds[check.kind or "new"] += 1
        nodes.append(len(mutation.child.nodes))
        if check.is_new and mode == "pool":
            pool.append(mutation.child)
    wall = time.perf_counter() - wall_start
    if not chunk_rates:
        chunk_rates, spec_rates = [count / mutate_time], [_spec_construction_rate(reference, 100)]
    attempts = count + sum(rejected.values())
    return {
        "rate_median": statistics.median(chunk_rates),
        "rate_overall": count / mutate_time,
        "spec_rate": statistics.median(spec_rates),
        "ratio": statistics.median(m / s for m, s in zip(chunk_rates, spec_rates)),
        "cpu_share": (mutate_time + dedup_time) / wall,
        "attempts": attempts,
        "rejected": rejected,
        "kinds": kinds,
        "dedup_rate": count / dedup_time,
        "nodes_median": statistics.median(nodes),
        "nodes_max": max(nodes),
    }


def _profile(cell: str, count: int, seed: int) -> str:
    reference = zoo.get(cell)
    rng = np.random.default_rng(seed)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        mutate(reference, rng)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="mutations per cell and mode (default 10,000)")
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=zoo.names())
    parser.add_argument("--modes", nargs="+", default=["reference", "pool"], choices=["reference", "pool"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print a profile of 2,000 mutations of each cell")
    args = parser.parse_args()

    print(f"{args.count:,} mutations per cell and mode, one process, default MutationConfig")
    header = (f"{'cell':<5} {'mode':<9} {'mut/s med':>9} {'mut/s all':>9} {'spec/s':>7} {'ratio':>5} "
              f"{'att/child':>9} {'rejected':>8} {'unchgd':>6} {'invalid':>7} {'degen':>6} {'large':>6} {'no-lin':>6} "
              f"{'struct':>6} {'funct':>6} {'new':>6} {'dedup/s':>7} {'nodes':>9} {'cpu':>5}")
    print(header)
    for cell in args.cells:
        for mode in args.modes:
            r = run(cell, mode, args.count, args.seed)
            attempts = r["attempts"]
            share = {k: v / attempts for k, v in r["rejected"].items()}
            kinds = {k: v / args.count for k, v in r["kinds"].items()}
            print(
                f"{cell:<5} {mode:<9} {r['rate_median']:>9,.0f} {r['rate_overall']:>9,.0f} {r['spec_rate']:>7,.0f} "
                f"{r['ratio']:>5.2f} {attempts / args.count:>9.2f} "
                f"{sum(share.values()):>8.1%} {share['unchanged']:>6.1%} {share['invalid']:>7.1%} "
                f"{share['degenerate']:>6.1%} {share['too_large']:>6.1%} {share['too_few_linear']:>6.1%} "
                f"{kinds['structural']:>6.1%} {kinds['functional']:>6.1%} {kinds['new']:>6.1%} "
                f"{r['dedup_rate']:>7,.0f} {r['nodes_median']:>4.0f}/{r['nodes_max']:<4d} {r['cpu_share']:>5.0%}"
            )
    print("rates are per second of this process's CPU time (one core; time.process_time), so other load on the "
          "machine does not count")
    print("mut/s: mutate() calls per second (median over chunks of 500 / overall); spec/s: CellSpec constructions "
          "of the reference cell per second, measured after every chunk (baseline); ratio: median over chunks of "
          "mut/s / spec/s")
    print("att/child: attempts per child; rejected: failed attempts / all attempts, by reason; struct/funct/new: "
          "share of children; dedup/s: Deduplicator.add per second; nodes: median/max child size; cpu: CPU time / "
          "wall time of the measured calls (below 100% = the machine was busy)")
    if args.profile:
        for cell in args.cells:
            print(f"\nprofile of 2,000 mutations of {cell} (by own time)")
            print(_profile(cell, 2000, args.seed))


if __name__ == "__main__":
    main()
