"""What ways to a faster ``analyze`` buy on the benchmark study: results/analyze_speed_options.md.

    python experiments/analyze_speed_options.py --lung-model runs/lung_unet/<run>/model.keras \
        --classifier-model runs/classifier/<run>/model.keras [--slice-step-mm 2.5] [--repeats 3] \
        [--slices 300 --in-plane 512] \
        [--out results/analyze_speed_options.md]

On the benchmark's 300 x 512 x 512 synthetic study (:func:`radlogics_repro.bench.study.make_bench_study`,
the study of ``python -m radlogics_repro.bench``) this times, in one process and alternately
(median of ``--repeats`` rounds after a warm-up, so machine noise hits the variants alike):

- lung segmentation (``segment_lungs`` as ``analyze`` runs it, U-Net in bfloat16 on a CPU with it)
  on every slice, and on slices at most ``--slice-step-mm`` apart with the probabilities of the
  slices in between interpolated (``analysis.lung_slice_step_mm``); the table adds the 3D Dice of
  the stepped lung mask against the every-slice one and against the phantom's true lungs;
- the classifier's stages (probability of every lung slice; Grad-CAM fine maps of the positive
  ones) as analyze runs them, with the maps computed from the activations the classification pass
  kept at the lowest Grad-CAM layer, against a second whole forward+backward pass on the positives'
  crops (how analyze did it before); the table adds the largest difference between their maps.
  (The float32 / bfloat16 comparison of these stages was an earlier version of this script:
  results/analyze_speed_options.md at commit 3093d66.)

The stage seconds of a whole run at each setting are in results/bench.md; the Dice of the stepped
segmentation over the held-out scans comes from ``experiments/lung_dice.py --slice-step-mm``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lung_dice import produced_by, refuse_existing, script_start  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, analyze, atomic, localize  # noqa: E402
from radlogics_repro.bench import timing  # noqa: E402
from radlogics_repro.bench.study import make_bench_study  # noqa: E402
from radlogics_repro.evaluate import metrics as M  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402
from radlogics_repro.lung_segmentation import segment_lungs, slice_step_for  # noqa: E402

BATCH = 8


def lung_rows(study, case, lung_unet, step_mm: float, repeats: int) -> tuple[list[dict], np.ndarray]:
    """Lung segmentation on every slice against every ``step``-th: seconds, network slices, Dice.
    Returns (rows, the every-slice labels)."""
    size = int(lung_unet.input_shape[1])
    masks = {}

    def segment(step):
        def run():
            masks[step] = segment_lungs(study, lung_unet, batch_size=BATCH, label_sides=True,
                                        input_size=size, slice_step_mm=step)
        return run

    times = timing.interleaved({"every": segment(None), "stepped": segment(step_mm)}, repeats)
    every, stepped = masks[None] > 0, masks[step_mm] > 0
    truth = case.lung_mask > 0
    step = slice_step_for(float(study.spacing[0]), step_mm)
    rows = []
    stepped_label = f"slices <= {step_mm:g} mm apart (here {step} slices apart)"
    for name, mask, label in (("every", every, "every slice"), ("stepped", stepped, stepped_label)):
        rows.append({"stage": "lung segmentation", "variant": f"U-Net on {label}",
                     "median s": times[name].seconds, "s per repeat": times[name].all_seconds,
                     "Dice vs every slice": M.dice(mask, every), "Dice vs true lungs": M.dice(mask, truth)})
    return rows, masks[None]


def second_pass_maps(study, lung_labels, z, loaded, settings, threshold) -> tuple[np.ndarray, dict]:
    """How analyze made the maps before: classify every lung slice (forward only), then a fused
    Grad-CAM pass (forward and backward through the whole ResNet-50) on the positives' crops.
    Returns the fine maps of the positives and the seconds per stage."""
    size = int(loaded.classifier.input_shape[1])
    seconds, fines = {"classification": 0.0, "gradcam": 0.0}, [np.zeros((0, size, size), np.float32)]
    for start in range(0, len(z), BATCH):
        clock = time.perf_counter()
        crops, _ = analyze.classifier_crops(study, lung_labels, z[start:start + BATCH], loaded.classifier,
                                            loaded.classifier_card)
        positive = np.asarray(loaded.classifier.predict_on_batch(crops), np.float32)[:, 0] >= threshold
        now = time.perf_counter()
        seconds["classification"] += now - clock
        if positive.any():
            fines.append(localize.gradcam_maps(loaded.classifier, crops[positive],
                                               layers=settings.gradcam_layers, batch_size=BATCH).fine)
        seconds["gradcam"] += time.perf_counter() - now
    return np.concatenate(fines), seconds


def classifier_rows(study, lung_labels, loaded, repeats: int) -> list[dict]:
    """Probabilities of every lung slice and fine maps of the positives: as analyze runs them now
    (maps from the activations the classification pass kept at the lowest Grad-CAM layer) against a
    second full pass on the positives' crops (before)."""
    z = analyze.lung_slice_indices(study, lung_labels, loaded.classifier_card)
    # per-slice maps, as when the second pass was analyze's way (results/analyze_gradcam_from_cut.md)
    settings = analyze.AnalysisSettings(batch_size=BATCH, map_scale="per_slice")
    threshold = loaded.classifier_card.get("operating_threshold") or 0.5
    stages, fines = {"from the cut": [], "second pass": []}, {}

    def from_cut():
        *_, fines["from the cut"], seconds = analyze.classify_and_map_slices(
            study, lung_labels, z, loaded, settings, threshold)
        stages["from the cut"].append(seconds)

    def second_pass():
        fines["second pass"], seconds = second_pass_maps(study, lung_labels, z, loaded, settings, threshold)
        stages["second pass"].append(seconds)

    times = timing.interleaved({"from the cut": from_cut, "second pass": second_pass}, repeats)
    differ = (float(np.abs(fines["from the cut"] - fines["second pass"]).max())
              if len(fines["from the cut"]) else 0.0)
    labels = {"from the cut": "Grad-CAM from the activations kept at the cut (analyze now)",
              "second pass": "Grad-CAM by a second whole forward+backward pass (before)"}
    rows = []
    for name, label in labels.items():
        timed = stages[name][-repeats:]  # without the warm-up call
        rows.append({"stage": f"classification + Grad-CAM ({len(z)} lung slices, "
                              f"{len(fines[name])} positive)",
                     "variant": label, "median s": times[name].seconds,
                     "s per repeat": times[name].all_seconds,
                     "of which classification s": float(np.median([t["classification"] for t in timed])),
                     "of which Grad-CAM s": float(np.median([t["gradcam"] for t in timed])),
                     "cores used": f"{times[name].cpu_share:.0%}",
                     "max abs fine-map difference": f"{differ:.1e}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lung-model", required=True)
    parser.add_argument("--classifier-model", required=True)
    parser.add_argument("--slice-step-mm", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300, help="study size (the benchmark's: 300 x 512)")
    parser.add_argument("--in-plane", type=int, default=512)
    parser.add_argument("--sections", nargs="+", choices=("lung", "classifier"),
                        default=["lung", "classifier"])
    parser.add_argument("--out", default="results/analyze_speed_options.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if refuse_existing(out):
        return 2
    started = script_start()
    loaded = analyze.load_analysis_models(args.lung_model, args.classifier_model, precision="auto")
    with tempfile.TemporaryDirectory() as folder:
        bench_study = make_bench_study(Path(folder), args.slices, args.in_plane)
    study, case = bench_study.study, bench_study.case
    if "lung" in args.sections:
        rows, lung_labels = lung_rows(study, case, loaded.lung_unet, args.slice_step_mm, args.repeats)
    else:  # the segmentation the classifier stages need, untimed
        rows, lung_labels = [], segment_lungs(study, loaded.lung_unet, batch_size=BATCH, label_sides=True,
                                              input_size=int(loaded.lung_unet.input_shape[1]))
    if "classifier" in args.sections:
        rows += classifier_rows(study, lung_labels, loaded, args.repeats)
    table = pd.DataFrame(rows)
    table["s per repeat"] = table["s per repeat"].map(lambda v: ", ".join(f"{s:.1f}" for s in v))
    lines = [
        "# Two ways to a faster analyze, on the benchmark study", "", f"_{RESEARCH_USE_NOTICE}_", "",
        f"{produced_by('analyze_speed_options.py', argv, started)}", "",
        f"Models: lung U-Net `{args.lung_model}` (run at {loaded.precision}), classifier "
        f"`{args.classifier_model}`.", "",
        f"Study: {bench_study.describe()}. Variants timed alternately in this one process, median of "
        f"{args.repeats} rounds after a warm-up; batch {BATCH}; both networks at {loaded.precision}.", "",
        frame_markdown(table.astype(object).fillna("-")), ""]
    atomic.write_text(out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
