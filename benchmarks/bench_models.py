"""Inference throughput of the two networks at 224, against this machine's matmul roof.

    python benchmarks/bench_models.py [--repeats 5] [--batch 16] [--decoders 256,128,64,32 ...]

Everything is measured in one run, after a warm-up, as medians over repeats (the machine is shared
and noisy, so compare ratios, not absolute seconds):

* roof: float32 matmul GFLOP/s (2048 x 2048 x 2048, tf.linalg.matmul);
* per model: forward FLOPs per 224 image (counted from the layers, radlogics_repro.models.flops),
  images/s at batch ``--batch``, achieved GFLOP/s and its share of the roof, and the images/s the
  roof would allow.

Writes results/bench_models.md (command, commit, date, machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from radlogics_repro import models, provenance

RESULTS = Path(__file__).resolve().parents[1] / "results"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (tracing, oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_roof_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    seconds = median_seconds(lambda: matmul().numpy(), repeats)
    return 2.0 * n**3 / seconds / 1e9


def model_throughput(model, batch: int, repeats: int) -> float:
    """Images per second of ``model`` on random [0, 1] inputs, compiled forward pass."""
    x = tf.random.uniform((batch, *model.input_shape[1:]))
    forward = tf.function(lambda inputs: model(inputs, training=False), jit_compile=False)
    seconds = median_seconds(lambda: forward(x).numpy(), repeats)
    return batch / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decoders", nargs="*", default=["256,128,64,32"],
                        help="U-Net decoder widths to measure, e.g. 256,128,64,32 128,64,32,16")
    parser.add_argument("--out", default=str(RESULTS / "bench_models.md"))
    args = parser.parse_args(argv)

    roof = matmul_roof_gflops(repeats=args.repeats)
    rows = []
    candidates = [(f"lung U-Net, decoder {d}", lambda d=d: models.build_lung_unet(
        encoder_weights=None, decoder_filters=tuple(int(v) for v in d.split(","))))
        for d in args.decoders]
    candidates.append(("slice classifier (ResNet-50)",
                       lambda: models.build_slice_classifier(weights=None)))
    for name, build in candidates:
        model = build()
        gflop = models.count_flops(model) / 1e9
        images_s = model_throughput(model, args.batch, args.repeats)
        achieved = images_s * gflop
        rows.append((name, gflop, images_s, achieved, achieved / roof, roof / gflop))
        print(f"{name}: {gflop:.2f} GFLOP/image, {images_s:.2f} images/s, "
              f"{achieved:.0f} GFLOP/s = {achieved / roof:.0%} of the roof", flush=True)
        del model
        tf.keras.backend.clear_session()

    env = provenance.environment()
    lines = [
        "# Inference throughput at 224 x 224 against the matmul roof",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv or sys.argv[1:])}`  ",
        f"Commit: {env['commit']}; date {env['date']}; {env['machine']}; TensorFlow "
        f"{env['tensorflow']}, Keras {env['keras']}; batch {args.batch}; medians of {args.repeats} "
        "repeats after a warm-up, all in one run.",
        "",
        f"Roof: float32 matmul 2048^3 = **{roof:.0f} GFLOP/s**.",
        "",
        "| model | GFLOP / image (forward) | images/s | achieved GFLOP/s | share of roof "
        "| roof-limited images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {g:.2f} | {ips:.2f} | {a:.0f} | {s:.0%} | {lim:.1f} |"
              for n, g, ips, a, s, lim in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
