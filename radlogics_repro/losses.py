"""Training losses and metrics for the lung U-Net (Keras, registered so saved models reload).

Loss: soft Dice + binary cross-entropy, equally weighted. BCE gives well-behaved per-pixel gradients
from the first step; the Dice term counters the class imbalance (lung is ~10-25 % of a slice) and
optimises the overlap we report. The soft Dice is computed per image and averaged over the batch,
with smoothing 1 so a slice with no lung and no prediction scores 1 instead of 0/0.
"""

from __future__ import annotations

import keras
from keras import ops

SMOOTH = 1.0


@keras.saving.register_keras_serializable(package="radlogics_repro")
def soft_dice(y_true, y_pred):
    """Per-image soft Dice ``(2 |A.B| + 1) / (|A| + |B| + 1)``, shape ``(batch,)``.

    Args:
        y_true: ``(B, H, W, 1)`` in {0, 1}.
        y_pred: ``(B, H, W, 1)`` probabilities.
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    axes = (1, 2, 3)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return (2.0 * intersection + SMOOTH) / (total + SMOOTH)


@keras.saving.register_keras_serializable(package="radlogics_repro")
def dice_bce_loss(y_true, y_pred):
    """``(1 - soft Dice) + binary cross-entropy``, one value per image ``(batch,)``."""
    bce = ops.mean(
        keras.losses.binary_crossentropy(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")),
        axis=(1, 2),
    )
    return (1.0 - soft_dice(y_true, y_pred)) + bce


@keras.saving.register_keras_serializable(package="radlogics_repro")
class DiceScore(keras.metrics.Mean):
    """Mean hard Dice over images, predictions thresholded at 0.5 (empty vs empty scores 1)."""

    def __init__(self, name="dice", threshold=0.5, **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold

    def update_state(self, y_true, y_pred, sample_weight=None):
        hard = ops.cast(ops.greater_equal(y_pred, self.threshold), "float32")
        y_true = ops.cast(y_true, "float32")
        axes = (1, 2, 3)
        intersection = ops.sum(y_true * hard, axis=axes)
        total = ops.sum(y_true, axis=axes) + ops.sum(hard, axis=axes)
        dice = ops.where(total > 0, 2.0 * intersection / ops.maximum(total, 1e-7), 1.0)
        return super().update_state(dice, sample_weight=sample_weight)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}
