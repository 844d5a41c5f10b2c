"""Breath phase from lung volume: which scans of a patient were taken at expiration.

A chest CT is meant to be acquired at full inspiration; a scan taken at expiration holds much less
air (healthy adults exhale to roughly 50-70 % of their inspiratory CT lung volume), so its lung looks
denser and its lesion share larger, and a follow-up curve that mixes phases jumps. The rule of
:func:`breath_phases`:

* **several scans of one patient**: a scan is ``exhale`` when its total lung volume is below
  ``ratio`` (default :data:`EXHALE_RATIO` = 0.8) times the patient's largest scan. Inspiratory scans
  of one patient differ by a few percent (effort, disease), expiratory ones sit 30-50 % lower; 0.8
  lies between. The largest scan is taken to be at inspiration, so a patient scanned only at
  expiration is missed by this rule.
* **a single scan**: no reference of its own; it is ``exhale`` when its lung volume is below
  ``absolute_ml`` (default :data:`EXHALE_ABSOLUTE_ML` = 3000 mL), between typical adult expiratory
  (~2-3 L, near functional residual capacity) and inspiratory (~4-6 L, near total lung capacity) CT
  volumes. Body size moves both, so this fallback errs for small or large lungs; prefer
  several scans per patient.

Lung volumes come from lung masks (``analyze`` reports them, right and left, in mL; the synthetic
manifest has ``lung_volume_ml``). :func:`evaluate_breath_phase` scores the rule against the
synthetic generator's ground truth (``breath_phase`` column: ``inhale`` / ``exhale``), with
expiration as the positive class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

EXHALE_RATIO = 0.8
EXHALE_ABSOLUTE_ML = 3000.0
PHASES = ("inhale", "exhale")


def patient_breath_phases(volumes_ml: Sequence[float], *, ratio: float = EXHALE_RATIO,
                          absolute_ml: float = EXHALE_ABSOLUTE_ML) -> list[str]:
    """Phases of one patient's scans from their total lung volumes (mL), in the same order.

    Returns:
        ``"inhale"`` or ``"exhale"`` per scan (see the module docstring for the rule).

    Raises:
        ValueError: no scans, or a volume that is not a positive finite number.
    """
    volumes = np.asarray(volumes_ml, dtype=np.float64)
    if volumes.ndim != 1 or volumes.size == 0:
        raise ValueError(f"expected a list of lung volumes in mL, got {volumes_ml!r}")
    if not np.all(np.isfinite(volumes)) or np.any(volumes <= 0):
        raise ValueError(f"lung volumes must be positive mL, got {volumes.tolist()}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    threshold = absolute_ml if volumes.size == 1 else ratio * float(volumes.max())
    return ["exhale" if v < threshold else "inhale" for v in volumes]


def breath_phases(scans: pd.DataFrame, *, volume_column: str = "lung_volume_ml",
                  patient_column: str = "patient_id", ratio: float = EXHALE_RATIO,
                  absolute_ml: float = EXHALE_ABSOLUTE_ML) -> pd.Series:
    """Predicted phase of every scan (one row per scan), grouped by patient.

    Returns:
        A string Series aligned with ``scans.index``.
    """
    missing = [c for c in (volume_column, patient_column) if c not in scans.columns]
    if missing:
        raise KeyError(f"scans lack column(s) {missing}")
    out = pd.Series(index=scans.index, dtype=object)
    for _, group in scans.groupby(patient_column, sort=False):
        out.loc[group.index] = patient_breath_phases(group[volume_column].to_numpy(float),
                                                     ratio=ratio, absolute_ml=absolute_ml)
    return out.astype(str)


def evaluate_breath_phase(scans: pd.DataFrame, *, truth_column: str = "breath_phase",
                          volume_column: str = "lung_volume_ml", patient_column: str = "patient_id",
                          ratio: float = EXHALE_RATIO, absolute_ml: float = EXHALE_ABSOLUTE_ML,
                          longitudinal_only: bool = False) -> dict:
    """F1 of :func:`breath_phases` against the true phases, expiration being the positive class.

    Args:
        scans: one row per scan with the patient, the lung volume (mL) and the true phase.
        longitudinal_only: score only patients with at least two scans (the per-patient rule).

    Returns:
        ``{"f1", "precision", "recall", "accuracy", "tp", "fp", "fn", "tn", "n_scans",
        "n_patients", "ratio", "absolute_ml"}``; precision/recall/F1 are NaN when undefined (no
        predicted or no true expiration scans).
    """
    if truth_column not in scans.columns:
        raise KeyError(f"scans lack the truth column {truth_column!r}")
    bad = sorted(set(scans[truth_column].astype(str)) - set(PHASES))
    if bad:
        raise ValueError(f"unknown breath phase(s) {bad}; expected {PHASES}")
    if longitudinal_only:
        counts = scans.groupby(patient_column)[patient_column].transform("size")
        scans = scans[counts >= 2]
    predicted = breath_phases(scans, volume_column=volume_column, patient_column=patient_column,
                              ratio=ratio, absolute_ml=absolute_ml) == "exhale"
    truth = scans[truth_column].astype(str) == "exhale"
    tp = int(np.sum(predicted & truth))
    fp = int(np.sum(predicted & ~truth))
    fn = int(np.sum(~predicted & truth))
    tn = int(np.sum(~predicted & ~truth))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"f1": f1, "precision": precision, "recall": recall,
            "accuracy": (tp + tn) / len(scans) if len(scans) else float("nan"),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n_scans": int(len(scans)),
            "n_patients": int(scans[patient_column].nunique()), "ratio": ratio,
            "absolute_ml": absolute_ml}
