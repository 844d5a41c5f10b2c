"""Lung segmentation of a whole study with the trained U-Net, in the study's own pixel grid.

:func:`segment_lungs` windows and resizes every slice exactly as training did
(:func:`radlogics_repro.preprocess.hu_slices_to_model_input`), runs the U-Net in batches, resizes the
probabilities back to the slice size (bilinear) and thresholds them at 0.5. Post-processing (on by
default, as lungmask does): keep the largest 3D connected component and the second largest when it
is at least :data:`MIN_SECOND_LUNG_FRACTION` of the largest (the other lung), drop everything else
(bowel gas, trachea fragments, table artefacts), then fill holes slice by slice (vessels and dense
lesions inside the lung that the network may leave out).

Right/left labels (``label_sides=True``): canonical arrays have x increasing toward the patient's
left, so the component whose centre lies at lower x is the right lung (1), the other the left (2).
When the lungs touch and form one component, each slice is split at the midpoint between the
leftmost and rightmost lung pixel of that slice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from scipy import ndimage

from radlogics_repro import io, preprocess

log = logging.getLogger(__name__)

MIN_SECOND_LUNG_FRACTION = 0.05
RIGHT_LUNG, LEFT_LUNG = 1, 2


def lung_probabilities(hu: np.ndarray, model, *, batch_size: int = 16,
                       input_size: int = preprocess.MODEL_INPUT_SIZE) -> np.ndarray:
    """U-Net lung probability per pixel for every slice, in the slices' own size.

    Args:
        hu: ``(Z, H, W)`` HU.
        model: the lung U-Net (input ``(N, S, S, 3)`` in [0, 1], output ``(N, S, S, 1)``).

    Returns:
        float32 ``(Z, H, W)`` in [0, 1].
    """
    height, width = hu.shape[1:]
    out = np.empty(hu.shape, np.float32)
    for start in range(0, hu.shape[0], batch_size):
        batch = preprocess.hu_slices_to_model_input(hu[start:start + batch_size], input_size)
        probs = model(batch, training=False)
        out[start:start + batch_size] = tf.image.resize(
            tf.cast(probs, tf.float32), (height, width), method="bilinear")[..., 0].numpy()
    return out


def keep_lung_components(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 3D component and the second largest if it is at least
    :data:`MIN_SECOND_LUNG_FRACTION` of the first. bool ``(Z, H, W)`` -> bool."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= MIN_SECOND_LUNG_FRACTION * sizes[order[0]]:
        keep.append(order[1] + 1)
    return np.isin(labels, keep)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in every axial slice. bool ``(Z, H, W)`` -> bool."""
    return np.stack([ndimage.binary_fill_holes(s) for s in mask]) if mask.size else mask


def label_right_left(mask: np.ndarray) -> np.ndarray:
    """Lung mask -> uint8 labels, right lung 1 and left lung 2 (see the module docstring)."""
    labels, n = ndimage.label(mask)
    out = np.zeros(mask.shape, np.uint8)
    if n >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        first, second = np.argsort(sizes)[::-1][:2] + 1
        cx = [np.argwhere(labels == c)[:, 2].mean() for c in (first, second)]
        right, left = (first, second) if cx[0] < cx[1] else (second, first)
        out[labels == right] = RIGHT_LUNG
        out[labels == left] = LEFT_LUNG
        return out
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        cols = np.flatnonzero(mask[z].any(axis=0))
        middle = (cols[0] + cols[-1]) / 2.0
        right = np.zeros(mask.shape[1:], bool)
        right[:, : int(np.floor(middle)) + 1] = True
        out[z][mask[z] & right] = RIGHT_LUNG
        out[z][mask[z] & ~right] = LEFT_LUNG
    return out


def segment_lungs(study: io.Study, model, *, batch_size: int = 16, postprocess: bool = True,
                  label_sides: bool = False, input_size: int = preprocess.MODEL_INPUT_SIZE
                  ) -> np.ndarray:
    """Lung mask of a study in its own geometry.

    Args:
        study: the CT study (``hu`` ``(Z, H, W)``).
        model: the trained lung U-Net.
        batch_size: slices per forward pass.
        postprocess: keep the lung components and fill holes (see module docstring).
        label_sides: right = 1, left = 2 instead of 0/1.

    Returns:
        uint8 ``(Z, H, W)``: 0 background, 1 lung (or 1 right / 2 left).
    """
    mask = lung_probabilities(study.hu, model, batch_size=batch_size, input_size=input_size) >= 0.5
    if postprocess:
        mask = fill_holes_per_slice(keep_lung_components(mask))
    if label_sides:
        return label_right_left(mask)
    return mask.astype(np.uint8)


def lung_volumes_ml(labels: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict[str, float]:
    """Lung volumes in mL from a labelled mask (1 right, 2 left) and voxel spacing (z, y, x) mm."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    right = float(np.count_nonzero(labels == RIGHT_LUNG)) * voxel_ml
    left = float(np.count_nonzero(labels == LEFT_LUNG)) * voxel_ml
    return {"total": right + left, "right": right, "left": left}


def load_lung_segmenter(model_path: str, batch_size: int = 16) -> Callable[[io.Study], np.ndarray]:
    """A ``study -> uint8 lung mask`` function backed by a saved U-Net (``.keras``)."""
    from radlogics_repro import models

    model = models.load_model(model_path)
    size = int(model.input_shape[1])
    return lambda study: segment_lungs(study, model, batch_size=batch_size, input_size=size)
