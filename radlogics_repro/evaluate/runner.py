"""Evaluate trained models on a manifest split with ground truth, study by study.

Every study goes through the same :func:`radlogics_repro.analyze.analyze_study` a user runs, and
is compared with its reference masks:

* slice level: the classifier probability of every slice the analysis calls lung, against the
  slice's abnormal label (lesion area >= the classifier's ``min_lesion_area_mm2``); ROC, AUC with a
  95 % bootstrap CI resampled by patient;
* case level: the positive-slice ratio against the case label (any abnormal slice), AUC with CI,
  sensitivity/specificity at the stored case threshold and at the most specific threshold reaching
  98.2 % sensitivity (the paper's working point);
* lung segmentation: Dice per case at the study's own resolution, for all cases and for the
  *severe* subset (lesions >= :data:`SEVERE_INVOLVEMENT` of the reference lung volume);
* localization: Dice of the infection mask against the lesion mask (cases with lesions), pixel
  AUROC of the fine map inside the reference lung, pointing game (is the map's maximum inside a
  lesion) on positive slices that contain lesion;
* Corona Score against the reference lesion volume: Pearson, Spearman, Bland-Altman.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from radlogics_repro import analyze, data, io, preprocess
from radlogics_repro.evaluate import metrics as M

log = logging.getLogger(__name__)

SEVERE_INVOLVEMENT = 0.05
"""A case is *severe* when its reference lesion volume is at least 5 % of its lung volume."""


def is_severe(lesion_volume: float, lung_volume: float) -> bool:
    """Whether lesions fill at least :data:`SEVERE_INVOLVEMENT` of the lung (same units, e.g. mL and
    cm^3, or voxel counts); False for an empty lung."""
    return bool(lung_volume and lesion_volume / lung_volume >= SEVERE_INVOLVEMENT)


PAPER_SENSITIVITY = 0.982


@dataclass
class Evaluation:
    """Per-case and per-slice tables of one evaluated split (see the module docstring)."""

    cases: pd.DataFrame
    slices: pd.DataFrame


def evaluate_case(row: pd.Series, models: analyze.AnalysisModels,
                  settings: analyze.AnalysisSettings) -> tuple[dict, pd.DataFrame]:
    """Analyse one manifest row and compare with its reference masks."""
    study = io.load_study(row["image"])
    lung_ref = io.load_mask(row["lung_mask"], study) > 0
    lesion_ref = io.load_mask(row["lesion_mask"], study) > 0
    report = analyze.analyze_study(study, models, settings, case_id=str(row["case_id"]))
    min_lesion = models.classifier_card.get("min_lesion_area_mm2") or \
        preprocess.DEFAULT_MIN_LESION_AREA_MM2
    abnormal = preprocess.abnormal_slice_labels(lesion_ref, study.pixel_area_mm2, min_lesion)
    voxel_cm3 = study.voxel_volume_mm3 / 1000.0
    lesion_cm3 = float(lesion_ref.sum()) * voxel_cm3
    lung_ml = float(lung_ref.sum()) * voxel_cm3
    positive = report.slices["positive"].to_numpy(bool)
    pointing = [M.pointing_game(report.fine_map[z], lesion_ref[z])
                for z in np.flatnonzero(positive & lesion_ref.reshape(len(positive), -1).any(axis=1))]
    has_map = report.fine_map.max() > 0
    case = {
        "case_id": row["case_id"], "patient_id": row["patient_id"], "day": row.get("day", 0),
        "label": int(abnormal.any()), "reference_lesion_cm3": lesion_cm3,
        "reference_lung_ml": lung_ml,
        "severe": is_severe(lesion_cm3, lung_ml),
        "positive_slice_ratio": report.summary["decision"]["positive_slice_ratio"],
        "slice_threshold": report.summary["decision"]["slice_threshold"],
        "case_threshold": report.summary["decision"]["threshold"],
        "suspected_covid": report.summary["decision"]["suspected_covid"],
        "corona_score_cm3": report.summary["corona_score_cm3"],
        "infection_cm3": report.summary["volumes"]["infection_cm3"]["total"],
        "lung_dice": M.dice(report.lung_labels > 0, lung_ref),
        "lung_ml": report.summary["volumes"]["lung_ml"]["total"],
        "breath_phase": row.get("breath_phase", ""),
        "infection_dice": M.dice(report.infection_labels > 0, lesion_ref) if lesion_ref.any()
        else np.nan,
        "pixel_auroc": M.pixel_auroc(report.fine_map, lesion_ref, lung_ref)
        if lesion_ref.any() and has_map else np.nan,
        "pointing_hits": int(np.sum(pointing)), "pointing_slices": len(pointing),
        "seconds": sum(report.timings_s.values()),
    }
    lung_slices = report.slices[report.slices["contains_lung"]]
    slices = pd.DataFrame({
        "case_id": row["case_id"], "patient_id": row["patient_id"], "z": lung_slices["z"],
        "probability": lung_slices["probability"], "positive": lung_slices["positive"],
        "abnormal": abnormal[lung_slices["z"].to_numpy()].astype(int),
    })
    return case, slices


def evaluate_split(manifest: pd.DataFrame, split: str, models: analyze.AnalysisModels,
                   settings: analyze.AnalysisSettings, max_cases: int | None = None,
                   progress: bool = True) -> Evaluation:
    """Evaluate every study of ``split`` (see :func:`evaluate_case`)."""
    from tqdm import tqdm

    rows = data.split_rows(manifest, split, max_cases)
    cases, slices = [], []
    for _, row in tqdm(list(rows.iterrows()), desc=f"evaluate {split}", unit="study",
                       disable=not progress):
        case, case_slices = evaluate_case(row, models, settings)
        cases.append(case)
        slices.append(case_slices)
        log.info("%s: lung Dice %.3f, Corona %.1f cm^3 (reference lesions %.1f cm^3)",
                 case["case_id"], case["lung_dice"], case["corona_score_cm3"],
                 case["reference_lesion_cm3"])
    return Evaluation(pd.DataFrame(cases), pd.concat(slices, ignore_index=True))


def summarize(evaluation: Evaluation, n_boot: int = 1000) -> dict:
    """All headline metrics of an evaluation as one nested dict (thresholds: those the analysis
    used, i.e. the classifier's stored operating point and case threshold)."""
    cases, slices = evaluation.cases, evaluation.slices
    slice_threshold = float(cases["slice_threshold"].iloc[0])
    case_threshold = float(cases["case_threshold"].iloc[0])
    slice_ci = M.bootstrap_auc_ci(slices["abnormal"], slices["probability"], slices["patient_id"],
                                  n_boot=n_boot)
    case_ci = M.bootstrap_auc_ci(cases["label"], cases["positive_slice_ratio"], cases["patient_id"],
                                 n_boot=n_boot)
    out = {
        "n_cases": len(cases), "n_patients": int(cases["patient_id"].nunique()),
        "n_slices": len(slices),
        "slice": {"auc": M.auc(slices["abnormal"], slices["probability"]), "auc_ci95": slice_ci,
                  "at_stored_threshold": M.classification_summary(
                      slices["abnormal"], slices["probability"], slice_threshold)},
        "case": {"auc": M.auc(cases["label"], cases["positive_slice_ratio"]), "auc_ci95": case_ci,
                 "at_stored_threshold": M.classification_summary(
                     cases["label"], cases["positive_slice_ratio"], case_threshold)},
        "lung_dice": {"all_mean": float(cases["lung_dice"].mean()),
                      "all_min": float(cases["lung_dice"].min()),
                      "severe_mean": float(cases.loc[cases["severe"], "lung_dice"].mean())
                      if cases["severe"].any() else float("nan"),
                      "n_severe": int(cases["severe"].sum())},
        "localization": {
            "infection_dice_mean": float(cases["infection_dice"].mean()),
            "pixel_auroc_mean": float(cases["pixel_auroc"].mean()),
            "pointing_game": float(cases["pointing_hits"].sum() / cases["pointing_slices"].sum())
            if cases["pointing_slices"].sum() else float("nan")},
        "corona_vs_reference": M.agreement(cases["corona_score_cm3"], cases["reference_lesion_cm3"]),
        # the report's other volume (thresholded, blurred maps): does it track the lesions better?
        "infection_vs_reference": M.agreement(cases["infection_cm3"], cases["reference_lesion_cm3"]),
    }
    phases = cases["breath_phase"].isin(["inhale", "exhale"]) if "breath_phase" in cases else None
    if phases is not None and phases.any():
        from radlogics_repro.breath_phase import evaluate_breath_phase

        known = cases[phases]
        out["breath_phase"] = {
            "all_scans": evaluate_breath_phase(known, volume_column="lung_ml"),
            "longitudinal_patients": evaluate_breath_phase(known, volume_column="lung_ml",
                                                           longitudinal_only=True)}
    if cases["label"].nunique() == 2:
        t = M.threshold_for_sensitivity(cases["label"], cases["positive_slice_ratio"],
                                        PAPER_SENSITIVITY)
        out["case"]["at_98.2%_sensitivity"] = M.classification_summary(
            cases["label"], cases["positive_slice_ratio"], t)
    return out

