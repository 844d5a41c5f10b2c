"""Metric functions on plain numpy arrays (no models, no config). ROC/AUC come from scikit-learn.

Conventions:
* Dice of two empty masks is 1.0 (perfect agreement that there is nothing); Dice of an empty and a
  non-empty mask is 0.0.
* Scores are probabilities or any monotone score; higher means "more likely positive".
* Sensitivity = TP / (TP + FN), specificity = TN / (TN + FP); NaN when the class is absent.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice ``2 |A & B| / (|A| + |B|)`` of two boolean masks of equal shape (nonzero = inside)."""
    a, b = _same_shape_bool(a, b)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    a, b = _same_shape_bool(a, b)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(a, b).sum()) / union


def _same_shape_bool(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a.astype(bool), b.astype(bool)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn); NaN when only one class is present."""
    labels = np.asarray(labels).astype(int)
    if np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, float)))


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray, threshold: float
                            ) -> tuple[float, float]:
    """Sensitivity and specificity when ``score >= threshold`` is called positive."""
    labels = np.asarray(labels).astype(bool)
    called = np.asarray(scores, float) >= threshold
    positives, negatives = labels.sum(), (~labels).sum()
    sens = float((called & labels).sum() / positives) if positives else float("nan")
    spec = float((~called & ~labels).sum() / negatives) if negatives else float("nan")
    return sens, spec


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on the ROC curve."""
    fpr, tpr, thresholds = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, float),
                                     drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (0..1), i.e. the most specific
    working point that still finds that share of the positives."""
    fpr, tpr, thresholds = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, float),
                                     drop_intermediate=False)
    reaching = np.flatnonzero(tpr >= target)
    return float(min(thresholds[reaching[0]], 1.0))


def classification_summary(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """AUC, and sensitivity/specificity/accuracy/F1 at ``threshold``, plus the counts."""
    labels = np.asarray(labels).astype(bool)
    called = np.asarray(scores, float) >= threshold
    tp = int((called & labels).sum())
    fp = int((called & ~labels).sum())
    fn = int((~called & labels).sum())
    tn = int((~called & ~labels).sum())
    sens, spec = sensitivity_specificity(labels, scores, threshold)
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    return {
        "auc": auc(labels, scores), "threshold": float(threshold), "sensitivity": sens,
        "specificity": spec, "accuracy": (tp + tn) / max(labels.size, 1), "f1": f1,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": int(labels.size),
    }
