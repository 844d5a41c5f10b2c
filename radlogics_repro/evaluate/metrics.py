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


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                     n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC, resampling *groups* (patients) with
    replacement, so that slices of one patient move together.

    Args:
        labels, scores: per item (slice or case).
        groups: per item, the patient it belongs to.
        n_boot: bootstrap replicates; replicates with a single class are skipped.
        level: coverage, e.g. 0.95.

    Returns:
        (lower, upper); NaN when fewer than two classes are present.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, float)
    groups = np.asarray(groups)
    if np.unique(labels).size < 2:
        return float("nan"), float("nan")
    unique = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in unique]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(unique), len(unique))])
        if np.unique(labels[pick]).size == 2:
            values.append(roc_auc_score(labels[pick], scores[pick]))
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def pointing_game(fine_map: np.ndarray, lesion_mask: np.ndarray) -> bool:
    """True when the map's maximum (first one in C order on ties) lies inside the lesion mask."""
    if fine_map.max() <= 0:
        return False
    return bool(np.asarray(lesion_mask).ravel()[int(np.argmax(fine_map))] > 0)


def pixel_auroc(fine_map: np.ndarray, lesion_mask: np.ndarray, region: np.ndarray | None = None
                ) -> float:
    """AUROC of map values as a pixel-wise lesion detector (inside ``region``, e.g. the lung)."""
    values = np.asarray(fine_map, float)
    truth = np.asarray(lesion_mask) > 0
    if region is not None:
        values, truth = values[np.asarray(region, bool)], truth[np.asarray(region, bool)]
    return auc(truth.ravel(), values.ravel())


def agreement(measured: np.ndarray, reference: np.ndarray) -> dict:
    """Pearson r, Spearman rho, and Bland-Altman bias and 95 % limits of agreement
    (mean difference +/- 1.96 SD of the differences, measured - reference)."""
    from scipy import stats

    measured = np.asarray(measured, float)
    reference = np.asarray(reference, float)
    if measured.size < 3 or np.std(measured) == 0 or np.std(reference) == 0:
        pearson = spearman = float("nan")
    else:
        pearson = float(stats.pearsonr(measured, reference)[0])
        spearman = float(stats.spearmanr(measured, reference)[0])
    diff = measured - reference
    bias = float(diff.mean()) if diff.size else float("nan")
    sd = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    return {"pearson_r": pearson, "spearman_rho": spearman, "bias": bias,
            "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd, "n": int(measured.size)}
