"""Seconds per synthetic 128-slice 512 x 512 chest-CT case (radlogics_repro.synth.generate_case).

    python benchmarks/bench_synth.py [--repeats 3] [--slices 128] [--in-plane 512] [--threads 2]

One warm-up case, then the median of ``--repeats`` timed cases, each a *new* patient (the
patient cache is cleared, so the vessel trees and the disease course are built every time, as
for the single-scan patients of a dataset), alternating COVID-like and negative. Also times a
repeat scan of an already built patient (another day of a longitudinal series). Target: <= 5 s
per case on the 2-core reference machine.

Writes results/bench_synth.md (command, commit, date, machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from radlogics_repro.synth import generate_case
from radlogics_repro.synth import phantom as ph

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
TARGET_S = 5.0


def commit() -> str:
    """Short HEAD commit, marked when the synth sources differ from it; 'uncommitted' without
    a commit."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "radlogics_repro/synth",
                                "benchmarks/bench_synth.py"], cwd=ROOT, check=True,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    return head + (" (synth sources uncommitted)" if dirty else "") if head else "uncommitted"


def time_case(seed: int, label: int, args, *, fresh: bool, day: int = 0) -> float:
    if fresh:
        ph._patient.cache_clear()
    start = time.perf_counter()
    generate_case(seed, label=label, day=day, breath_phase="inhale", in_plane=args.in_plane,
                  n_slices=args.slices, threads=args.threads, longitudinal=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--in-plane", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "bench_synth.md"))
    args = parser.parse_args(argv)

    time_case(100, 1, args, fresh=True)  # warm-up (imports, allocator, caches)
    fresh = [time_case(101 + i, (i + 1) % 2, args, fresh=True) for i in range(args.repeats)]
    for t in fresh:
        print(f"new patient: {t:.2f} s", flush=True)
    repeat = [time_case(101, 0, args, fresh=False, day=4 + i) for i in range(args.repeats)]
    med_fresh, med_repeat = statistics.median(fresh), statistics.median(repeat)
    print(f"median: {med_fresh:.2f} s per case (new patient), {med_repeat:.2f} s (repeat scan)")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])])
    shape = f"{args.slices} x {args.in_plane} x {args.in_plane}"
    verdict = "meets" if med_fresh <= TARGET_S else "MISSES"
    lines = [
        f"# Synthetic phantom generation: seconds per {shape} case",
        "",
        f"- command: `{command}`",
        f"- commit: {commit()}",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU; 1-min load average at the end: {load:.2f}",
        f"- setup: `generate_case(..., in_plane={args.in_plane}, n_slices={args.slices}, "
        f"threads={args.threads})`, inspiration, noise and blur on; one warm-up, then the median "
        f"of {args.repeats} new patients (patient cache cleared: anatomy, vessel trees, disease "
        f"built each time) and of {args.repeats} repeat scans of one patient",
        "",
        "| case | median s | all runs (s) |",
        "|---|---:|---|",
        f"| new patient | {med_fresh:.2f} | {', '.join(f'{t:.2f}' for t in fresh)} |",
        f"| repeat scan of a built patient | {med_repeat:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in repeat)} |",
        "",
        f"Target <= {TARGET_S:.0f} s per case: **{verdict}** ({med_fresh:.2f} s).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
