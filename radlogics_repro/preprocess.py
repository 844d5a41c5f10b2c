"""Preprocessing shared by training and inference.

One module, so that what a model sees at training time is exactly what it sees on a study:

* HU slices -> :func:`window_hu` (clip to [-1000, 0] HU, scale to [0, 1]) -> :func:`resize_images`
  to 224 x 224 -> :func:`to_three_channels`. The encoder's own ImageNet preprocessing lives inside the
  models (a serialisable layer), so the models take the [0, 1] three-channel image.
* 8-bit display images (the real UCSD / MedSeg slice sets, already windowed by whoever exported them)
  -> :func:`gray_image_to_unit`; their HU values cannot be recovered, so no windowing happens there.
* The classifier's input is the lung region of interest: :func:`lung_bounding_box` gives a *square* box
  around the lung mask with a margin in mm (square, so resizing to 224 x 224 keeps the aspect ratio),
  :func:`crop_and_resize` cuts it out.

Array functions accept numpy arrays or tensors and return tensors (``.numpy()`` for arrays); they run
eagerly and inside ``tf.data.Dataset.map`` alike (both are tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

HU_WINDOW = (-1000.0, 0.0)
"""The paper's window for both networks, HU (lower, upper)."""

MODEL_INPUT_SIZE = 224
"""Side of the square network input, pixels."""

DEFAULT_MIN_LESION_AREA_MM2 = 25.0
"""A slice is *abnormal* when its lesion area is at least this many mm^2 (about a 6 mm spot):
smaller specks are below what a reader would call a finding on one slice."""

DEFAULT_MIN_LUNG_AREA_MM2 = 400.0
"""A slice *contains lung* when its lung area is at least this many mm^2 (2 x 2 cm): the apex and the
costophrenic tips below this carry too little lung for a slice decision."""

DEFAULT_CROP_MARGIN_MM = 10.0
"""Margin added around the lung bounding box before the square crop, mm."""


def window_hu(hu, lower: float = HU_WINDOW[0], upper: float = HU_WINDOW[1]) -> tf.Tensor:
    """Clip HU to ``[lower, upper]`` and scale linearly to [0, 1].

    Args:
        hu: array of any shape, Hounsfield units.
        lower, upper: window bounds, HU (``upper > lower``).

    Returns:
        float32 tensor of the same shape; ``lower`` -> 0, ``upper`` -> 1.
    """
    if not upper > lower:
        raise ValueError(f"window upper ({upper}) must be above lower ({lower})")
    x = tf.clip_by_value(tf.cast(hu, tf.float32), lower, upper)
    return (x - lower) / (upper - lower)


def gray_image_to_unit(image: np.ndarray) -> np.ndarray:
    """Turn an 8-bit display image (L, LA, RGB or RGBA, ``(H, W)`` or ``(H, W, C)``) into one grey
    float32 ``(H, W)`` image in [0, 1].

    Every image goes through the same conversion (ITU-R 601 luma for colour, alpha dropped), so that
    file type and image mode, which differ between the classes of some public sets, cannot become a
    shortcut for a classifier.
    """
    arr = np.asarray(image)
    if arr.ndim == 3:
        if arr.shape[2] in (2, 4):  # drop alpha
            arr = arr[..., :-1]
        if arr.shape[2] == 3:
            arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        else:
            arr = arr[..., 0]
    elif arr.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    scale = 65535.0 if np.asarray(image).dtype == np.uint16 else 255.0
    return np.clip(arr.astype(np.float32) / scale, 0.0, 1.0)


def resize_images(images, size: int = MODEL_INPUT_SIZE, *, nearest: bool = False) -> tf.Tensor:
    """Resize a batch of 2D images or masks to ``size x size``.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, C)``.
        nearest: nearest neighbour (for label masks) instead of bilinear with antialiasing.

    Returns:
        float32 tensor ``(N, size, size)`` or ``(N, size, size, C)``, matching the input rank.
    """
    x = tf.convert_to_tensor(images)
    squeeze = x.shape.rank == 3
    if squeeze:
        x = x[..., tf.newaxis]
    x = tf.cast(x, tf.float32)
    if nearest:
        x = tf.image.resize(x, (size, size), method="nearest")
    else:
        x = tf.image.resize(x, (size, size), method="bilinear", antialias=True)
    return x[..., 0] if squeeze else x


def to_three_channels(images) -> tf.Tensor:
    """``(..., H, W)`` or ``(..., H, W, 1)`` -> ``(..., H, W, 3)`` by repeating the grey channel."""
    x = tf.convert_to_tensor(images)
    if x.shape[-1] != 1:
        x = x[..., tf.newaxis]
    return tf.repeat(x, 3, axis=-1)


def hu_slices_to_model_input(hu_slices, size: int = MODEL_INPUT_SIZE) -> tf.Tensor:
    """The lung U-Net's input: ``(N, H, W)`` HU slices -> ``(N, size, size, 3)`` float32 in [0, 1]."""
    return to_three_channels(resize_images(window_hu(hu_slices), size))


@dataclass(frozen=True)
class Box:
    """A rectangle in a slice's pixel grid, half-open: rows ``[y0, y1)``, columns ``[x0, x1)``.

    May reach outside the image (a square box around a lung near the border); such pixels read as 0.
    """

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def lung_bounding_box(
    lung_mask_2d: np.ndarray,
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0),
    margin_mm: float = DEFAULT_CROP_MARGIN_MM,
) -> Box | None:
    """Square box around the lung pixels of one slice, with a margin.

    The tight box of the nonzero pixels is grown by ``margin_mm`` on every side (converted to
    pixels with the row/column spacing), then its shorter side is grown symmetrically to make it
    square (the model input is square; this keeps the anatomy's aspect ratio).

    Args:
        lung_mask_2d: ``(H, W)``, nonzero = lung.
        pixel_spacing_mm: (row, column) spacing, mm.
        margin_mm: margin, mm.

    Returns:
        The box, or None when the slice has no lung pixel.
    """
    rows = np.flatnonzero(np.any(lung_mask_2d, axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.any(lung_mask_2d, axis=0))
    my = int(round(margin_mm / pixel_spacing_mm[0]))
    mx = int(round(margin_mm / pixel_spacing_mm[1]))
    y0, y1 = rows[0] - my, rows[-1] + 1 + my
    x0, x1 = cols[0] - mx, cols[-1] + 1 + mx
    side = max(y1 - y0, x1 - x0)
    y0 -= (side - (y1 - y0)) // 2
    x0 -= (side - (x1 - x0)) // 2
    return Box(int(y0), int(y0 + side), int(x0), int(x0 + side))


def whole_slice_box(height: int, width: int) -> Box:
    """The square box centred on an ``height x width`` slice that contains all of it."""
    side = max(height, width)
    y0 = (height - side) // 2
    x0 = (width - side) // 2
    return Box(y0, y0 + side, x0, x0 + side)


def crop_and_resize(images, boxes: list[Box], size: int = MODEL_INPUT_SIZE, *,
                    nearest: bool = False) -> tf.Tensor:
    """Cut one box out of each image and resize it to ``size x size``.

    Pixel ``(i, j)`` of the output samples the input at row ``y0 + (i + 0.5) * h / size - 0.5``
    (pixel centres aligned, the same convention as :func:`tf.image.resize` and as
    :func:`paste_into_slice`, which maps back). Outside the image the value is 0.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, C)``.
        boxes: N boxes in pixel coordinates.
        nearest: nearest neighbour (masks) instead of bilinear.

    Returns:
        float32 ``(N, size, size)`` or ``(N, size, size, C)``.
    """
    x = tf.convert_to_tensor(images)
    squeeze = x.shape.rank == 3
    if squeeze:
        x = x[..., tf.newaxis]
    x = tf.cast(x, tf.float32)
    height, width = int(x.shape[1]), int(x.shape[2])
    if len(boxes) != int(x.shape[0]):
        raise ValueError(f"got {len(boxes)} boxes for {int(x.shape[0])} images")
    # crop_and_resize samples box corners at pixel centres: y = y1_n * (H - 1) ... y2_n * (H - 1).
    # For pixel-centre alignment, the first/last output centres sit half an output pixel inside
    # the box edges.
    norm = []
    for b in boxes:
        half_y = 0.5 * b.height / size
        half_x = 0.5 * b.width / size
        norm.append([
            (b.y0 + half_y - 0.5) / max(height - 1, 1),
            (b.x0 + half_x - 0.5) / max(width - 1, 1),
            (b.y1 - half_y - 0.5) / max(height - 1, 1),
            (b.x1 - half_x - 0.5) / max(width - 1, 1),
        ])
    out = tf.image.crop_and_resize(
        x,
        tf.constant(norm, tf.float32),
        tf.range(len(boxes)),
        (size, size),
        method="nearest" if nearest else "bilinear",
        extrapolation_value=0.0,
    )
    return out[..., 0] if squeeze else out


def paste_into_slice(map_2d: np.ndarray, box: Box, height: int, width: int) -> np.ndarray:
    """Map a ``(S, S)`` map computed on a crop back into the slice's own ``(height, width)`` grid.

    The inverse of :func:`crop_and_resize` for one box: the map is resized bilinearly to the box size
    (pixel centres aligned) and written where the box lies; the rest of the slice is 0.

    Returns:
        float32 ``(height, width)``.
    """
    resized = tf.image.resize(
        tf.convert_to_tensor(map_2d, tf.float32)[tf.newaxis, ..., tf.newaxis],
        (box.height, box.width),
        method="bilinear",
    )[0, ..., 0].numpy()
    out = np.zeros((height, width), np.float32)
    ys0, ys1 = max(box.y0, 0), min(box.y1, height)
    xs0, xs1 = max(box.x0, 0), min(box.x1, width)
    if ys1 > ys0 and xs1 > xs0:
        out[ys0:ys1, xs0:xs1] = resized[ys0 - box.y0 : ys1 - box.y0, xs0 - box.x0 : xs1 - box.x0]
    return out


def abnormal_slice_labels(
    lesion_mask: np.ndarray,
    pixel_area_mm2: float,
    min_lesion_area_mm2: float = DEFAULT_MIN_LESION_AREA_MM2,
) -> np.ndarray:
    """Per-slice abnormal label from a lesion mask.

    Args:
        lesion_mask: ``(z, y, x)``, nonzero = lesion (any class).
        pixel_area_mm2: in-plane pixel area, mm^2.
        min_lesion_area_mm2: lesion area from which a slice is abnormal, mm^2.

    Returns:
        bool ``(z,)``.
    """
    lesion_pixels = np.count_nonzero(lesion_mask.reshape(lesion_mask.shape[0], -1), axis=1)
    return lesion_pixels * pixel_area_mm2 >= min_lesion_area_mm2


def slices_with_lung(
    lung_mask: np.ndarray,
    pixel_area_mm2: float,
    min_lung_area_mm2: float = DEFAULT_MIN_LUNG_AREA_MM2,
) -> np.ndarray:
    """Which slices contain lung: bool ``(z,)``, lung area >= ``min_lung_area_mm2`` (mm^2)."""
    lung_pixels = np.count_nonzero(lung_mask.reshape(lung_mask.shape[0], -1), axis=1)
    return lung_pixels * pixel_area_mm2 >= min_lung_area_mm2
