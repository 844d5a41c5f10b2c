"""Random init versus self-supervised (SimCLR) init of the classifier: results/pretraining.md.

    python experiments/pretraining_comparison.py \
        --pretraining runs/pretrain/<run> \
        --ucsd runs/classifier/<random run> runs/classifier/<pretrained run> \
        [--synthetic runs/classifier/<random run> runs/classifier/<pretrained run>] \
        [--out results/pretraining.md]

Each pair is (random init, pre-trained init), trained with the same settings and budget (the script
checks that their configs differ only in ``model.weights`` and ``run_dir``). It reports:

1. UCSD COVID-CT official *val* split (the official test split is withheld here): AUC, and
   accuracy / F1 at 0.5 and at the operating point (chosen on that same val split, so optimistic);
2. Grad-CAM localization on the 50 real MedSeg slices (doctor infection masks) with the UCSD
   classifiers: Dice of the fine map thresholded at ``--map-threshold``, pointing game, pixel AUROC;
3. with ``--synthetic``: slice AUC on the held-out synthetic patients (``data=synthetic_holdout``,
   ground-truth lung crops), with a patient-bootstrap 95% interval.

Published baselines on the UCSD split (METHOD.md section 7, on the official *test* split) stand beside.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier_auc import read_run, slice_auc  # noqa: E402  (experiments/, the script's folder)
from lung_dice import dataset_rows  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, data, localize, models, provenance  # noqa: E402
from radlogics_repro.evaluate import metrics as M  # noqa: E402
from radlogics_repro.evaluate.plots import format_value as _fmt  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PUBLISHED_UCSD = [  # METHOD.md section 7, official test split: accuracy, F1, AUC
    ("DenseNet-169 (ImageNet), published", 0.847, 0.854, 0.919),
    ("Self-Trans (self-supervised pre-training), published", 0.86, 0.85, 0.94),
    ("multi-task + self-supervised, published", 0.89, 0.90, 0.98),
]


def check_same_budget(random_run: dict, pretrained_run: dict) -> None:
    """Refuse a pair whose settings differ in anything but the backbone weights (and run folder)."""
    def strip(cfg):
        cfg = json.loads(json.dumps(cfg))
        cfg.pop("run_dir", None)
        cfg.get("model", {}).pop("weights", None)
        return cfg

    if strip(random_run["config"]) != strip(pretrained_run["config"]):
        raise SystemExit(f"error: {random_run['dir']} and {pretrained_run['dir']} differ in more than "
                         "model.weights; they are not a same-budget pair")


def run_minutes(metrics: dict) -> float:
    """Wall-clock minutes from a run's start (environment.date) to its end (finished)."""
    from datetime import datetime

    start = datetime.fromisoformat(metrics["environment"]["date"])
    return (datetime.fromisoformat(metrics["finished"]) - start).total_seconds() / 60.0


def medseg_slices(folder: Path, size: int) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """MedSeg COVID-SemiSeg training slices: model inputs ``(N, size, size)`` in [0, 1] (8-bit grey,
    resized whole, like the UCSD images) and the binary infection masks at each image's own size."""
    from PIL import Image

    base = folder / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
    images, masks, names = [], [], []
    for image_file in sorted((base / "Imgs").glob("*.jpg")):
        with Image.open(base / "GT" / (image_file.stem + ".png")) as img:
            masks.append(np.asarray(img.convert("L")) > 127)
        images.append(data.read_display_image(image_file, size))
        names.append(image_file.name)
    return np.stack(images), masks, names


def medseg_localization(model_path: Path, images: np.ndarray, masks: list[np.ndarray],
                        map_threshold: float) -> dict:
    """Grad-CAM fine maps of the classifier on the MedSeg slices against the infection masks."""
    model = models.load_model(model_path)
    result = localize.gradcam_maps(model, np.repeat(images[..., np.newaxis], 3, axis=-1),
                                   batch_size=8)
    dice, pointing, auroc = [], [], []
    for fine, mask in zip(result.fine, masks, strict=True):
        fine_full = localize.resize_maps(fine[np.newaxis], mask.shape)[0]
        dice.append(M.dice(fine_full >= map_threshold, mask))
        pointing.append(M.pointing_game(fine_full, mask))
        auroc.append(M.pixel_auroc(fine_full, mask))
    return {"dice_mean": float(np.mean(dice)), "dice_sd": float(np.std(dice)),
            "pointing_game": float(np.mean(pointing)), "pixel_auroc_mean": float(np.nanmean(auroc)),
            "mean_probability": float(np.mean(result.probabilities)), "n": len(dice)}


def holdout_slice_auc(run: dict, manifest: Path) -> dict:
    """Slice AUC of a synthetic-trained classifier on the held-out synthetic patients (ground-truth
    lung crops, the run's own slice settings), with a patient-bootstrap 95% interval
    (:func:`classifier_auc.slice_auc` on the manifest's test split)."""
    rows, path, split = dataset_rows(f"{manifest}:test", None)
    return slice_auc(run, rows, path, split, large_mm2=200.0)


def ucsd_rows(pair: list[dict]) -> list[str]:
    rows = []
    for label, run in zip(("random init", "SimCLR init (this work)"), pair, strict=True):
        val = run["metrics"]["metrics"]["val"]
        half, op = val["at_0.5"], val["at_operating_point"]
        late = float(run["history"]["val_auc"].tail(3).mean())
        rows.append(f"| {label} | val (n={val['n_slices']}) | {_fmt(val['auc'])} | {_fmt(late)} | "
                    f"{_fmt(half['accuracy'])} / {_fmt(half['f1'])} | "
                    f"{_fmt(op['accuracy'])} / {_fmt(op['f1'])} | {run_minutes(run['metrics']):.1f} |")
    for name, acc, f1, auc in PUBLISHED_UCSD:
        rows.append(f"| {name} | official test (n=203) | {auc:.3f} | - | {acc:.3f} / {f1:.3f} | - | - |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretraining", type=Path, required=True, help="the pre-training run folder")
    parser.add_argument("--ucsd", type=Path, nargs=2, required=True, metavar=("RANDOM", "PRETRAINED"))
    parser.add_argument("--synthetic", type=Path, nargs=2, metavar=("RANDOM", "PRETRAINED"))
    parser.add_argument("--holdout", type=Path,
                        default=Path.home() / ".cache/radlogics_repro/synthetic/holdout/manifest.csv")
    parser.add_argument("--medseg", type=Path, default=SHARED / "medseg-infnet-train")
    parser.add_argument("--map-threshold", type=float, default=0.4)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "pretraining.md")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    started = time.time()
    pretraining = json.loads((args.pretraining / "backbone.pretraining.json").read_text())
    pretraining_metrics = json.loads((args.pretraining / "metrics.json").read_text())
    ucsd = [read_run(r) for r in args.ucsd]
    check_same_budget(*ucsd)
    synthetic = [read_run(r) for r in args.synthetic] if args.synthetic else None
    if synthetic:
        check_same_budget(*synthetic)

    size = ucsd[0]["card"]["input_size"]
    images, masks, _ = medseg_slices(args.medseg, size)
    local = [medseg_localization(r["dir"] / "model.keras", images, masks, args.map_threshold)
             for r in ucsd]
    held_out = [holdout_slice_auc(r, args.holdout) for r in synthetic] if synthetic else None

    env = provenance.environment()
    lines = [
        "# Self-supervised pre-training versus random initialisation",
        "",
        f"_{RESEARCH_USE_NOTICE}_",
        "",
        f"Produced by `python experiments/pretraining_comparison.py {' '.join(sys.argv[1:])}` at commit "
        f"`{env['commit']}` on {env['date']} ({env['machine']}); the script itself took "
        f"{(time.time() - started) / 60:.1f} min. No ImageNet weights on this machine: the baseline "
        "is random initialisation, as it is for any site without them.",
        "",
        "## The pre-training run",
        "",
        f"- {pretraining['summary']}.",
        f"- Method: {pretraining['method']}; temperature {pretraining['temperature']}; "
        f"projection head {pretraining['projection_units']}; "
        f"views per batch {pretraining['views_per_batch']}.",
        "- Data: " + "; ".join(f"`{s['source']}` ({s['items']} items, {s['slices']} slices)"
                                for s in pretraining["data"]["sources"]) + ".",
        f"- Final pretext loss {_fmt(pretraining['final']['loss'])} (a random encoder: "
        f"{_fmt(pretraining['final']['random_encoder_loss'])}); pair accuracy "
        f"{_fmt(pretraining['final']['pair_accuracy'])} "
        f"(chance {_fmt(pretraining['final']['chance_pair_accuracy'])}).",
        f"- Wall clock: {run_minutes(pretraining_metrics):.1f} min; run folder `{args.pretraining}`, "
        f"trainer {pretraining['trainer']}.",
        "",
        "## UCSD COVID-CT (real 8-bit slices), classifier fine-tuned from each init",
        "",
        f"Same settings and budget for both runs (checked): `{_config_line(ucsd[0]['config'])}`. "
        "The model kept is the epoch with the best val AUC, and the operating point is the Youden "
        "threshold on that same val split: both optimistic (the official test split is withheld "
        "here). The 0.5 column is not tuned; the mean val AUC of the last three epochs (Keras' "
        "AUC, no epoch choice) is the least selected figure.",
        "",
        "| init | split | AUC (best epoch) | val AUC, last 3 epochs | accuracy / F1 at 0.5 | "
        "accuracy / F1 at operating point | train min |",
        "|---|---|---|---|---|---|---|",
        *ucsd_rows(ucsd),
        "",
        "## Grad-CAM localization on the real MedSeg slices (UCSD classifiers)",
        "",
        f"{local[0]['n']} doctor-labelled COVID-19 slices (Inf-Net training part), whole 8-bit slices at "
        f"{size} px like the UCSD inputs; fine map (conv4_block6_out {size // 16}x{size // 16} times "
        f"conv3_block4_out {size // 8}x{size // 8} at this input size) thresholded at {args.map_threshold}.",
        "",
        "| init | infection Dice mean (SD) | pointing game | pixel AUROC | mean P(COVID) |",
        "|---|---|---|---|---|",
        *(f"| {label} | {_fmt(r['dice_mean'])} ({_fmt(r['dice_sd'])}) | {_fmt(r['pointing_game'])} | "
          f"{_fmt(r['pixel_auroc_mean'])} | {_fmt(r['mean_probability'])} |"
          for label, r in zip(("random init", "SimCLR init"), local, strict=True)),
        "| U-Net / Inf-Net, fully supervised, published (MedSeg test) | 0.439 / 0.682 | - | - | - |",
        "",
    ]
    if held_out:
        lines += [
            "## Synthetic held-out patients, classifier trained on the synthetic default from each init",
            "",
            f"Same settings and budget (checked): `{_config_line(synthetic[0]['config'])}`.",
            "",
            "| init | slice AUC [95% CI, patient bootstrap] | slices (abnormal) | patients | train min |",
            "|---|---|---|---|---|",
            *(f"| {label} | {_fmt(r['auc'])} {_fmt(r['ci'])} | {r['n_slices']} ({r['n_abnormal']}) | "
              f"{r['n_patients']} | {run_minutes(run['metrics']):.1f} |"
              for label, r, run in zip(("random init", "SimCLR init"), held_out, synthetic, strict=True)),
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def _config_line(cfg: dict) -> str:
    trainer, data_cfg = cfg["trainer"], cfg["data"]
    return (f"data={data_cfg.get('name')} input {data_cfg['input_size']} px, epochs {trainer['epochs']}, "
            f"batch {trainer['batch_size']}, lr {trainer['learning_rate']} ({trainer['lr_schedule']}), "
            f"precision {trainer['precision']}, seed {cfg['seed']}")


if __name__ == "__main__":
    sys.exit(main())
