"""Metric functions and the training losses, against hand-computed values."""

import math

import numpy as np
import pytest

from radlogics_repro import losses
from radlogics_repro.evaluate import metrics as M


def test_dice_and_iou_hand_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True          # 4 px
    b[:2, :3] = True          # 6 px, overlap 4
    assert M.dice(a, b) == pytest.approx(2 * 4 / 10)
    assert M.iou(a, b) == pytest.approx(4 / 6)


def test_dice_of_empty_masks_is_defined():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert M.dice(empty, empty) == 1.0
    assert M.iou(empty, empty) == 1.0
    assert M.dice(empty, full) == 0.0


def test_dice_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 2\) vs \(3, 3\)"):
        M.dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_perfect_and_chance_classifier():
    labels = np.array([0, 0, 1, 1])
    assert M.auc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.auc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert M.auc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_sensitivity_specificity_and_summary_by_hand():
    labels = np.array([1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    sens, spec = M.sensitivity_specificity(labels, scores, 0.5)
    assert sens == pytest.approx(2 / 3) and spec == pytest.approx(1 / 2)
    summary = M.classification_summary(labels, scores, 0.5)
    assert (summary["tp"], summary["fp"], summary["fn"], summary["tn"]) == (2, 1, 1, 1)
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # AUC: positive-negative pairs ranked right: (0.9>0.7, 0.9>0.1, 0.6>0.1, 0.2>0.1) = 4 of 6
    assert summary["auc"] == pytest.approx(4 / 6)


def test_thresholds_from_the_roc_curve():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9])
    # Youden J: at 0.7 sens 3/4, spec 1 -> 0.75; at 0.5 sens 1, spec 2/3 -> 0.667; at 0.8 -> 0.5
    assert M.youden_threshold(labels, scores) == pytest.approx(0.7)
    t = M.threshold_for_sensitivity(labels, scores, 1.0)
    assert t == pytest.approx(0.5)
    assert M.sensitivity_specificity(labels, scores, t) == (1.0, pytest.approx(2 / 3))
    assert M.threshold_for_sensitivity(labels, scores, 0.5) == pytest.approx(0.8)


def test_soft_dice_and_loss_by_hand():
    y_true = np.zeros((1, 2, 2, 1), np.float32)
    y_true[0, 0, :, 0] = 1.0                      # 2 pixels
    y_pred = np.full((1, 2, 2, 1), 0.5, np.float32)
    # intersection 1.0, sums 2 + 2: (2*1 + 1) / (4 + 1) = 0.6
    assert float(losses.soft_dice(y_true, y_pred)[0]) == pytest.approx(0.6)
    bce = -math.log(0.5)
    assert float(losses.dice_bce_loss(y_true, y_pred)[0]) == pytest.approx(0.4 + bce, rel=1e-4)


def test_dice_metric_hard_threshold_and_empty_case():
    metric = losses.DiceScore()
    y_true = np.zeros((2, 2, 2, 1), np.float32)
    y_pred = np.zeros((2, 2, 2, 1), np.float32)
    y_true[0, 0, 0, 0] = 1
    y_pred[0, 0, :, 0] = 0.9   # 2 predicted, 1 overlapping: Dice 2/3; image 2 empty/empty: 1
    metric.update_state(y_true, y_pred)
    assert float(metric.result()) == pytest.approx((2 / 3 + 1) / 2)


def test_bootstrap_ci_contains_the_point_estimate_and_resamples_patients():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(20), 5)
    labels = (groups % 2).astype(int)
    scores = labels * 0.6 + rng.random(100)
    low, high = M.bootstrap_auc_ci(labels, scores, groups, n_boot=300, seed=2)
    point = M.auc(labels, scores)
    assert low <= point <= high and high - low > 0.01
    perfect = M.bootstrap_auc_ci(labels, labels.astype(float), groups, n_boot=50)
    assert perfect == (1.0, 1.0)
    assert all(math.isnan(v) for v in M.bootstrap_auc_ci(np.ones(4), np.ones(4), np.arange(4)))


def test_pointing_game_and_pixel_auroc():
    lesion = np.zeros((4, 4), bool)
    lesion[1, 1] = True
    heat = np.zeros((4, 4))
    heat[1, 1] = 1.0
    assert M.pointing_game(heat, lesion)
    heat[3, 3] = 2.0
    assert not M.pointing_game(heat, lesion)
    assert not M.pointing_game(np.zeros((4, 4)), lesion)
    ramp = np.zeros((4, 4))
    ramp[1, 1] = 0.9
    assert M.pixel_auroc(ramp, lesion) == 1.0


def test_agreement_by_hand():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    measured = reference + 1.0
    out = M.agreement(measured, reference)
    assert out["pearson_r"] == pytest.approx(1.0) and out["spearman_rho"] == pytest.approx(1.0)
    assert out["bias"] == pytest.approx(1.0)
    assert out["loa_low"] == pytest.approx(1.0) and out["loa_high"] == pytest.approx(1.0)
