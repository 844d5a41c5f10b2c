"""Benchmark: radlogics_repro.io.load_study vs SimpleITK ImageSeriesReader on one DICOM folder.

Writes a synthetic 300-slice 512x512 CT series (smooth random HU) into a temporary folder, then
times both readers on the same files (one warm-up each, then the median of 3 repeats with the
readers alternating, same run) and writes a markdown table to results/bench_io.md.

Run:  .venv/bin/python benchmarks/bench_io.py [--slices 300] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from radlogics_repro.io import load_study, write_dicom_series

REPO = Path(__file__).resolve().parents[1]


def smooth_random_hu(n_slices: int, size: int, seed: int = 0) -> np.ndarray:
    """(z, y, x) float32 HU: smoothed noise scaled to about -1000..1000."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(max(n_slices // 8, 2), size // 16, size // 16))
    zoom = (n_slices / coarse.shape[0], size / coarse.shape[1], size / coarse.shape[2])
    smooth = ndimage.zoom(coarse, zoom, order=1)[:n_slices, :size, :size]
    return (smooth / np.abs(smooth).max() * 1000.0).astype(np.float32)


def read_with_simpleitk(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)


def read_with_load_study(folder: Path) -> np.ndarray:
    return load_study(folder).hu


def interleaved_medians(readers: dict, folder: Path, repeats: int) -> dict:
    """Median seconds per reader; one warm-up each, then the readers alternate per repeat so
    that both see the same machine load."""
    results = {name: fn(folder) for name, fn in readers.items()}  # warm-up (cache, imports)
    times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, fn in readers.items():
            start = time.perf_counter()
            results[name] = fn(folder)
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t)), results[name]) for name, t in times.items()}


def git_commit() -> str:
    """Short HEAD commit; '+uncommitted' when the benchmarked files differ from it."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        except OSError:
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "uncommitted"
    dirty = git("status", "--porcelain", "--", "radlogics_repro/io.py", "benchmarks/bench_io.py")
    return f"{head}+uncommitted" if dirty else head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_io.md")
    args = parser.parse_args(argv)

    hu = smooth_random_hu(args.slices, args.size)
    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        folder = Path(tmp) / "series"
        write_dicom_series(hu, (1.0, 0.7, 0.7), folder)
        timed = interleaved_medians(
            {"ours": read_with_load_study, "sitk": read_with_simpleitk}, folder, args.repeats
        )
        load = os.getloadavg()[0]
    (ours, ours_hu), (sitk, sitk_hu) = timed["ours"], timed["sitk"]
    max_diff = float(np.abs(ours_hu - sitk_hu).max())
    ours_rate, sitk_rate = args.slices / ours, args.slices / sitk
    ratio = ours_rate / sitk_rate

    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/bench_io.py " + " ".join(given)
    lines = [
        "# DICOM folder read: load_study vs SimpleITK ImageSeriesReader",
        "",
        f"- command: `{command.strip()}`",
        f"- commit: {git_commit()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, Python {platform.python_version()}",
        f"- data: synthetic CT series, {args.slices} slices of {args.size}x{args.size} int16 "
        "(explicit VR little endian), file cache warm; median of "
        f"{args.repeats} repeats after one warm-up each, the two readers alternating in the "
        f"same run; 1-min load average at the end: {load:.2f} on {os.cpu_count()} CPUs",
        "- SimpleITK: GetGDCMSeriesFileNames + Execute + GetArrayFromImage, cast to float32",
        f"- max |HU difference| between the two readers: {max_diff:g}",
        "",
        "| reader | median s | slices/s |",
        "|---|---:|---:|",
        f"| radlogics_repro.io.load_study | {ours:.3f} | {ours_rate:.0f} |",
        f"| SimpleITK ImageSeriesReader | {sitk:.3f} | {sitk_rate:.0f} |",
        "",
        f"Ratio (load_study slices/s / SimpleITK slices/s): **{ratio:.2f}x** (target >= 1.0x)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(text)
    tmp_out.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
