"""The Corona Score with the fine maps over the whole lung crop (METHOD.md read literally) and with
the maps set to 0 outside the segmented lung: agreement with the reference lesion volume.

    python experiments/corona_within_lung.py --lung-run runs/lung_unet/<run> \
        --classifier-run runs/classifier/<run> \
        --data val=~/.cache/radlogics_repro/synthetic/large/manifest.csv:val \
        --data holdout=~/.cache/radlogics_repro/synthetic/holdout/manifest.csv:test \
        --out results/corona_within_lung.md

The classifier's input is the lung's bounding box with a margin, so its Grad-CAM maps also cover the
chest wall, the mediastinum and the margin around the lungs; summed over a positive slice they count
tissue that cannot be infected lung. Every study goes once through
:func:`radlogics_repro.analyze.analyze_study` with ``map_within_lung=False`` (the whole-crop score)
and ``map_scale="per_slice"`` (the maps its results file was made with; fixed scales are compared in
experiments/corona_map_scale.py);
the within-lung score is the same sum over the pixels of the segmented lung only, which is what
``map_within_lung=True`` computes (tests/test_analyze.py). Per dataset: Pearson r, Spearman rho and
the Bland-Altman bias against the reference lesion volume (cm^3). Choose on a validation split; the
held-out split reports. Per-case values go to a CSV beside the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lung_dice import (  # noqa: E402
    dataset_rows,
    named_path,
    produced_by,
    refuse_existing,
    script_start,
    write_result,
)
from paper_tables import model_file, model_runs  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, analyze, io  # noqa: E402
from radlogics_repro.evaluate import metrics as M  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402

SCORES = {"whole_crop_cm3": "whole lung crop (METHOD.md literally)",
          "within_lung_cm3": "within the segmented lung"}


def case_scores(row: pd.Series, models: analyze.AnalysisModels) -> dict:
    """Both Corona Scores (cm^3) of one manifest row and its reference lesion volume (cm^3)."""
    study = io.load_study(row["image"])
    lesion = io.load_mask(row["lesion_mask"], study) > 0
    settings = analyze.AnalysisSettings(map_within_lung=False, map_scale="per_slice")
    report = analyze.analyze_study(study, models, settings, case_id=str(row["case_id"]))
    positive = report.slices["positive"].to_numpy(bool)
    lung = report.lung_labels[positive] > 0
    within = report.fine_map[positive].astype(np.float64)[lung].sum()
    voxel_cm3 = study.voxel_volume_mm3 / 1000.0
    return {"case_id": row["case_id"], "patient_id": row["patient_id"],
            "reference_lesion_cm3": float(lesion.sum()) * voxel_cm3,
            "whole_crop_cm3": report.summary["corona_score_cm3"],
            "within_lung_cm3": float(within) * voxel_cm3,
            "positive_slices": int(positive.sum())}


def agreement_rows(dataset: str, cases: pd.DataFrame) -> list[dict]:
    """One table row per score: Pearson, Spearman, Bland-Altman bias and limits (cm^3)."""
    out = []
    for column, label in SCORES.items():
        a = M.agreement(cases[column].to_numpy(float), cases["reference_lesion_cm3"].to_numpy(float))
        out.append({"data": dataset, "map summed": label, "Pearson r": a["pearson_r"],
                    "Spearman rho": a["spearman_rho"], "bias cm^3": a["bias"],
                    "95% limits cm^3": f"[{a['loa_low']:.1f}, {a['loa_high']:.1f}]",
                    "scans": len(cases), "patients": int(cases["patient_id"].nunique())})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lung-run", type=Path, help="lung U-Net run folder (default: newest)")
    parser.add_argument("--classifier-run", type=Path, help="classifier run folder (default: newest)")
    parser.add_argument("--data", action="append", required=True,
                        type=lambda t: named_path(t, "--data"), help="NAME=MANIFEST[:SPLIT]")
    parser.add_argument("--max-scans", type=int, help="at most this many scans per dataset")
    parser.add_argument("--out", type=Path, default=Path("results/corona_within_lung.md"))
    args = parser.parse_args(argv)
    if refuse_existing(args.out):
        return 2
    started = script_start()
    lung_dir, classifier_dir = model_runs(args.lung_run, args.classifier_run)
    models = analyze.load_analysis_models(str(lung_dir / "model.keras"),
                                          str(classifier_dir / "model.keras"),
                                          precision=analyze.AnalysisSettings().precision)
    per_case, table = [], []
    for name, spec in args.data:
        rows, manifest, split = dataset_rows(spec, args.max_scans)
        cases = pd.DataFrame([case_scores(row, models) for _, row in rows.iterrows()])
        print(f"{name}: {len(cases)} scans from {manifest}:{split}", flush=True)
        table += agreement_rows(name, cases)
        per_case.append(cases.assign(data=name))
    text = "\n\n".join([
        "# The Corona Score over the whole lung crop and within the segmented lung",
        f"_{RESEARCH_USE_NOTICE}_",
        produced_by("corona_within_lung.py", argv, started),
        f"Models: lung `{model_file(lung_dir)}`, classifier `{model_file(classifier_dir)}`. "
        "Both scores come from the same analysis of each scan (same positive slices, same fine "
        "maps); only the pixels summed differ. Reference: the phantom's lesion mask volume.",
        frame_markdown(pd.DataFrame(table)),
    ]) + "\n"
    write_result(args.out, text, per_case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
