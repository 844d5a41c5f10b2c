"""Lung segmentation U-Net with an ImageNet VGG16 encoder (METHOD.md section 2).

Architecture (224 x 224 input; sizes scale with the input)::

    image (H, W, 3) in [0, 1]
      -> imagenet_preprocess (x*255, RGB->BGR, minus ImageNet mean; ImageNetCaffePreprocess)
      -> VGG16 encoder, layers of this model under their Keras names:
           block1_conv2 (224, 64) --------------------------------------------+ skip
           block2_conv2 (112, 128) ----------------------------------+ skip   |
           block3_conv3 (56, 256) ---------------------+ skip        |        |
           block4_conv3 (28, 512) -----------+ skip    |             |        |
           block5_conv3 (14, 512) bottleneck  |         |             |        |
      -> decoder1: up x2 (28), concat block4_conv3, 2 x (3x3 conv, BN, ReLU), decoder_filters[0]
      -> decoder2: up x2 (56), concat block3_conv3, ...                       decoder_filters[1]
      -> decoder3: up x2 (112), concat block2_conv2, ...                      decoder_filters[2]
      -> decoder4: up x2 (224), concat block1_conv2, ...                      decoder_filters[3]
      -> lung_mask: 1x1 conv, sigmoid, float32 -> (H, W, 1) lung probability

The bottleneck is block5_conv3 (14 x 14 at 224), not block5_pool: the pooled 7 x 7 map would need a
fifth up-sampling level without a matching skip. Up-sampling is ``UpSampling2D(interpolation=
"bilinear")`` rather than ``Conv2DTranspose``: no parameters, no checkerboard artefacts, and the
two 3x3 convolutions that follow learn the mixing. Decoder convolutions have no bias (BatchNorm
follows).

The head's bias starts at 0 (p = 0.5). Starting it at the lung prior (logit of 0.1) was tried: the
loss fell much faster and at 112 px the val Dice rose. At 224 px, though, the whole-scan Dice on
held-out patients fell from 0.910 to 0.854, so it was left out (results/train_lung_unet.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from radlogics_repro.models.weights import (
    ImageNetCaffePreprocess,
    attach_init_record,
    resolve_backbone,
)

ENCODER_SKIPS = ("block4_conv3", "block3_conv3", "block2_conv2", "block1_conv2")
"""VGG16 layers whose outputs feed the decoder levels 1..4 (28, 56, 112, 224 at a 224 input)."""

BOTTLENECK = "block5_conv3"
"""VGG16 layer at the bottom of the U (14 x 14 x 512 at a 224 input)."""

DEFAULT_DECODER_FILTERS = (256, 128, 64, 32)


def _conv_bn_relu(x, filters: int, name: str):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"lung U-Net input_shape must be (H, W, 3), got {shape}")
    height, width = shape[:2]
    if height < 32 or width < 32 or height % 16 or width % 16:
        raise ValueError(
            f"lung U-Net input height and width must be multiples of 16 and >= 32 (the bottleneck "
            f"is 1/16 of the input), got {shape}"
        )
    return shape


def build_lung_unet(
    input_shape: Sequence[int] = (224, 224, 3),
    encoder_weights="imagenet",
    decoder_filters: Sequence[int] = DEFAULT_DECODER_FILTERS,
    require_pretrained: bool = False,
    weights_config_key: str = "model.weights",
) -> keras.Model:
    """Build the lung U-Net (model name ``lung_unet``).

    Args:
        input_shape: (H, W, 3); H and W multiples of 16, at least 32. The model takes the windowed
            slice (HU clipped to [-1000, 0], scaled to [0, 1]) repeated on 3 channels, values in
            [0, 1]: the VGG16 ImageNet preprocessing (``keras.applications.vgg16.preprocess_input``
            of ``255 * x``) is the model's first layer, ``imagenet_preprocess``.
        encoder_weights: ``"imagenet"``, a local weights file, or None / ``"random"``; see
            :func:`radlogics_repro.models.weights.resolve_backbone`.
        decoder_filters: widths of the 4 decoder levels, from the 28 x 28 level (at a 224 input)
            up to the full-resolution level.
        require_pretrained: raise instead of falling back to random encoder weights.
        weights_config_key: configuration key named in weight messages.

    Returns:
        Functional model, input (N, H, W, 3) float, output (N, H, W, 1) float32 lung probability.
        The VGG16 layers (``block1_conv1`` ... ``block5_conv3``) are layers of this model itself;
        the encoder init record is available via ``models.weights.init_record(model)``.
    """
    shape = _check_input_shape(input_shape)
    decoder_filters = tuple(int(f) for f in decoder_filters)
    if len(decoder_filters) != len(ENCODER_SKIPS) or min(decoder_filters) < 1:
        raise ValueError(
            "decoder_filters must be 4 positive widths (one per decoder level), "
            f"got {decoder_filters}"
        )

    # Input and ImageNet preprocessing ------------------------------------------------------
    image = keras.Input(shape=shape, name="image")
    x = ImageNetCaffePreprocess(name="imagenet_preprocess")(image)

    # VGG16 encoder, built on this graph so its layers are ours -------------------------------
    encoder, record = resolve_backbone(
        "vgg16",
        weights=encoder_weights,
        input_tensor=x,
        require_pretrained=require_pretrained,
        config_key=weights_config_key,
    )
    x = encoder.get_layer(BOTTLENECK).output

    # Decoder: up-sample, concatenate the skip, two conv-BN-ReLU -------------------------------
    levels = zip(ENCODER_SKIPS, decoder_filters, strict=True)
    for level, (skip_name, filters) in enumerate(levels, start=1):
        name = f"decoder{level}"
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_up")(x)
        x = layers.Concatenate(name=f"{name}_concat")([x, encoder.get_layer(skip_name).output])
        x = _conv_bn_relu(x, filters, f"{name}_1")
        x = _conv_bn_relu(x, filters, f"{name}_2")

    # Head: one sigmoid channel, float32 even under mixed precision ---------------------------
    mask = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="lung_mask")(x)
    model = keras.Model(image, mask, name="lung_unet")
    return attach_init_record(model, record)
