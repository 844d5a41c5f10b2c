"""Fine-grained localization: Grad-CAM on two ResNet-50 layers of the slice classifier (METHOD 4).

For each [0, 1] lung crop the classifier sees, and for each layer in ``layers`` (default
:data:`~radlogics_repro.models.classifier.GRADCAM_LAYERS`, the ``_out`` activations
``conv4_block6_out`` (14 x 14) and ``conv3_block4_out`` (28 x 28) at 224)::

    score     = the model output, the sigmoid probability p(abnormal)    (not the logit)
    weights_c = mean over (i, j) of d score / d A[i, j, c]                (A: the layer's activation)
    raw       = ReLU( sum_c weights_c * A[:, :, c] )                      (h, w)
    normalized= (raw - min) / (max - min) per image, in [0, 1]; a constant map -> all zeros
    fine      = product over layers of resize(normalized, S x S)          (S, S), in [0, 1]

*Score.* The gradient is taken of the probability itself, as the paper's Keras implementation and
tf-keras-vis with the sigmoid left in place do. Its gradient is the logit's times p (1 - p), a
positive per-image factor, which cancels in the per-image normalization (but makes the raw maps of
confidently classified images small, and all zero once the probability rounds to 1 in float32).
``score="logit"`` (engine ``"fused"`` and the cut) differentiates the logit instead, computed from the
output layer's input and weights, so the raw maps keep their magnitude at any confidence.

*Resize.* ``tf.image.resize(..., method="bilinear")`` with half-pixel centres (TensorFlow 2's only
convention, no antialiasing needed as it upsamples): output pixel ``i`` samples the map at
``(i + 0.5) * h / S - 0.5``, clamped at the edges; the same pixel-centre convention as
:func:`radlogics_repro.preprocess.crop_and_resize` and :func:`~radlogics_repro.preprocess.
paste_into_slice`. The product of the resized maps is not renormalized.

Two engines compute the raw maps; everything after them is shared, so they differ only by float
rounding:

* ``"fused"`` (default): one forward and one backward pass per batch give the probability and the
  gradients at every layer, in one compiled ``tf.function`` over a multi-output
  ``keras.Model(inputs, [layer outputs..., probability])``. That model and function are built once
  per (model, layers) and cached while the model lives; the batch dimension is left open in the
  ``input_signature``, so a new batch size does not retrace.
* ``"tf-keras-vis"``: ``tf_keras_vis.gradcam.Gradcam`` (0.8.7), called once per layer with
  ``seek_penultimate_conv_layer=False`` (otherwise it silently moves from an ``_out`` Activation
  layer to the last Conv2D before it), ``expand_cam=False`` and ``normalize_cam=False`` (raw ``h x w``
  maps), no model modifier (the sigmoid stays, so the score is the probability, as in ``"fused"``),
  score ``CategoricalScore([0])``. It runs eagerly, one forward/backward per layer plus one forward
  for the probabilities: the reference implementation, slower.

*Classify first, Grad-CAM the positives from where the forward pass stopped.* A study needs the
probability of every lung slice but maps of the positive ones only. :func:`classify_keeping_cut`
runs the classifier's forward pass and also returns the activation of the lowest Grad-CAM layer
(the *cut*: ``conv3_block4_out``, through which the whole upper network flows: nothing from below
it skips past). :func:`gradcam_maps_from_cut` then runs only the network above the cut, forward and
backward, on the positives' stored activations. The maps are those of the ``"fused"`` engine (the
same layers, score and arithmetic, to float rounding; tested), without a second pass through the
layers below the cut (conv1 to conv3, about 45% of ResNet-50's forward FLOPs).

Map a fine map from the crop back to the slice with :func:`fine_map_in_slice`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from radlogics_repro.models.classifier import GRADCAM_LAYERS, OUTPUT_NAME
from radlogics_repro.preprocess import Box, paste_into_slice

logger = logging.getLogger(__name__)

ENGINES = ("fused", "tf-keras-vis")
"""Names accepted by ``gradcam_maps(engine=...)``."""

SCORES = ("probability", "logit")
"""What Grad-CAM can differentiate (``score=``): the classifier's sigmoid output (the paper's, the
default) or its logit, the output layer's input times its kernel plus its bias."""

FLAT_MAP_RELATIVE_RANGE = 1e-5
"""A raw map whose (max - min) is at most this fraction of its largest absolute value is treated as
constant (float rounding, not structure) and normalizes to all zeros."""

MAP_SCALE_QUANTILE = 0.75
"""The quantile of the per-image maxima of the raw logit maps (the positives of a validation split)
that sets a layer's fixed map scale (:func:`gradcam_scales`); chosen on the classifier preset's
validation scans by experiments/corona_map_scale.py (results/corona_map_scale.md)."""

_INPUT_RANGE_TOLERANCE = 1e-4


class GradcamError(ValueError):
    """Bad input to Grad-CAM: wrong image shape or range, unknown layer or engine."""


@dataclass(frozen=True)
class GradcamResult:
    """Grad-CAM of a batch of N crops of S x S pixels.

    Attributes:
        probabilities: float32 ``(N,)``, the classifier's p(abnormal) for each image.
        raw: layer name -> float32 ``(N, h, w)``, ReLU of the gradient-weighted channel sum
            (arbitrary units, >= 0).
        normalized: layer name -> float32 ``(N, h, w)``, each image's raw map in [0, 1]: min-max
            scaled per image (a constant map gives zeros), or on the layer's fixed scale
            (:func:`scale_maps`) when scales were given.
        fine: float32 ``(N, S, S)`` in [0, 1], the product of the normalized maps resized to S x S.
        layers: the layers used, in order.
        engine: the engine that computed the raw maps.
        score: what was differentiated (one of :data:`SCORES`).
    """

    probabilities: np.ndarray
    raw: dict[str, np.ndarray]
    normalized: dict[str, np.ndarray]
    fine: np.ndarray
    layers: tuple[str, ...]
    engine: str
    score: str = "probability"


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def gradcam_maps(
    model: keras.Model,
    images,
    *,
    layers: Sequence[str] = GRADCAM_LAYERS,
    engine: str = "fused",
    batch_size: int = 16,
    score: str = "probability",
    scales: dict[str, float] | None = None,
) -> GradcamResult:
    """Grad-CAM maps of the slice classifier on a batch of crops (see the module docstring).

    Args:
        model: the slice classifier (single input ``(N, S, S, 3)``, single output ``(N, 1)``
            probability); ``layers`` must be layers of this model itself.
        images: ``(N, S, S, 3)`` float32 in [0, 1] (numpy array or tensor), the windowed crops.
        layers: one or more layer names with 4-D ``(N, h, w, C)`` outputs. The paper fuses
            ``("conv4_block6_out", "conv3_block4_out")``; one name alone gives the ablation
            (``fine`` = that map resized).
        engine: ``"fused"`` or ``"tf-keras-vis"``.
        batch_size: images per forward/backward pass (memory, not results).
        score: ``"probability"`` or ``"logit"`` (:data:`SCORES`; engine ``"fused"`` only).
        scales: None (each image's map min-max normalized) or layer name -> one fixed scale for
            every image (:func:`scale_maps`; from :func:`gradcam_scales`, with ``score="logit"``).

    Returns:
        :class:`GradcamResult`.
    """
    layers = _check_layers(model, layers)
    if engine not in ENGINES:
        raise GradcamError(f"unknown Grad-CAM engine {engine!r}; expected one of {ENGINES}")
    if score != "probability" and engine != "fused":
        raise GradcamError(f"Grad-CAM score {score!r} needs engine 'fused', not {engine!r}")
    if int(batch_size) < 1:
        raise GradcamError(f"batch_size must be >= 1, got {batch_size}")
    x = _check_images(model, images)
    n, height, width = x.shape[0], x.shape[1], x.shape[2]

    probabilities, raw = [], {name: [] for name in layers}
    for start in range(0, n, int(batch_size)):
        chunk = tf.convert_to_tensor(x[start : start + int(batch_size)])
        if engine == "fused":
            prob, maps = _fused_raw_maps(model, layers, chunk, score)
        else:
            prob, maps = _tf_keras_vis_raw_maps(model, layers, chunk)
        probabilities.append(prob)
        for name, m in zip(layers, maps, strict=True):
            raw[name].append(m)

    raw_maps = {name: _concat(raw[name], n, model.get_layer(name).output.shape[1:3])
                for name in layers}
    probs = np.concatenate(probabilities) if probabilities else np.zeros((0,), np.float32)
    return _result(probs, raw_maps, layers, (height, width), engine, score, scales)


def _result(probabilities: np.ndarray, raw: dict[str, np.ndarray], layers: tuple[str, ...],
            size: tuple[int, int], engine: str, score: str = "probability",
            scales: dict[str, float] | None = None) -> GradcamResult:
    """The shared tail of both ways to Grad-CAM: raw maps -> normalized (per image, or on fixed
    ``scales``) -> fused fine map."""
    if scales is not None and set(layers) - set(scales):
        raise GradcamError(f"no map scale for layer(s) {sorted(set(layers) - set(scales))}")
    normalized = {name: normalize_maps(m) if scales is None else scale_maps(m, scales[name])
                  for name, m in raw.items()}
    fine = fuse_maps([normalized[name] for name in layers], size)
    return GradcamResult(probabilities=probabilities.astype(np.float32), raw=raw,
                         normalized=normalized, fine=fine, layers=layers, engine=engine, score=score)


def normalize_maps(maps) -> np.ndarray:
    """Min-max normalize each map of a batch to [0, 1].

    Args:
        maps: ``(N, h, w)``.

    Returns:
        float32 ``(N, h, w)``; a map whose range is at most :data:`FLAT_MAP_RELATIVE_RANGE` of its
        largest absolute value (all zeros, or constant) becomes all zeros, never NaN.
    """
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim != 3:
        raise GradcamError(f"expected maps of shape (N, h, w), got {m.shape}")
    lo = m.min(axis=(1, 2), keepdims=True) if m.size else np.zeros((m.shape[0], 1, 1), np.float32)
    hi = m.max(axis=(1, 2), keepdims=True) if m.size else lo
    span = hi - lo
    scale = np.maximum(np.abs(lo), np.abs(hi))
    flat = span <= FLAT_MAP_RELATIVE_RANGE * scale  # also true for an all-zero map (0 <= 0)
    out = (m - lo) / np.where(flat, 1.0, span)
    out = np.where(flat, 0.0, np.clip(out, 0.0, 1.0))
    return out.astype(np.float32)


def scale_maps(maps, scale: float) -> np.ndarray:
    """Put a batch of raw maps on one fixed scale: ``clip(raw / scale, 0, 1)``.

    Unlike :func:`normalize_maps`, every image shares the scale, so a weak finding keeps a weak map.

    Args:
        maps: ``(N, h, w)`` raw maps (>= 0).
        scale: > 0, in the raw maps' units (e.g. one of :func:`gradcam_scales`).

    Returns:
        float32 ``(N, h, w)`` in [0, 1].
    """
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim != 3:
        raise GradcamError(f"expected maps of shape (N, h, w), got {m.shape}")
    if not np.isfinite(scale) or scale <= 0:
        raise GradcamError(f"a map scale must be a finite number > 0, got {scale}")
    return np.clip(m / np.float32(scale), 0.0, 1.0).astype(np.float32)


def scales_from_maxima(maxima: dict[str, np.ndarray], quantile: float) -> dict[str, float]:
    """Each layer's fixed map scale: the ``quantile`` of its raw maps' per-image maxima ``(N,)``
    (at least the smallest positive float32, so that an all-zero set still divides)."""
    if not 0.0 < quantile <= 1.0:
        raise GradcamError(f"the scale quantile must be in (0, 1], got {quantile}")
    tiny = float(np.finfo(np.float32).tiny)
    return {name: max(float(np.quantile(m, quantile)) if len(m) else 0.0, tiny)
            for name, m in maxima.items()}


def gradcam_scales(model: keras.Model, images, quantile: float, *,
                   layers: Sequence[str] = GRADCAM_LAYERS, batch_size: int = 16) -> dict[str, float]:
    """Fixed map scales of a classifier: per layer, the ``quantile`` of the per-image maxima of the
    raw *logit* Grad-CAM maps of ``images`` (the positives of a validation split).

    Args:
        model: the slice classifier.
        images: ``(N, S, S, 3)`` float32 in [0, 1], N >= 1.
        quantile: in (0, 1].

    Returns:
        layer name -> scale (raw logit Grad-CAM units), for :func:`scale_maps`.
    """
    if len(images) == 0:
        raise GradcamError("map scales need at least one image")
    result = gradcam_maps(model, images, layers=layers, batch_size=batch_size, score="logit")
    return scales_from_maxima({name: m.reshape(len(m), -1).max(axis=1) for name, m in result.raw.items()},
                              quantile)


def fuse_maps(normalized_maps: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Resize each ``(N, h, w)`` map in [0, 1] to ``size`` and multiply them (the fine map).

    Resizing is ``tf.image.resize`` bilinear with half-pixel centres (see module docstring).

    Returns:
        float32 ``(N, size[0], size[1])`` in [0, 1].
    """
    if not normalized_maps:
        raise GradcamError("fuse_maps needs at least one map")
    fine = None
    for m in normalized_maps:
        resized = resize_maps(m, size)
        fine = resized if fine is None else fine * resized
    return np.clip(fine, 0.0, 1.0).astype(np.float32)


def resize_maps(maps, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(N, h, w)`` maps to ``(N, size[0], size[1])``: bilinear, half-pixel centres."""
    m = np.asarray(maps, dtype=np.float32)
    if m.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    out = tf.image.resize(m[..., np.newaxis], size, method="bilinear", antialias=False)
    return out.numpy()[..., 0]


def fine_map_in_slice(fine_map, box: Box, height: int, width: int) -> np.ndarray:
    """Map one ``(S, S)`` fine map computed on a lung crop back into its slice's pixel grid.

    Args:
        fine_map: ``(S, S)``, the crop cut out of the slice at ``box`` by
            :func:`radlogics_repro.preprocess.crop_and_resize`.
        box: that crop's box in slice pixels (may reach outside the slice).
        height, width: the slice size, pixels.

    Returns:
        float32 ``(height, width)``: the map resized bilinearly to the box (pixel centres aligned)
        where the box lies, 0 elsewhere (:func:`radlogics_repro.preprocess.paste_into_slice`).
    """
    m = np.asarray(fine_map, dtype=np.float32)
    if m.ndim != 2:
        raise GradcamError(f"expected one (S, S) fine map, got shape {m.shape}")
    if box.height < 1 or box.width < 1:
        raise GradcamError(f"empty crop box {box}")
    return paste_into_slice(m, box, int(height), int(width))


def clear_gradcam_cache() -> None:
    """Forget the compiled fused-engine functions of every model (they are also dropped when their
    model is garbage collected)."""
    _FUSED_CACHE.clear()


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def _check_layers(model: keras.Model, layers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(layers, str):
        layers = (layers,)
    names = tuple(str(name) for name in layers)
    if not names:
        raise GradcamError("Grad-CAM needs at least one layer name")
    if len(set(names)) != len(names):
        raise GradcamError(f"duplicate Grad-CAM layers in {names}")
    for name in names:
        try:
            layer = model.get_layer(name)
        except ValueError as err:
            raise GradcamError(f"model {model.name!r} has no layer {name!r}") from err
        if len(layer.output.shape) != 4:
            raise GradcamError(f"layer {name!r} output {layer.output.shape} is not (N, h, w, C)")
    return names


def _check_images(model: keras.Model, images) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    expected = tuple(model.inputs[0].shape[1:])
    if x.ndim != 4 or x.shape[-1] != 3:
        raise GradcamError(f"expected images of shape (N, S, S, 3), got {x.shape}")
    if any(e is not None and e != s for e, s in zip(expected, x.shape[1:], strict=True)):
        raise GradcamError(f"images of shape {x.shape} do not fit the model input {expected}")
    if x.size:
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -_INPUT_RANGE_TOLERANCE or (
            hi > 1.0 + _INPUT_RANGE_TOLERANCE
        ):
            raise GradcamError(f"images must be windowed to [0, 1], got values in [{lo}, {hi}]")
    return x


def _concat(parts: list[np.ndarray], n: int, hw) -> np.ndarray:
    if parts:
        return np.concatenate(parts).astype(np.float32)
    return np.zeros((n, *(int(v) for v in hw)), np.float32)


# ------------------------------------------------------------------------------------------------
# engine "fused": one compiled forward + backward pass per batch
# ------------------------------------------------------------------------------------------------
# model -> {layers: tf.function}. Values hold the multi-output model (the layers), not the model
# object, so an entry goes away with its model.
_FUSED_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fused_function(model: keras.Model, layers: tuple[str, ...], score: str = "probability"):
    per_model = _FUSED_CACHE.setdefault(model, {})
    if (layers, score) in per_model:
        return per_model[(layers, score)]
    head_input = _score_inputs(model, score)
    grad_model = keras.Model(
        model.inputs,
        [model.get_layer(name).output for name in layers] + [model.outputs[0], *head_input],
        name=f"{model.name}_gradcam",
    )
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def raw_maps(x):
        with tf.GradientTape() as tape:
            outputs = grad_model(x, training=False)
            activations = outputs[:len(layers)]
            probability, target = _probability_and_target(model, score, outputs[len(layers):])
        return probability, _weighted_maps(activations, tape.gradient(target, activations))

    logger.debug("built fused Grad-CAM function for %s at %s (score: %s)", model.name, layers, score)
    per_model[(layers, score)] = raw_maps
    return raw_maps


def _score_inputs(model: keras.Model, score: str) -> list:
    """The extra tensors the Grad-CAM ``score`` needs beyond the model's output: none for the
    probability; for the logit, the input of the output layer (a ``Dense(1, sigmoid)``)."""
    if score not in SCORES:
        raise GradcamError(f"unknown Grad-CAM score {score!r}; expected one of {SCORES}")
    if len(model.outputs) != 1:
        raise GradcamError(f"model {model.name!r} must have one output, has {len(model.outputs)}")
    if score == "probability":
        return []
    head = _output_layer(model)
    if not isinstance(head, keras.layers.Dense) or head.activation is not keras.activations.sigmoid:
        raise GradcamError(f"model {model.name!r}: the logit score needs a Dense sigmoid output "
                           f"layer, found {type(head).__name__} {head.name!r}")
    return [head.input]


def _output_layer(model: keras.Model):
    try:
        return model.get_layer(OUTPUT_NAME)
    except ValueError:
        return model.layers[-1]


def _probability_and_target(model: keras.Model, score: str, tail) -> tuple:
    """(probability ``(N,)``, the scalar per image that Grad-CAM differentiates ``(N,)``), float32,
    from the outputs after the activations: ``[probability]`` or ``[probability, head input]``."""
    probability = tf.cast(tail[0][:, 0], tf.float32)
    if score == "probability":
        return probability, probability
    head = _output_layer(model)
    features = tf.cast(tail[1], tf.float32)
    logit = tf.matmul(features, tf.cast(head.kernel, tf.float32))[:, 0] + tf.cast(head.bias[0], tf.float32)
    return probability, logit


def _weighted_maps(activations, grads) -> list:
    """Grad-CAM's raw maps: ReLU of the channel sum of each activation weighted by the spatial mean
    of its gradient, float32 ``(N, h, w)`` per layer."""
    maps = []
    for a, g in zip(activations, grads, strict=True):
        a = tf.cast(a, tf.float32)
        weights = tf.reduce_mean(tf.cast(g, tf.float32), axis=(1, 2))  # (N, C)
        maps.append(tf.nn.relu(tf.einsum("nhwc,nc->nhw", a, weights)))
    return maps


def _fused_raw_maps(model, layers, x, score="probability") -> tuple[np.ndarray, list[np.ndarray]]:
    probability, maps = _fused_function(model, layers, score)(x)
    return probability.numpy(), [m.numpy() for m in maps]


# ------------------------------------------------------------------------------------------------
# classify, then Grad-CAM the positives from the cut (module docstring)
# ------------------------------------------------------------------------------------------------
def cut_layer(model: keras.Model, layers: Sequence[str] = GRADCAM_LAYERS) -> str:
    """The lowest of ``layers`` in the model (where :func:`classify_keeping_cut` stops)."""
    names = _check_layers(model, layers)
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    return min(names, key=order.__getitem__)


def classify_keeping_cut(model: keras.Model, images, layers: Sequence[str] = GRADCAM_LAYERS
                         ) -> tuple[np.ndarray, tf.Tensor]:
    """One forward pass: the probabilities and the activation at :func:`cut_layer`.

    Args:
        model: the slice classifier.
        images: ``(N, S, S, 3)`` float32 in [0, 1].
        layers: the Grad-CAM layers the activations will serve.

    Returns:
        float32 ``(N,)`` probabilities, and the cut activation ``(N, h, w, C)`` as a tensor in the
        model's compute dtype (bfloat16 under ``mixed_bfloat16``: half the memory).
    """
    forward, _ = _split_functions(model, _check_layers(model, layers))
    probabilities, cut = forward(tf.convert_to_tensor(_check_images(model, images)))
    return probabilities.numpy(), cut


def gradcam_maps_from_cut(model: keras.Model, cut_activations, size: tuple[int, int],
                          layers: Sequence[str] = GRADCAM_LAYERS, rows=None,
                          score: str = "probability",
                          scales: dict[str, float] | None = None) -> GradcamResult:
    """Grad-CAM (engine ``"fused"``'s maps) of the images whose cut activations are given.

    Args:
        model: the slice classifier that produced them.
        cut_activations: ``(N, h, w, C)`` from :func:`classify_keeping_cut` with the same layers.
        size: the images' (S, S), the fine maps' size.
        layers: the Grad-CAM layers, as in :func:`gradcam_maps`.
        rows: optional bool ``(N,)`` mask or indices: the images to map (e.g. the positives).
        score: ``"probability"`` or ``"logit"`` (:data:`SCORES`).
        scales: as in :func:`gradcam_maps`.

    Returns:
        :class:`GradcamResult` (``engine`` ``"fused"``; probabilities recomputed from the cut).
    """
    layers = _check_layers(model, layers)
    _, upper = _split_functions(model, layers, score)
    if rows is not None:
        rows = np.asarray(rows)
        cut_activations = tf.gather(cut_activations, np.flatnonzero(rows) if rows.dtype == bool else rows)
    n = int(cut_activations.shape[0])
    probabilities, parts = np.zeros((0,), np.float32), {name: [] for name in layers}
    if n:
        probability, maps = upper(tf.convert_to_tensor(cut_activations))
        probabilities = probability.numpy()
        for name, m in zip(layers, maps, strict=True):
            parts[name].append(m.numpy())
    raw = {name: _concat(parts[name], n, model.get_layer(name).output.shape[1:3]) for name in layers}
    return _result(probabilities, raw, layers, tuple(size), "fused", score, scales)


def _split_functions(model: keras.Model, layers: tuple[str, ...], score: str = "probability"):
    """(forward, upper): compiled ``forward(x) -> (probabilities, cut activation)`` and
    ``upper(cut) -> (probabilities, [raw map per layer])`` (maps of ``score``), cached like the
    fused function."""
    per_model = _FUSED_CACHE.setdefault(model, {})
    key = ("split", layers, score)
    if key in per_model:
        return per_model[key]
    head_input = _score_inputs(model, score)
    cut = cut_layer(model, layers)
    cut_tensor = model.get_layer(cut).output
    lower = keras.Model(model.inputs, [model.outputs[0], cut_tensor], name=f"{model.name}_to_{cut}")
    above = [name for name in layers if name != cut]
    try:
        upper_model = keras.Model(cut_tensor, [model.get_layer(name).output for name in above]
                                  + [model.outputs[0], *head_input], name=f"{model.name}_from_{cut}")
    except ValueError as err:  # something below the cut reaches past it
        raise GradcamError(f"model {model.name!r} cannot be cut at {cut!r}: {err}") from err
    image_spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    cut_spec = tf.TensorSpec((None, *cut_tensor.shape[1:]), cut_tensor.dtype)

    @tf.function(input_signature=[image_spec])
    def forward(x):
        output, activation = lower(x, training=False)
        return tf.cast(output[:, 0], tf.float32), activation

    @tf.function(input_signature=[cut_spec])
    def upper(activation):
        with tf.GradientTape() as tape:
            tape.watch(activation)
            outputs = upper_model(activation, training=False)
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            higher = outputs[:len(above)]
            probability, target = _probability_and_target(model, score, outputs[len(above):])
        by_name = dict(zip([cut, *above], [activation, *higher], strict=True))
        activations = [by_name[name] for name in layers]
        return probability, _weighted_maps(activations, tape.gradient(target, activations))

    per_model[key] = (forward, upper)
    return forward, upper


# ------------------------------------------------------------------------------------------------
# engine "tf-keras-vis": the library's Gradcam, once per layer
# ------------------------------------------------------------------------------------------------
def _tf_keras_vis_raw_maps(model, layers, x) -> tuple[np.ndarray, list[np.ndarray]]:
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.scores import CategoricalScore

    gradcam = Gradcam(model, model_modifier=None, clone=False)  # sigmoid kept: score = probability
    score = CategoricalScore([0])
    maps = []
    for name in layers:
        cam = gradcam(
            score,
            x,
            penultimate_layer=name,
            seek_penultimate_conv_layer=False,
            expand_cam=False,
            normalize_cam=False,
        )
        maps.append(np.asarray(cam, dtype=np.float32).reshape(int(x.shape[0]), *cam.shape[-2:]))
    probability = model(x, training=False)
    return np.asarray(probability, dtype=np.float32)[:, 0], maps
