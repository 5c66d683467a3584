"""Soak run: a real search for a long time while the memory of every process is sampled.

    python benchmarks/soak.py search_configs/small.yaml --run-dir runs/soak --minutes 30 --workers 2

Starts ``cellsearch search CONFIG`` (the real CLI, an embedded local Ray instance) and every
``--interval`` seconds reads, from /proc, the resident memory (RSS) of the driver and of each of its
descendant processes (Ray's GCS server, raylet, workers, ...), grouped by role, plus how many units
and trained settings the run database holds. After ``--minutes`` (or when the search reaches its own
end) the search is stopped with SIGINT, the graceful stop users get from Ctrl-C.

Writes ``memory.csv`` (one row per sample and role: total and largest process RSS in MiB, process
count) into the run directory and prints a summary per role: RSS in the first sample after the
warm-up, the median and maximum, and a least-squares slope over the samples after the warm-up (MiB
per hour). A leak shows as a slope that stays positive over a long run and a maximum far above the
median; a bounded process has a flat curve with steps as caches fill. Workers are restarted by Ray
when they die, so the per-process maximum is the figure that matters for them.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAGE_MIB = 1 / 1024  # /proc/PID/status reports kB


def read_processes() -> dict[int, tuple[int, str, float]]:
    """Every process as pid -> (parent pid, role name, RSS MiB), read from /proc."""
    table: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process exited between listdir and read
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = float(fields.get("VmRSS", "0 kB").split()[0]) * PAGE_MIB
        table[int(entry)] = (int(fields["PPid"].strip()), role_of(cmdline), rss)
    return table


def role_of(cmdline: str) -> str:
    # Ray renames its worker processes "ray::<task>" / "ray::IDLE"; the others keep their binary's name.
    if cmdline.startswith("ray::"):
        return "ray worker"
    for name in ("gcs_server", "raylet", "dashboard/agent.py", "dashboard", "log_monitor", "monitor.py",
                 "runtime_env"):
        if name in cmdline:
            return name.removesuffix(".py").replace("/", " ")
    return "other"


def descendants(root: int, table: dict[int, tuple[int, str, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def progress_counts(database: Path) -> tuple[int, int]:
    """(units, trained settings) committed so far; (−1, −1) while the database is busy or missing."""
    if not database.exists():
        return -1, -1
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2) as connection:
            units = connection.execute("SELECT COUNT(*) FROM cs_units WHERE finished_at IS NOT NULL").fetchone()[0]
            settings = connection.execute("SELECT COUNT(*) FROM cs_evaluations").fetchone()[0]
        return int(units), int(settings)
    except sqlite3.Error:
        return -1, -1


def slope_per_hour(times: list[float], values: list[float]) -> float:
    if len(times) < 3:
        return float("nan")
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        return float("nan")
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / spread * 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--minutes", type=float, default=30.0, help="stop the search after this long")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=20.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=300.0, help="seconds excluded from the slope")
    parser.add_argument("--resume", action="store_true", help="resume RUN_DIR instead of starting it")
    parser.add_argument("--plot-only", action="store_true", help="only redraw RUN_DIR/memory.png from memory.csv")
    args = parser.parse_args()
    if args.plot_only:
        plot(args.run_dir / "memory.csv", args.run_dir / "memory.png")
        return 0

    if args.resume:
        command = ["cellsearch", "resume", str(args.run_dir), "--workers", str(args.workers), "--no-progress"]
    else:
        command = ["cellsearch", "search", args.config, "--run-dir", str(args.run_dir),
                   "--workers", str(args.workers), "--no-progress"]
    print("running:", " ".join(command), flush=True)
    search = subprocess.Popen(command, start_new_session=True)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    # the search refuses a run directory holding other files: write into it only once the run exists
    while search.poll() is None and not (args.run_dir / "run.json").exists():
        time.sleep(0.2)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    memory_file = args.run_dir / "memory.csv"
    rows: list[dict[str, object]] = []
    stopping = False
    with memory_file.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["elapsed_s", "role", "processes", "rss_mib", "largest_mib",
                                                    "units", "settings"])
        if handle.tell() == 0:
            writer.writeheader()
        while search.poll() is None:
            table = read_processes()
            pids = [search.pid, *descendants(search.pid, table)]
            units, settings = progress_counts(args.run_dir / "run.db")
            elapsed = round(time.monotonic() - started, 1)
            by_role: dict[str, list[float]] = {}
            for pid in pids:
                if pid in table:
                    role = "driver" if pid == search.pid else table[pid][1]
                    by_role.setdefault(role, []).append(table[pid][2])
            for role, values in sorted(by_role.items()):
                row = {"elapsed_s": elapsed, "role": role, "processes": len(values),
                       "rss_mib": round(sum(values), 1), "largest_mib": round(max(values), 1),
                       "units": units, "settings": settings}
                writer.writerow(row)
                rows.append(row)
            handle.flush()
            if not stopping and time.monotonic() >= deadline:
                print(f"soak: {args.minutes} min reached, sending SIGINT", flush=True)
                search.send_signal(signal.SIGINT)
                stopping = True
            time.sleep(args.interval)
    print(f"search exited with {search.returncode} after {(time.monotonic() - started) / 60:.1f} min", flush=True)
    summarise(rows, args.warmup)
    plot(memory_file, args.run_dir / "memory.png")
    return 0


def plot(memory_file: Path, out: Path) -> None:
    """Total RSS per role against time, and the largest single worker, with trained settings on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with memory_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for role in sorted({row["role"] for row in rows}):
        mine = [row for row in rows if row["role"] == role]
        axis.plot([float(r["elapsed_s"]) / 60 for r in mine], [float(r["rss_mib"]) for r in mine], label=role)
        if role == "ray worker":
            axis.plot([float(r["elapsed_s"]) / 60 for r in mine], [float(r["largest_mib"]) for r in mine],
                      linestyle="--", label="largest ray worker")
    axis.set_xlabel("minutes")
    axis.set_ylabel("resident memory (MiB)")
    axis.legend(fontsize=7, loc="upper left")
    progress = [row for row in rows if row["role"] == "driver" and int(row["settings"]) >= 0]
    twin = axis.twinx()
    twin.plot([float(r["elapsed_s"]) / 60 for r in progress], [int(r["settings"]) for r in progress], color="black",
              linewidth=0.8, linestyle=":")
    twin.set_ylabel("trained settings committed (dotted)")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def summarise(rows: list[dict[str, object]], warmup: float) -> None:
    print(f"{'role':<12} {'procs':>5} {'first MiB':>10} {'median MiB':>11} {'max MiB':>8} "
          f"{'largest proc max':>17} {'slope MiB/h':>12}")
    for role in sorted({str(row["role"]) for row in rows}):
        mine = [row for row in rows if row["role"] == role and float(row["elapsed_s"]) >= warmup]
        if not mine:
            continue
        times = [float(row["elapsed_s"]) for row in mine]
        values = [float(row["rss_mib"]) for row in mine]
        print(f"{role:<12} {max(int(row['processes']) for row in mine):>5} {values[0]:>10.1f} "
              f"{statistics.median(values):>11.1f} {max(values):>8.1f} "
              f"{max(float(row['largest_mib']) for row in mine):>17.1f} {slope_per_hour(times, values):>12.1f}")
    last = rows[-1] if rows else {}
    print(f"units committed: {last.get('units')}, trained settings: {last.get('settings')}")


if __name__ == "__main__":
    sys.exit(main())
