"""Slice classifier: ImageNet ResNet-50, original top removed, two dense layers, sigmoid (METHOD 3).

Architecture::

    image (H, W, 3) in [0, 1]  (the lung ROI crop, resized to 224 x 224, 3 channels)
      -> imagenet_preprocess (x*255, RGB->BGR, minus ImageNet mean; ImageNetCaffePreprocess)
      -> ResNet-50 (include_top=False), layers of this model under their Keras names
         (conv3_block4_out: 28 x 28 x 512, conv4_block6_out: 14 x 14 x 1024 at 224)
      -> head_gap: GlobalAveragePooling2D
      -> head_dense1 (ReLU) -> head_dropout1 -> head_dense2 (ReLU) -> head_dropout2
      -> covid_probability: Dense(1, sigmoid), float32

Dropout follows each hidden dense layer (so it sits between every pair of dense layers). The ResNet
layers are not wrapped in a nested sub-model: Grad-CAM tools look layers up by name on the
classifier itself (``model.get_layer("conv4_block6_out")``; tf-keras-vis issue #36).
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

GRADCAM_LAYERS = ("conv4_block6_out", "conv3_block4_out")
"""ResNet-50 activation layers whose maps (14 x 14, 28 x 28 at 224) the fine Grad-CAM combines."""

OUTPUT_NAME = "covid_probability"


def build_slice_classifier(
    input_shape: Sequence[int] = (224, 224, 3),
    weights="imagenet",
    dense_units: Sequence[int] = (256, 64),
    dropout: float = 0.3,
    require_pretrained: bool = False,
    weights_config_key: str = "model.weights",
) -> keras.Model:
    """Build the slice classifier (model name ``slice_classifier``).

    Args:
        input_shape: (H, W, 3), H and W >= 32. The model takes the [0, 1] three-channel lung crop;
            ResNet-50's ImageNet preprocessing (``keras.applications.resnet50.preprocess_input`` of
            ``255 * x``) is the model's first layer, ``imagenet_preprocess``.
        weights: backbone weights: ``"imagenet"``, a local weights file, or None / ``"random"``;
            see :func:`radlogics_repro.models.weights.resolve_backbone`.
        dense_units: widths of the hidden dense layers after global average pooling (the paper:
            two dense layers).
        dropout: dropout rate after each hidden dense layer, in [0, 1).
        require_pretrained: raise instead of falling back to random backbone weights.
        weights_config_key: configuration key named in weight messages.

    Returns:
        Functional model, input (N, H, W, 3), output (N, 1) float32 probability of an abnormal
        (COVID-19-like) slice. The backbone init record: ``models.weights.init_record(model)``.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 32:
        raise ValueError(f"slice classifier input_shape must be (H, W, 3), H, W >= 32; got {shape}")
    dense_units = tuple(int(u) for u in dense_units)
    if not dense_units or min(dense_units) < 1:
        raise ValueError(f"dense_units must be positive widths, got {dense_units}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    # Input and ImageNet preprocessing ------------------------------------------------------
    image = keras.Input(shape=shape, name="image")
    x = ImageNetCaffePreprocess(name="imagenet_preprocess")(image)

    # ResNet-50 backbone, built on this graph so its layers are ours ---------------------------
    backbone, record = resolve_backbone(
        "resnet50",
        weights=weights,
        input_tensor=x,
        require_pretrained=require_pretrained,
        config_key=weights_config_key,
    )

    # Head ------------------------------------------------------------------------------------
    x = layers.GlobalAveragePooling2D(name="head_gap")(backbone.output)
    for index, units in enumerate(dense_units, start=1):
        x = layers.Dense(units, activation="relu", name=f"head_dense{index}")(x)
        x = layers.Dropout(dropout, name=f"head_dropout{index}")(x)
    probability = layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
    model = keras.Model(image, probability, name="slice_classifier")
    return attach_init_record(model, record)
