"""Analytic forward FLOPs of a Keras model, per input sample.

FLOPs are counted as 2 x multiply-accumulates (MACs) of the layers that dominate CNN cost, from the
layers' (static) input and output shapes:

* ``Conv1D/2D/3D``: out_positions x filters x prod(kernel) x in_channels / groups
* ``Conv1D/2D/3DTranspose``: in_positions x in_channels x prod(kernel) x filters
* ``DepthwiseConv1D/2D``: out_positions x in_channels x depth_multiplier x prod(kernel)
* ``SeparableConv1D/2D``: the depthwise part plus a 1x1 conv (out_positions x in_ch x dm x filters)
* ``Dense``: prod(non-batch input dims) x units (i.e. per position for Dense on >2-D tensors)

Everything else -- bias additions, BatchNormalization, activations, ``Add``, pooling, bilinear
up-sampling, concatenation, the ImageNet preprocessing layer -- is NOT counted: these are O(1)
operations per activation, below 1 % of the total for VGG16 / ResNet-50 / the U-Net. This is the
convention of the published figures: VGG16 convolutional part at 224 x 224 ~ 30.7 GFLOP, ResNet-50
~ 7.7 GFLOP. Nested models are counted through; a layer called several times (shared weights) is
counted once, for its first call. Layers with a ``kernel`` of an unsupported type are reported in
one warning and counted as 0.
"""

from __future__ import annotations

import logging
import math

import keras

logger = logging.getLogger(__name__)

_TRANSPOSE = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _spatial_and_channels(shape, data_format: str) -> tuple[int, int]:
    """(number of spatial positions, channels) of a per-sample shape (batch dim dropped)."""
    dims = [int(d) for d in shape[1:]]
    if data_format == "channels_first":
        return math.prod(dims[1:]), dims[0]
    return math.prod(dims[:-1]), dims[-1]


def layer_macs(layer: keras.layers.Layer) -> int | None:
    """Multiply-accumulates of one call of ``layer`` per sample; None when not a counted type."""
    if isinstance(layer, _TRANSPOSE):
        positions, in_channels = _spatial_and_channels(layer.input.shape, layer.data_format)
        return positions * in_channels * math.prod(layer.kernel_size) * layer.filters
    if isinstance(layer, _DEPTHWISE + _SEPARABLE):
        in_positions, in_channels = _spatial_and_channels(layer.input.shape, layer.data_format)
        out_positions, _ = _spatial_and_channels(layer.output.shape, layer.data_format)
        depthwise = (
            out_positions * in_channels * layer.depth_multiplier * math.prod(layer.kernel_size)
        )
        if isinstance(layer, _SEPARABLE):
            return depthwise + out_positions * in_channels * layer.depth_multiplier * layer.filters
        return depthwise
    if isinstance(layer, _CONV):
        _, in_channels = _spatial_and_channels(layer.input.shape, layer.data_format)
        out_positions, _ = _spatial_and_channels(layer.output.shape, layer.data_format)
        per_output = math.prod(layer.kernel_size) * in_channels // layer.groups
        return out_positions * layer.filters * per_output
    if isinstance(layer, keras.layers.Dense):
        return math.prod(int(d) for d in layer.input.shape[1:]) * layer.units
    return None


def _collect_macs(model: keras.Model, unsupported: list[str]) -> int:
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += _collect_macs(layer, unsupported)
            continue
        macs = layer_macs(layer)
        if macs is None:
            if getattr(layer, "kernel", None) is not None:
                unsupported.append(f"{layer.name} ({type(layer).__name__})")
            continue
        total += macs
    return total


def count_flops(model: keras.Model) -> int:
    """Forward FLOPs (2 x MACs) of ``model`` for ONE input sample (see module docstring).

    The model must be built with static spatial input sizes (e.g. ``keras.Input((224, 224, 3))``).
    """
    unsupported: list[str] = []
    flops = 2 * _collect_macs(model, unsupported)
    if unsupported:
        logger.warning(
            "count_flops(%s): %d layer(s) of unsupported types counted as 0 FLOPs: %s",
            model.name,
            len(unsupported),
            ", ".join(unsupported),
        )
    return int(flops)
