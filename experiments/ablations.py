"""Run the ablations of METHOD.md / issue #6 and write one comparison table.

    python experiments/ablations.py [--lung-run runs/lung_unet/<run>] [--classifier-run runs/classifier/<run>]
        [--holdout-cases 6] [--budget ablation|smoke] [--skip-training] [--skip-analysis]
        [--init-ablation auto|always|never]

Two kinds of ablation:

* analysis-time, on trained models (the runs given, or the newest finished ones under ``runs/``),
  evaluated on held-out synthetic patients (``data=synthetic_holdout``) with
  ``radlogics_repro.evaluate``: Grad-CAM at 14x14 only vs 28x28 only vs fused
  (``analysis.gradcam_layers``); the case threshold sweep is read from the fused run's per-case
  table (no rerun needed). An evaluation found from an earlier call is reused only when it used the
  same two models;
* training-time, each a Hydra multirun of ``radlogics_repro.train`` at one reduced, stated budget
  (``trainer=ablation``; the classifier at 112 px on 36 patients per split, the U-Net on 6): a
  comparison between settings at equal cost, not converged models. Classifier input lung crop vs
  whole slice vs lung-masked (``data.input_mode``); the U-Net's lung-noise augmentation on none,
  half or all of the images (``augment.noise_probability``); ImageNet-pretrained vs random init
  (``model.weights=imagenet,null``), run by default only when the Keras ImageNet file is in the
  Keras cache: offline the ImageNet arm would fall back to random init and repeat the other arm.

Everything goes to ``results/ablations/``: the runs' own metrics, and ``ablations.md`` with the
command, commit, models and date. Runs that finished earlier are reused (Hydra run folders are
named by the override), so a killed script continues where it stopped.
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
sys.path.insert(0, str(ROOT / "experiments"))

import paper_tables  # noqa: E402
from summarize_run import run_wall_minutes  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, provenance  # noqa: E402
from radlogics_repro.evaluate.metrics import sensitivity_specificity  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402
from radlogics_repro.models.weights import cached_imagenet_file  # noqa: E402

OUT = ROOT / "results" / "ablations"
GRADCAM_VARIANTS = {
    "fused (14x14 x 28x28)": "[conv4_block6_out,conv3_block4_out]",
    "14x14 only (conv4_block6_out)": "[conv4_block6_out]",
    "28x28 only (conv3_block4_out)": "[conv3_block4_out]",
}
CASE_THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
# The training ablations' budget beside trainer=<budget>: the classifier at the first stage's
# resolution on half the patients, the U-Net on 6 of its 14 training patients.
CLASSIFIER_BUDGET = ("data.input_size=112", "trainer.max_cases_per_split=36")
UNET_BUDGET = ("trainer.max_cases_per_split=6",)


LAUNCHED: list[list[str]] = []  # what this call ran (the rest was reused)


def _run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    LAUNCHED.append(args)
    subprocess.run(args, cwd=ROOT, check=True)


def _python(module: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", module, *overrides]


# ---- analysis-time ------------------------------------------------------------------------------


def gradcam_ablation(lung_dir: Path, classifier_dir: Path, holdout_cases: int) -> pd.DataFrame:
    rows = []
    for label, layers in GRADCAM_VARIANTS.items():
        name = "gradcam_" + "_".join(part.split("_")[0] for part in layers.strip("[]").split(","))
        if not (OUT / name / "metrics.json").exists():
            LAUNCHED.append([name])
        done = paper_tables.evaluate(OUT / name, name, lung_dir, classifier_dir, holdout_cases,
                                     f"analysis.gradcam_layers={layers}", "n_boot=200")
        metrics = json.loads(done.read_text())["metrics"]
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
    run's metrics.json with the swept value under ``"value"`` and its wall time (min) under
    ``"minutes"``."""
    key = sweep.split("=")[0]
    sweep_dir = folder / f"{experiment}__{key}"
    expected = len(sweep.split("=", 1)[1].split(","))
    if len(list(sweep_dir.glob("job*/metrics.json"))) < expected:
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
        results.append({"value": value, "minutes": run_wall_minutes(metrics_file.parent),
                        "epochs": len(pd.read_csv(metrics_file.parent / "history.csv")),
                        **json.loads(metrics_file.read_text())})
    return results


def imagenet_file_cached(backbone: str = "resnet50") -> bool:
    """Whether the Keras ImageNet file of ``backbone`` (include_top=False) is in the Keras cache,
    so an ImageNet-initialised run would really start from it."""
    return cached_imagenet_file(backbone).is_file()


def run_init_ablation(choice: str, cached: bool) -> bool:
    """``--init-ablation``: ``always``, ``never``, or ``auto`` (only when the ImageNet file is cached)."""
    return choice == "always" or (choice == "auto" and cached)


def classifier_rows(runs: list[dict], key: str, init_column: str = "init") -> pd.DataFrame:
    return pd.DataFrame([{
        key: r["value"], init_column: r["init"], "val slice AUC": r["metrics"]["val"]["auc"],
        "test slice AUC": r["metrics"].get("test", {}).get("auc", np.nan),
        "epochs": r["epochs"], "minutes": r["minutes"]} for r in runs]).dropna(axis=1, how="all")


def training_ablations(budget: str, extra: list[str], init_ablation: bool) -> dict[str, pd.DataFrame]:
    folder = OUT / f"train_{budget}"
    tables = {}
    runs = _train_multirun("classifier", "data.input_mode=lung_crop,whole_slice,lung_masked", budget,
                           folder, [*CLASSIFIER_BUDGET, *extra])
    tables["Classifier input (training ablation)"] = classifier_rows(runs, "data.input_mode")
    runs = _train_multirun("lung_unet", "augment.noise_probability=0.0,0.5,1.0", budget, folder,
                           [*UNET_BUDGET, *extra])
    tables["U-Net lung-noise augmentation (training ablation; val Dice on clean slices)"] = pd.DataFrame([{
        "augment.noise_probability": r["value"], "init": r["init"],
        "val Dice (pooled)": r["metrics"]["val"]["dice_pooled"],
        "test Dice (pooled)": r["metrics"].get("test", {}).get("dice_pooled", np.nan),
        "epochs": r["epochs"], "minutes": r["minutes"]} for r in runs]).dropna(axis=1, how="all")
    if init_ablation:
        runs = _train_multirun("classifier", "model.weights=imagenet,null", budget, folder,
                               [*CLASSIFIER_BUDGET, *extra])
        tables["Classifier init (training ablation)"] = classifier_rows(runs, "model.weights",
                                                                        "init actually used")
    return tables


# ---- report -------------------------------------------------------------------------------------


def markdown(tables: dict[str, pd.DataFrame], command: str, seconds: float, notes: list[str]) -> str:
    env = provenance.environment()
    lines = [
        "# Ablations", "", f"**{RESEARCH_USE_NOTICE}**", "",
        f"Command: `{command}`  ",
        f"Commit {env['commit']}; {env['date']}; {env['machine']}; wall time {seconds / 60:.1f} min "
        f"({len(LAUNCHED)} evaluations or multiruns launched by this call, the others reused).",
        "Data: synthetic phantoms only (training: the experiments' own data; analysis-time ablations: "
        "the held-out patients of `data=synthetic_holdout`).", "", *notes, "",
    ]
    for title, table in tables.items():
        lines += [f"## {title}", "", frame_markdown(table), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lung-run", type=Path, default=None, help="default: the newest finished one")
    parser.add_argument("--classifier-run", type=Path, default=None, help="default: the newest finished one")
    parser.add_argument("--budget", default="ablation", help="trainer preset for the training ablations")
    parser.add_argument("--holdout-cases", type=int, default=6)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-analysis", action="store_true")
    parser.add_argument("--init-ablation", choices=("auto", "always", "never"), default="auto",
                        help="ImageNet vs random init; auto: only when the ImageNet file is cached")
    parser.add_argument("--train-override", action="append", default=[],
                        help="extra Hydra override for every training run (e.g. a data.manifest)")
    args = parser.parse_args(argv)
    start = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    tables, notes = {}, []
    if not args.skip_analysis:
        lung_dir, classifier_dir = paper_tables.model_runs(args.lung_run, args.classifier_run)
        notes.append(f"Analysis-time models: `{paper_tables.model_file(lung_dir)}`, "
                     f"`{paper_tables.model_file(classifier_dir)}`.")
        tables["Grad-CAM layers (held-out synthetic patients)"] = gradcam_ablation(
            lung_dir, classifier_dir, args.holdout_cases)
        fused = OUT / "gradcam_conv4_conv3" / "cases.csv"
        tables["Case threshold sweep (fused run's cases)"] = case_threshold_sweep(fused)
    if not args.skip_training:
        init_ablation = run_init_ablation(args.init_ablation, imagenet_file_cached())
        if not init_ablation:
            notes.append(f"ImageNet vs random init: not run (`{cached_imagenet_file('resnet50')}` is "
                         "absent, so both arms "
                         "would start from random weights). Self-supervised pre-training against "
                         "random init: results/pretraining.md.")
        notes.append(f"Training-time budget: `trainer={args.budget}` with "
                     f"{', '.join(f'`{o}`' for o in CLASSIFIER_BUDGET)} (classifier) and "
                     f"{', '.join(f'`{o}`' for o in UNET_BUDGET)} (U-Net); one run (one seed) per row, "
                     "so a difference smaller than the epoch-to-epoch swings in a run's history.csv "
                     "is not a finding. Runs finished by an earlier call are reused: their own "
                     "minutes are in the tables.")
        tables.update(training_ablations(args.budget, args.train_override, init_ablation))
    command = "python experiments/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(tables, command.strip(), time.time() - start, notes)
    (OUT / "ablations.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
