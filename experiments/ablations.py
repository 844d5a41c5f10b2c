"""Run the ablations of METHOD.md / issue #6 and write one comparison table.

    python experiments/ablations.py [--budget ablation|smoke] [--holdout-cases 8] [--skip-training]

Two kinds of ablation:

* analysis-time, on the newest trained models (``runs/``), evaluated on held-out synthetic patients
  (``data=synthetic_holdout``) as one Hydra multirun of ``radlogics_repro.evaluate``:
  Grad-CAM at 14x14 only vs 28x28 only vs fused (``analysis.gradcam_layers``); the case threshold
  sweep is read from the fused run's per-case table (no rerun needed);
* training-time, each a Hydra multirun of ``radlogics_repro.train`` at a reduced, stated budget
  (``trainer=ablation``: 3 epochs, bfloat16, 6 studies per split): classifier input lung crop vs
  whole slice vs lung-masked (``data.input_mode``); U-Net lung-noise augmentation on/off
  (``augment.lung_noise``); pretrained vs random init (``model.weights=imagenet,null``; offline the
  ImageNet run falls back to random and says so in the table's init column).

Everything goes to ``results/ablations/``: the runs' own metrics, and ``ablations.md`` with the
command, commit and date. Runs that finished earlier are reused (Hydra run folders are named by the
override), so a killed script continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlogics_repro import RESEARCH_USE_NOTICE, provenance  # noqa: E402
from radlogics_repro.evaluate.metrics import sensitivity_specificity  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402

OUT = ROOT / "results" / "ablations"
GRADCAM_VARIANTS = {
    "fused (14x14 x 28x28)": "[conv4_block6_out,conv3_block4_out]",
    "14x14 only (conv4_block6_out)": "[conv4_block6_out]",
    "28x28 only (conv3_block4_out)": "[conv3_block4_out]",
}
CASE_THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def _run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def _python(module: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", module, *overrides]


# ---- analysis-time ------------------------------------------------------------------------------


def gradcam_ablation(holdout_cases: int) -> pd.DataFrame:
    rows = []
    for label, layers in GRADCAM_VARIANTS.items():
        name = "gradcam_" + "_".join(part.split("_")[0] for part in layers.strip("[]").split(","))
        folder = OUT / name
        if not (folder / "metrics.json").exists():
            _run(_python("radlogics_repro.evaluate", "data=synthetic_holdout", "split=test",
                         f"analysis.gradcam_layers={layers}", f"max_cases={holdout_cases}",
                         f"output_dir={folder}", f"name={name}", "n_boot=200"))
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        rows.append({"Grad-CAM": label, "infection Dice": metrics["localization"]["infection_dice_mean"],
                     "pixel AUROC": metrics["localization"]["pixel_auroc_mean"],
                     "pointing game": metrics["localization"]["pointing_game"],
                     "Corona r": metrics["corona_vs_reference"]["pearson_r"],
                     "cases": metrics["n_cases"]})
    return pd.DataFrame(rows)


def case_threshold_sweep(cases_csv: Path) -> pd.DataFrame:
    cases = pd.read_csv(cases_csv)
    labels = cases["label"].to_numpy(int)
    ratio = cases["positive_slice_ratio"].to_numpy(float)
    rows = []
    for threshold in CASE_THRESHOLDS:
        sensitivity, specificity = sensitivity_specificity(labels, ratio, threshold)
        rows.append({"case threshold": threshold, "sensitivity": sensitivity,
                     "specificity": specificity, "cases": len(labels)})
    return pd.DataFrame(rows)


# ---- training-time ------------------------------------------------------------------------------


def _train_multirun(experiment: str, sweep: str, budget: str, folder: Path, extra: list[str]) -> list[dict]:
    """One Hydra multirun of ``+experiment`` over ``sweep`` (``key=a,b,...``); returns each finished
    run's metrics.json with the swept value under ``"value"``."""
    key = sweep.split("=")[0]
    sweep_dir = folder / f"{experiment}__{key}"
    if not list(sweep_dir.glob("job*/metrics.json")):
        _run(_python("radlogics_repro.train", "--multirun", f"+experiment={experiment}",
                     f"trainer={budget}", sweep, *extra, f"hydra.sweep.dir={sweep_dir}",
                     "hydra.sweep.subdir=job${hydra:job.num}",
                     f"run_dir={sweep_dir}/job${{hydra:job.num}}"))
    results = []
    for metrics_file in sorted(sweep_dir.glob("job*/metrics.json")):
        config = yaml.safe_load((metrics_file.parent / "config.yaml").read_text())
        value = config
        for part in key.split("."):
            value = value[part]
        results.append({"value": value, **json.loads(metrics_file.read_text())})
    return results


def training_ablations(budget: str, extra: list[str]) -> dict[str, pd.DataFrame]:
    folder = OUT / f"train_{budget}"
    tables = {}
    runs = _train_multirun("classifier", "data.input_mode=lung_crop,whole_slice,lung_masked", budget,
                           folder, extra)
    tables["Classifier input (training ablation)"] = pd.DataFrame([{
        "data.input_mode": r["value"], "init": r["init"], "val slice AUC": r["metrics"]["val"]["auc"],
        "test slice AUC": r["metrics"].get("test", {}).get("auc", np.nan)} for r in runs])
    runs = _train_multirun("lung_unet", "augment.lung_noise=true,false", budget, folder, extra)
    tables["U-Net lung-noise augmentation (training ablation)"] = pd.DataFrame([{
        "augment.lung_noise": r["value"], "init": r["init"], "val Dice": r["metrics"]["val"]["dice_mean"],
        "test Dice": r["metrics"].get("test", {}).get("dice_mean", np.nan)} for r in runs])
    runs = _train_multirun("classifier", "model.weights=imagenet,null", budget, folder, extra)
    tables["Classifier init (training ablation)"] = pd.DataFrame([{
        "model.weights": r["value"], "init actually used": r["init"],
        "val slice AUC": r["metrics"]["val"]["auc"],
        "test slice AUC": r["metrics"].get("test", {}).get("auc", np.nan)} for r in runs])
    return tables


# ---- report -------------------------------------------------------------------------------------


def markdown(tables: dict[str, pd.DataFrame], command: str, seconds: float) -> str:
    env = provenance.environment()
    lines = [
        "# Ablations", "", f"**{RESEARCH_USE_NOTICE}**", "",
        f"Command: `{command}`  ",
        f"Commit {env['commit']}; {env['date']}; {env['machine']}; wall time {seconds / 60:.1f} min.",
        "Data: synthetic phantoms only (training: synthetic default; analysis-time ablations: the "
        "held-out patients of `data=synthetic_holdout`). No ImageNet weights on this machine.", "",
    ]
    for title, table in tables.items():
        lines += [f"## {title}", "", frame_markdown(table), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="ablation", help="trainer preset for the training ablations")
    parser.add_argument("--holdout-cases", type=int, default=8)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-analysis", action="store_true")
    parser.add_argument("--train-override", action="append", default=[],
                        help="extra Hydra override for every training run (e.g. a data.manifest)")
    args = parser.parse_args(argv)
    start = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    tables = {}
    if not args.skip_analysis:
        tables["Grad-CAM layers (held-out synthetic patients)"] = gradcam_ablation(args.holdout_cases)
        fused = OUT / "gradcam_conv4_conv3" / "cases.csv"
        tables["Case threshold sweep (fused run's cases)"] = case_threshold_sweep(fused)
    if not args.skip_training:
        tables.update(training_ablations(args.budget, args.train_override))
    command = "python experiments/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(tables, command.strip(), time.time() - start)
    (OUT / "ablations.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
