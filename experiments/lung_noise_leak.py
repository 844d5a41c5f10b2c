"""Does a lung U-Net read the training noise as the label? Dice on clean slices against slices given
the training's lung noise: results/<name>.md.

    python experiments/lung_noise_leak.py --model base=runs/lung_unet/<run>/model.keras [--model ...] \
        [--manifest ~/.cache/radlogics_repro/synthetic/default/manifest.csv] [--split val] \
        [--slices 120] [--out results/lung_noise_leak.md]

The paper adds Gaussian noise inside the lung mask of training images (``augment.lung_noise``: scale
0.1 x N(0, 0.8) on the [0, 1] image). Added to every image, the noise marks the lung pixels, and a
network can learn to segment the noise instead of the lung; scans at inference have no such noise.
This script takes ``--slices`` evenly spaced slices of one split (the lung U-Net experiment's slice
sampling), and reports for each model the Dice pooled over the slices on the clean images and on the
same images with the lung noise added (the same noise for every model). A model that learnt lungs
scores about the same on both; a model that learnt the noise scores far higher on the noisy ones. It
also reports the mean predicted probability on background pixels of the clean images: how far the
sigmoid head has moved from its starting 0.5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402
from lung_dice import load_at_precision, named_path, produced_by, refuse_existing, script_start  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, atomic, augment, data, models  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402
from radlogics_repro.train import load_task_slices  # noqa: E402

DEFAULT_MANIFEST = "~/.cache/radlogics_repro/synthetic/default/manifest.csv"


def noisy_copies(images: tf.Tensor, masks: tf.Tensor, batch_index: int) -> tf.Tensor:
    """``images`` ``(N, S, S, 3)`` with the training's lung noise in each (probability 1); the seed
    follows from the batch and the image's place in it, so every model sees the same noise."""
    return tf.stack([augment.lung_noise(images[j], masks[j], seed=tf.constant([batch_index, j]))
                     for j in range(int(images.shape[0]))])


def leak_row(model, slices: data.SliceSet) -> dict:
    """Pooled Dice on clean and on noisy slices, and the mean clean background probability."""
    counts = {"clean": [0, 0], "noisy": [0, 0]}
    background = []
    for index, (images, masks) in enumerate(data.segmentation_dataset(slices, batch_size=8)):
        lung = masks.numpy() > 0.5
        for name, batch in (("clean", images), ("noisy", noisy_copies(images, masks, index))):
            probs = np.asarray(model.predict_on_batch(batch), np.float32)
            predicted = probs >= 0.5
            counts[name][0] += 2 * int((predicted & lung).sum())
            counts[name][1] += int(predicted.sum() + lung.sum())
            if name == "clean":
                background.append(probs[~lung])
    clean, noisy = (counts[k][0] / max(counts[k][1], 1) for k in ("clean", "noisy"))
    return {"Dice, clean slices": round(clean, 3), "Dice, lung noise added": round(noisy, 3),
            "gain from the noise": round(noisy - clean, 3),
            "mean background probability (clean)": round(float(np.concatenate(background).mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=lambda t: named_path(t, "--model"),
                        help="NAME=path/to/model.keras (repeat)")
    parser.add_argument("--manifest", default=DEFAULT_MANIFEST)
    parser.add_argument("--split", default="val", choices=data.SPLITS)
    parser.add_argument("--slices", type=int, default=120, help="evenly spaced slices of the split")
    parser.add_argument("--slice-step-mm", type=float, default=20.0, help="as conf/experiment/lung_unet.yaml")
    parser.add_argument("--empty-fraction", type=float, default=0.1, help="as conf/experiment/lung_unet.yaml")
    parser.add_argument("--precision", default="auto", choices=models.PRECISION_CHOICES)
    parser.add_argument("--out", default="results/lung_noise_leak.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if refuse_existing(out):
        return 2
    started = script_start()
    manifest = str(Path(args.manifest).expanduser())
    policy = models.resolve_precision(args.precision)
    rows = []
    for name, path in args.model:
        model = load_at_precision(path, policy)
        settings = {"kind": "volumes", "manifest": manifest, "input_size": int(model.input_shape[1]),
                    "slice_step_mm": args.slice_step_mm, "empty_fraction": args.empty_fraction}
        slices = load_task_slices("lung_unet", settings, args.split, max_cases=None, cache=True)
        slices = slices.evenly_spaced(args.slices)
        rows.append({"model": name, "slices": len(slices), **leak_row(model, slices)})
        print(rows[-1], flush=True)
    lines = [
        "# Lung noise as a label: Dice on clean slices and on slices with the training noise", "",
        f"_{RESEARCH_USE_NOTICE}_", "",
        f"{produced_by('lung_noise_leak.py', argv, started)} Precision: {policy}.", "",
        "Models: " + "; ".join(f"**{name}** `{path}`" for name, path in args.model) + ".", "",
        f"Data: `{manifest}` split {args.split}, {args.slices} evenly spaced slices (one every "
        f"{args.slice_step_mm:g} mm, lung-free slices {args.empty_fraction:g} of the lung ones). Dice pooled "
        "over the slices, prediction >= 0.5; noise: `augment.lung_noise` (0.1 x N(0, 0.8) inside the "
        "reference lung), the same for every model.", "",
        frame_markdown(pd.DataFrame(rows)), ""]
    atomic.write_text(out, "\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
