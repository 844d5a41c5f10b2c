"""Seconds per image of the two Grad-CAM engines (radlogics_repro.localize) at 224 x 224.

    python benchmarks/bench_gradcam.py [--batch 8] [--repeats 3]

Both engines run in the same process on the same batch of random [0, 1] images through the slice
classifier with random weights (timing does not depend on the weight values): one warm-up call each
(tracing, oneDNN primitive creation), then the median of ``--repeats`` timed calls of
``gradcam_maps(model, images, engine=..., batch_size=--batch)`` -- the whole call: probabilities,
both layers' raw maps, normalization and the fused 224 x 224 map. The machine is shared and noisy:
compare the ratio, not absolute seconds. Also reports the largest difference between the engines'
normalized maps on this batch.

Writes results/bench_gradcam.md (command, commit, date, machine).
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

import keras
import numpy as np

from radlogics_repro import provenance
from radlogics_repro.localize import ENGINES, gradcam_maps
from radlogics_repro.models import GRADCAM_LAYERS, build_slice_classifier

RESULTS = Path(__file__).resolve().parents[1] / "results"


def timed_median(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def uncommitted(paths: list[Path]) -> list[str]:
    """Which of ``paths`` differ from HEAD (modified or untracked), by repository-relative name."""
    root = Path(__file__).resolve().parents[1]
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", *map(str, paths)], cwd=root,
                                check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in status.splitlines() if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default=str(RESULTS / "bench_gradcam.md"))
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    model = build_slice_classifier(input_shape=(args.size, args.size, 3), weights=None)
    images = np.random.default_rng(0).random((args.batch, args.size, args.size, 3),
                                             dtype=np.float32)

    seconds, results = {}, {}
    for engine in ENGINES:
        seconds[engine], results[engine] = timed_median(
            lambda engine=engine: gradcam_maps(model, images, engine=engine,
                                               batch_size=args.batch),
            args.repeats,
        )
        print(f"{engine}: {seconds[engine] / args.batch:.3f} s/image "
              f"({seconds[engine]:.2f} s per batch of {args.batch})", flush=True)

    fused, reference = results["fused"], results["tf-keras-vis"]
    diffs = {name: float(np.abs(fused.normalized[name] - reference.normalized[name]).max())
             for name in GRADCAM_LAYERS}
    diffs["fine (224 x 224 product)"] = float(np.abs(fused.fine - reference.fine).max())
    ratio = seconds["tf-keras-vis"] / seconds["fused"]
    print(f"tf-keras-vis / fused time: {ratio:.2f}x; max |normalized difference|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))

    env = provenance.environment()
    root = Path(__file__).resolve().parents[1]
    dirty = uncommitted([root / "radlogics_repro" / "localize.py", Path(__file__).resolve()])
    commit = env["commit"] + (f" (uncommitted: {', '.join(dirty)})" if dirty else "")
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])])
    lines = [
        f"# Grad-CAM engines: seconds per image at {args.size} x {args.size}",
        "",
        f"- command: `{command}`",
        f"- commit: {commit}",
        f"- date: {env['date']}",
        f"- machine: {env['machine']}; Python {env['python']}, TensorFlow {env['tensorflow']}, "
        f"Keras {env['keras']}",
        f"- setup: slice classifier (ResNet-50, random weights), batch {args.batch} random [0, 1] "
        f"images, layers {', '.join(GRADCAM_LAYERS)}, score = sigmoid probability; whole "
        f"`gradcam_maps` call (probabilities, raw, normalized, fine maps); median of "
        f"{args.repeats} repeats after one warm-up, both engines in the same run",
        "",
        "| engine | s / image | s / batch |",
        "|---|---:|---:|",
    ]
    lines += [f"| {engine} | {seconds[engine] / args.batch:.3f} | {seconds[engine]:.2f} |"
              for engine in ENGINES]
    lines += [
        "",
        f"tf-keras-vis / fused time: **{ratio:.2f}x**.",
        "",
        "Max |difference| between the engines' per-image normalized maps on this batch: "
        + "; ".join(f"{k}: {v:.1e}" for k, v in diffs.items()) + ".",
    ]
    write_atomically(Path(args.out), "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
