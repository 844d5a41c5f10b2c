"""SimCLR pre-training of the two backbones (ResNet-50, VGG16) on unlabeled CT slices.

Why SimCLR (Chen et al., ICML 2020): one network, one loss, no momentum encoder, queue or
predictor whose state would have to be saved and resumed; the other slices of the batch are the
negatives. Its known weakness is a hunger for large batches; on a 2-core CPU the batch is small
(tens of slices), which a lower temperature (0.2, as MoCo v2 uses) partly offsets. MoCo v2 would
need shuffled BatchNorm across devices to stop its key encoder from cheating on a single device.

Model::

    views (2B, H, W, 3) in [0, 1]
      -> imagenet_preprocess (the same first layer as the classifier and the U-Net, so the weights
         learnt here meet the same input scale when they are loaded there)
      -> backbone (keras.applications, include_top=False; its layers under their Keras names)
      -> pretext_gap (GlobalAveragePooling2D)
      -> pretext_dense (ReLU) -> pretext_projection: z, float32 (the projection head; discarded)

Loss (NT-Xent): for view i with partner j (rows 2k and 2k+1 of the batch),
``-log( exp(s_ij / t) / sum_{m != i} exp(s_im / t) )`` with ``s`` the cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers, ops

from radlogics_repro.models.weights import (
    BACKBONES,
    ImageNetCaffePreprocess,
    attach_init_record,
    copy_weights_by_name,
    resolve_backbone,
)

PROJECTION_NAME = "pretext_projection"


def build_contrastive_model(
    backbone: str = "resnet50",
    input_shape: Sequence[int] = (112, 112, 3),
    projection_units: Sequence[int] = (512, 128),
    weights=None,
) -> keras.Model:
    """The SimCLR network: backbone + two-layer projection head (model name ``simclr_<backbone>``).

    Args:
        backbone: ``"resnet50"`` or ``"vgg16"``.
        input_shape: (H, W, 3), H and W >= 32.
        projection_units: (hidden width, output width) of the projection head.
        weights: the backbone's starting weights (usually None: random), see
            :func:`radlogics_repro.models.weights.resolve_backbone`.

    Returns:
        Functional model, input (N, H, W, 3) in [0, 1], output (N, projection_units[-1]) float32.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 32:
        raise ValueError(f"input_shape must be (H, W, 3), H, W >= 32; got {shape}")
    if len(projection_units) != 2:
        raise ValueError(f"projection_units must be (hidden, output) widths, got {list(projection_units)}")
    hidden, out = (int(u) for u in projection_units)
    image = keras.Input(shape=shape, name="image")
    x = ImageNetCaffePreprocess(name="imagenet_preprocess")(image)
    net, record = resolve_backbone(backbone, weights=weights, input_tensor=x)
    x = layers.GlobalAveragePooling2D(name="pretext_gap")(net.output)
    x = layers.Dense(hidden, activation="relu", name="pretext_dense")(x)
    z = layers.Dense(out, dtype="float32", name=PROJECTION_NAME)(x)
    return attach_init_record(keras.Model(image, z, name=f"simclr_{backbone}"), record)


def _pair_logits(z, temperature: float):
    """Cosine similarities / temperature, (2B, 2B), with the diagonal pushed to -1e9, and the index
    of each row's partner (``i xor 1``)."""
    z = ops.cast(z, "float32")
    z = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
    logits = ops.matmul(z, ops.transpose(z)) / temperature
    n = ops.shape(z)[0]
    logits = logits - 1e9 * ops.eye(n, dtype="float32")
    index = ops.arange(n)
    partner = index + 1 - 2 * (index % 2)
    return logits, partner


@keras.saving.register_keras_serializable(package="radlogics_repro")
class NTXentLoss(keras.losses.Loss):
    """SimCLR's normalized-temperature cross-entropy over one batch of view pairs.

    ``y_pred``: (2B, D) projections with the two views of slice k at rows 2k and 2k + 1
    (:func:`radlogics_repro.unlabeled.contrastive_dataset`); ``y_true`` is ignored. Returns the
    per-view loss (2B,); Keras averages it. A random encoder scores about ``log(2B - 1)``.
    """

    def __init__(self, temperature: float = 0.2, name: str = "nt_xent", **kwargs):
        super().__init__(name=name, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        logits, partner = _pair_logits(y_pred, self.temperature)
        return keras.losses.sparse_categorical_crossentropy(partner, logits, from_logits=True)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="radlogics_repro")
def pair_accuracy(y_true, y_pred):
    """Per view: 1 when its own partner is the most similar of the other 2B - 1 views, else 0.
    Chance is ``1 / (2B - 1)``."""
    logits, partner = _pair_logits(y_pred, 1.0)
    return ops.cast(ops.equal(ops.argmax(logits, axis=1), partner), "float32")


def export_backbone(model: keras.Model, backbone: str, path) -> None:
    """Write the backbone part of a SimCLR ``model`` as a Keras ``.weights.h5`` file that
    ``model.weights=PATH`` (classifier: resnet50; lung U-Net encoder: vgg16) loads.

    The file holds a bare ``keras.applications`` backbone (``include_top=False``) of the model's
    input size; convolution weights do not depend on the input size, so the classifier may load
    it at 224.
    """
    spec = BACKBONES[backbone]
    bare = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=tuple(model.input_shape[1:]))
    copy_weights_by_name(model, bare)
    bare.save_weights(str(path))
