"""Training-time augmentation, as TensorFlow ops for ``tf.data.Dataset.map``.

Every function takes one example (no batch axis): an image ``(H, W, C)`` float32 in [0, 1] and, for
segmentation, its mask ``(H, W, 1)``. Geometric transforms move image and mask together, the mask
with nearest-neighbour sampling so labels stay labels. Randomness comes from stateless ops driven by
a per-example ``seed`` (shape (2,) int), so a pipeline with a fixed seed is repeatable.

Paper settings (METHOD.md):
* lung U-Net: random crop, horizontal flip, Gaussian noise inside the lung only
  (``noise_scale * N(mean, std)`` with scale 0.1, mean 0, std 0.8 on the [0, 1] image);
* classifier: rotation, horizontal flip, random crop; optionally (not in the paper) correlated
  scanner noise of another scanner's level (:func:`scanner_noise`).
"""

from __future__ import annotations

import math

import tensorflow as tf


def _seeds(seed, n: int) -> list[tf.Tensor]:
    """``n`` independent stateless seeds derived from one."""
    return list(tf.unstack(tf.random.experimental.stateless_split(seed, num=n)))


def random_crop(image, mask=None, *, seed, min_scale: float = 0.8):
    """Crop a random square-ish window covering ``min_scale..1`` of each side and resize it back.

    Args:
        image: ``(H, W, C)`` float32.
        mask: optional ``(H, W, 1)``; cropped identically and resized with nearest neighbour.
        seed: ``(2,)`` int32 stateless seed.
        min_scale: smallest crop side as a fraction of the image side.

    Returns:
        ``image`` (and ``mask``) with the input shapes.
    """
    s_scale, s_y, s_x = _seeds(seed, 3)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    scale = tf.random.stateless_uniform((), s_scale, min_scale, 1.0)
    crop_h = tf.cast(tf.round(scale * tf.cast(height, tf.float32)), tf.int32)
    crop_w = tf.cast(tf.round(scale * tf.cast(width, tf.float32)), tf.int32)
    y0 = tf.random.stateless_uniform((), s_y, 0, height - crop_h + 1, dtype=tf.int32)
    x0 = tf.random.stateless_uniform((), s_x, 0, width - crop_w + 1, dtype=tf.int32)
    out_image = tf.image.resize(image[y0 : y0 + crop_h, x0 : x0 + crop_w], (height, width))
    out_image = tf.ensure_shape(out_image, image.shape)
    if mask is None:
        return out_image
    out_mask = tf.image.resize(
        mask[y0 : y0 + crop_h, x0 : x0 + crop_w], (height, width), method="nearest"
    )
    return out_image, tf.ensure_shape(tf.cast(out_mask, mask.dtype), mask.shape)


def random_flip(image, mask=None, *, seed):
    """Mirror left-right with probability 0.5 (image and mask together)."""
    flip = tf.random.stateless_uniform((), seed) < 0.5
    out_image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    if mask is None:
        return out_image
    out_mask = tf.cond(flip, lambda: tf.reverse(mask, axis=[1]), lambda: mask)
    return out_image, out_mask


def random_rotation(image, mask=None, *, seed, max_degrees: float = 15.0):
    """Rotate about the image centre by a uniform angle in ``[-max_degrees, max_degrees]``.

    Bilinear for the image, nearest for the mask; pixels brought in from outside are 0 (air after
    windowing).
    """
    angle = tf.random.stateless_uniform(
        (), seed, -max_degrees * math.pi / 180.0, max_degrees * math.pi / 180.0
    )
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    # Output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotation about the centre.
    transform = tf.stack(
        [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
    )[tf.newaxis]

    def apply(x, interpolation):
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(x, tf.float32)[tf.newaxis],
            transforms=transform,
            output_shape=shape[:2],
            fill_value=0.0,
            interpolation=interpolation,
            fill_mode="CONSTANT",
        )[0]
        return tf.ensure_shape(tf.cast(out, x.dtype), x.shape)

    out_image = apply(image, "BILINEAR")
    if mask is None:
        return out_image
    return out_image, apply(mask, "NEAREST")


def lung_noise(image, lung_mask, *, seed, scale: float = 0.1, mean: float = 0.0,
               std: float = 0.8, probability: float = 1.0):
    """With ``probability``, add ``scale * N(mean, std)`` noise to the pixels inside the lung only,
    then clip to [0, 1]; otherwise return ``image`` unchanged.

    The paper's trick to keep the lung U-Net robust to dense, infected lungs. Noise on every
    training image gives the mask away: noisy pixels are lung pixels, and a network trained so
    segments the texture, which clean scans do not have (the synthetic val Dice of a model trained
    so rose from 0.868 to 0.961 when its inputs got the same noise; results/train_lung_unet.md).
    A probability below 1 keeps clean lungs in training, so the noise cannot stand for the label.

    Args:
        image: ``(H, W, C)`` float32 in [0, 1]; the same noise goes into every channel.
        lung_mask: ``(H, W, 1)``, nonzero = lung.
        seed: ``(2,)`` int32 stateless seed (the coin and the noise both follow from it).
        probability: chance that this image gets the noise, in [0, 1].
    """
    s_coin, s_noise = _seeds(seed, 2)
    noise = scale * tf.random.stateless_normal(tf.shape(image)[:2], s_noise, mean=mean, stddev=std)
    apply = tf.cast(tf.random.stateless_uniform([], s_coin) < probability, tf.float32)
    inside = tf.cast(lung_mask[..., 0] > 0, tf.float32) * apply
    return tf.clip_by_value(image + (noise * inside)[..., tf.newaxis], 0.0, 1.0)


def segmentation_augmenter(*, crop: bool, flip: bool, noise: bool, crop_min_scale: float = 0.8,
                           noise_scale: float = 0.1, noise_mean: float = 0.0,
                           noise_std: float = 0.8, noise_probability: float = 1.0):
    """An ``(image, mask, seed) -> (image, mask)`` function for the lung U-Net pipeline.

    Noise is added after the geometric transforms, with the transformed mask, so it lands inside
    the lung of the returned mask.
    """

    def augment(image, mask, seed):
        s_crop, s_flip, s_noise = _seeds(seed, 3)
        if crop:
            image, mask = random_crop(image, mask, seed=s_crop, min_scale=crop_min_scale)
        if flip:
            image, mask = random_flip(image, mask, seed=s_flip)
        if noise:
            image = lung_noise(image, mask, seed=s_noise, scale=noise_scale, mean=noise_mean,
                               std=noise_std, probability=noise_probability)
        return image, mask

    return augment


def _gaussian_kernel_1d(sigma_px: float) -> tf.Tensor:
    """A normalized 1D Gaussian (sum 1), truncated at 3 sigma; ``[1.0]`` for sigma 0."""
    radius = int(math.ceil(3.0 * sigma_px))
    if radius == 0:
        return tf.constant([1.0], tf.float32)
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma_px))
    return kernel / tf.reduce_sum(kernel)


def correlated_noise(shape, *, seed, sigma_px: float) -> tf.Tensor:
    """Unit-variance Gaussian noise ``(H, W)`` whose pixels are correlated like CT noise: white noise
    blurred by a Gaussian of ``sigma_px`` pixels (as a reconstruction kernel does), then rescaled
    so that its standard deviation is 1 again (away from the borders, which are zero-padded)."""
    kernel = _gaussian_kernel_1d(sigma_px)
    white = tf.random.stateless_normal(shape, seed)
    rows = tf.reshape(kernel, (-1, 1, 1, 1))
    cols = tf.reshape(kernel, (1, -1, 1, 1))
    blurred = tf.nn.conv2d(white[tf.newaxis, ..., tf.newaxis], rows, 1, "SAME")
    blurred = tf.nn.conv2d(blurred, cols, 1, "SAME")[0, ..., 0]
    # The 2D kernel is the outer product of the 1D one: sum of its squares = (sum k^2)^2.
    return blurred / tf.reduce_sum(tf.square(kernel))


def scanner_noise(image, *, seed, noise_hu: tuple[float, float] = (0.0, 120.0),
                  window_width_hu: float = 1000.0, sigma_px: float = 1.0,
                  probability: float = 0.5):
    """With ``probability``, add correlated Gaussian noise of a standard deviation drawn from
    ``noise_hu`` (HU) to the whole image, then clip to [0, 1]; otherwise return ``image`` unchanged.

    Scans from other scanners (sharper kernels, lower dose) are noisier than the training scans:
    the synthetic site of data/README.md has 90-130 HU against the default's 10-40 HU. Training on
    noisier copies teaches the classifier lesions that noise does not hide.

    Args:
        image: ``(H, W, C)`` float32 in [0, 1], a CT window ``window_width_hu`` wide (the
            classifier's [-1000, 0] HU window: 1000), so ``noise_hu / window_width_hu`` is the
            standard deviation on the [0, 1] scale, at the network's input resolution.
        seed: ``(2,)`` int32 stateless seed (the coin, the level and the noise follow from it).
        noise_hu: (low, high) HU range of the standard deviation.
        sigma_px: correlation of the noise, Gaussian sigma in pixels (0: white noise).
        probability: chance that this image gets noise, in [0, 1].
    """
    s_coin, s_level, s_noise = _seeds(seed, 3)
    level = tf.random.stateless_uniform((), s_level, float(noise_hu[0]), float(noise_hu[1]) + 1e-9)
    apply = tf.cast(tf.random.stateless_uniform((), s_coin) < probability, tf.float32)
    noise = correlated_noise(tf.shape(image)[:2], seed=s_noise, sigma_px=sigma_px)
    noise = noise * (apply * level / float(window_width_hu))
    return tf.clip_by_value(image + noise[..., tf.newaxis], 0.0, 1.0)


def classification_augmenter(*, rotate: bool, flip: bool, crop: bool, max_degrees: float = 15.0,
                             crop_min_scale: float = 0.85, noise: bool = False,
                             noise_hu: tuple[float, float] = (0.0, 120.0),
                             noise_sigma_px: float = 1.0, noise_probability: float = 0.5):
    """An ``(image, seed) -> image`` function for the slice classifier pipeline; ``noise`` adds
    :func:`scanner_noise` after the geometric transforms."""

    def augment(image, seed):
        s_rot, s_flip, s_crop = _seeds(seed, 3)   # as before the noise option: same images
        if rotate:
            image = random_rotation(image, seed=s_rot, max_degrees=max_degrees)
        if flip:
            image = random_flip(image, seed=s_flip)
        if crop:
            image = random_crop(image, seed=s_crop, min_scale=crop_min_scale)
        if noise:
            s_noise = tf.random.experimental.stateless_fold_in(seed, 1)
            image = scanner_noise(image, seed=s_noise, noise_hu=noise_hu, sigma_px=noise_sigma_px,
                                  probability=noise_probability)
        return image

    return augment


def random_intensity(image, *, seed, brightness: float = 0.2, contrast: float = 0.3,
                     gamma: float = 0.3, noise_std: float = 0.03):
    """Grey-level jitter for contrastive views: contrast about the mean, brightness shift, gamma,
    Gaussian noise; then clip to [0, 1].

    The CT analogue of SimCLR's colour distortion (a grey image has no hue or saturation): views of
    one slice differ in window, gain and noise, as scans of one patient on two scanners would.

    Args:
        image: ``(H, W, C)`` float32 in [0, 1]; one jitter for every channel.
        brightness: shift drawn from ``[-brightness, brightness]``.
        contrast: factor drawn from ``[1 - contrast, 1 + contrast]``.
        gamma: exponent drawn from ``[1 - gamma, 1 + gamma]``.
        noise_std: standard deviation of the pixel noise, on the [0, 1] scale.
    """
    s_b, s_c, s_g, s_n = _seeds(seed, 4)
    # In float64, rounded to float32 once at the end: in float32 the same seed gave results 1 ulp
    # apart from one run of the parallel tf.data pipeline to the next (the views must be a pure
    # function of the seed; tests/test_pretrain.py).
    shift = tf.random.stateless_uniform((), s_b, -brightness, brightness, dtype=tf.float64)
    factor = tf.random.stateless_uniform((), s_c, 1.0 - contrast, 1.0 + contrast, dtype=tf.float64)
    exponent = tf.random.stateless_uniform((), s_g, 1.0 - gamma, 1.0 + gamma, dtype=tf.float64)
    wide = tf.cast(image, tf.float64)
    mean = tf.reduce_mean(wide)
    out = tf.clip_by_value((wide - mean) * factor + mean + shift, 0.0, 1.0)
    out = tf.pow(out + 1e-6, exponent)
    noise = tf.random.stateless_normal(tf.shape(image)[:2], s_n, stddev=noise_std, dtype=tf.float64)
    return tf.cast(tf.clip_by_value(out + noise[..., tf.newaxis], 0.0, 1.0), image.dtype)


def contrastive_view_augmenter(*, crop_min_scale: float = 0.35, max_degrees: float = 20.0,
                               brightness: float = 0.2, contrast: float = 0.3, gamma: float = 0.3,
                               noise_std: float = 0.03):
    """An ``(image, seed) -> view`` function: one random view of a slice for contrastive
    pre-training (SimCLR-style: random resized crop, flip, rotation, grey-level jitter).

    The crop is much stronger than the classifier's (down to ``crop_min_scale`` of each side), so
    two views of one slice often show different parts of the lung: the network has to recognise
    the slice from local texture, which is what separates ground glass from normal lung.
    """

    def view(image, seed):
        s_crop, s_flip, s_rot, s_int = _seeds(seed, 4)
        image = random_crop(image, seed=s_crop, min_scale=crop_min_scale)
        image = random_flip(image, seed=s_flip)
        image = random_rotation(image, seed=s_rot, max_degrees=max_degrees)
        return random_intensity(image, seed=s_int, brightness=brightness, contrast=contrast,
                                gamma=gamma, noise_std=noise_std)

    return view
