"""One pretrained-weights policy for both networks; in-model ImageNet preprocessing; model files.

Both networks of the method start from an ImageNet-pretrained backbone (VGG16 for the lung U-Net
encoder, ResNet-50 for the slice classifier). :func:`resolve_backbone` builds that backbone and
initialises it from one of three sources, the ``weights`` argument:

* ``"imagenet"``: the Keras ImageNet file (``include_top=False``). Keras looks in its cache first
  (``~/.keras/models/`` or ``$KERAS_HOME/models/``) and downloads only when the file is absent, so a
  file copied there by hand works with no network. When the file is absent *and* the download fails
  (this machine is offline), the backbone falls back to random initialisation with ONE loud
  ``logging.WARNING`` that names the expected file, where to put it and how to pass a path instead;
  the init record is then ``"random (imagenet unavailable)"``. With ``require_pretrained=True`` the
  fallback is a :class:`PretrainedWeightsError` instead.
* a local file path:

  - ``*.weights.h5`` (written by ``Model.save_weights``) or a legacy ``*.h5`` weights file (for
    example the Keras ImageNet file itself, downloaded elsewhere): loaded with Keras'
    ``load_weights``, which needs the same backbone architecture (its layers with weights, in
    order);
  - ``*.keras`` (a whole saved model, e.g. a trained ``lung_unet`` or ``slice_classifier``):
    loaded in safe mode, then the weights of every backbone layer are copied from the layer of
    the same name (searched in nested models too); every backbone layer with weights must be
    found, with the same weight shapes.

  A missing or unfitting file is a :class:`PretrainedWeightsError`, one line naming the file.
  The init record is ``"file: <basename> (sha256 <first 12 hex digits>)"``.
* ``None`` / ``"null"`` / ``"none"`` / ``"random"``: random initialisation, record ``"random"``
  (an error when ``require_pretrained=True``: that flag means "this run must start pretrained").

The init record is attached to the built model; read it with :func:`init_record`. It is a plain
Python attribute, so it does NOT survive ``model.save``: training code must write it into the run's
``metrics.json`` (key ``init``) at build time.

ImageNet preprocessing lives inside the models as :class:`ImageNetCaffePreprocess`, a registered,
serialisable layer (no ``Lambda``), so training and inference share one function and a saved
``.keras`` model is self-contained: the models take the windowed ``[0, 1]`` three-channel image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import ops

logger = logging.getLogger(__name__)

RANDOM_RECORD = "random"
IMAGENET_RECORD = "imagenet"
FALLBACK_RECORD = "random (imagenet unavailable)"
_INIT_ATTR = "_radlogics_backbone_init"
_RANDOM_SPELLINGS = {"null", "none", "random", ""}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were required but are unavailable, or a weights file does not fit."""


class ModelLoadError(ValueError):
    """A ``.keras`` model file is missing, is not a Keras file, or was refused by safe mode."""


# --------------------------------------------------------------------------------------------
# In-model ImageNet preprocessing
# --------------------------------------------------------------------------------------------
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
"""ImageNet mean pixel in BGR order on the [0, 255] scale, as in keras' ``preprocess_input``
(``mode="caffe"``) for VGG16 and ResNet-50."""


@keras.saving.register_keras_serializable(package="radlogics_repro")
class ImageNetCaffePreprocess(keras.layers.Layer):
    """``keras.applications.{vgg16,resnet50}.preprocess_input`` as a serialisable layer.

    Input: (N, H, W, 3) RGB image in [0, 1] (for CT, the windowed slice repeated on 3 channels).
    Output: (N, H, W, 3) ``x * input_scale`` with channels reversed (RGB -> BGR) minus the ImageNet
    BGR mean ``(103.939, 116.779, 123.68)``; i.e. ``preprocess_input(255 * x)``.

    Args:
        input_scale: factor taking the input to the [0, 255] scale the ImageNet weights expect
            (255 for [0, 1] inputs).
    """

    def __init__(self, input_scale: float = 255.0, **kwargs):
        super().__init__(**kwargs)
        self.input_scale = float(input_scale)

    def call(self, inputs):
        bgr = ops.flip(inputs, axis=-1) * ops.cast(self.input_scale, inputs.dtype)
        mean = ops.convert_to_tensor(IMAGENET_BGR_MEAN, dtype=inputs.dtype)
        return bgr - mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"input_scale": self.input_scale})
        return config


CUSTOM_OBJECTS = {"radlogics_repro>ImageNetCaffePreprocess": ImageNetCaffePreprocess}
"""Custom objects of the package's models (registered anyway; passed explicitly for clarity)."""


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """A keras.applications backbone: its constructor name and its ImageNet no-top weights file."""

    constructor: str
    imagenet_file: str


BACKBONES = {
    "vgg16": BackboneSpec("VGG16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": BackboneSpec("ResNet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}


def _keras_models_dir() -> str:
    """Where keras' ``get_file`` caches application weights (KERAS_HOME or ~/.keras, + models)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def cached_imagenet_file(backbone: str) -> Path:
    """Where Keras keeps (or would download) the ImageNet weights of ``backbone`` without its top."""
    return Path(_keras_models_dir()) / BACKBONES[backbone].imagenet_file


def _is_download_failure(exc: Exception) -> bool:
    """True for what keras' ``get_file`` raises when it cannot fetch a file.

    ``get_file`` turns HTTP/URL errors into a plain ``Exception("URL fetch failure on ...")``;
    lower-level network or file errors are ``OSError``. Anything else (``ValueError``,
    ``TypeError``, ...) is a programming or input error and must not be swallowed.
    """
    return type(exc) is Exception or isinstance(exc, OSError)


def _one_line(exc, limit: int = 300) -> str:
    """An exception's whole message on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_weights(weights) -> str | Path | None:
    """Normalise a ``weights`` setting: None (random), ``"imagenet"`` or a Path (local file)."""
    if weights is None:
        return None
    if isinstance(weights, str):
        text = weights.strip()
        if text.lower() in _RANDOM_SPELLINGS:
            return None
        if text.lower() == IMAGENET_RECORD:
            return IMAGENET_RECORD
        return Path(text).expanduser()
    if isinstance(weights, os.PathLike):
        return Path(weights).expanduser()
    raise PretrainedWeightsError(
        f"weights must be 'imagenet', a file path or None/'random', got {weights!r}"
    )


def resolve_backbone(
    backbone: str,
    *,
    weights,
    input_tensor,
    require_pretrained: bool = False,
    config_key: str = "model.weights",
) -> tuple[keras.Model, str]:
    """Build a keras.applications backbone (``include_top=False``) on ``input_tensor`` and init it.

    Args:
        backbone: ``"vgg16"`` or ``"resnet50"`` (see :data:`BACKBONES`).
        weights: ``"imagenet"``, a local weights file (``.weights.h5``, ``.h5`` or ``.keras``), or
            None / ``"null"`` / ``"random"``; see the module docstring.
        input_tensor: the symbolic tensor the backbone is built on (``keras.Input`` or the output
            of a layer applied to one). Building on it makes the backbone's layers, with their
            Keras names, layers of the caller's model itself (not one nested sub-model).
        require_pretrained: raise :class:`PretrainedWeightsError` instead of falling back to random
            initialisation (also when ``weights`` asks for random initialisation).
        config_key: the configuration key named in messages as the way to pass a file path.

    Returns:
        (backbone model, init record): the record is ``"imagenet"``,
        ``"file: <basename> (sha256 <12 hex>)"``, ``"random"`` or
        ``"random (imagenet unavailable)"``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[backbone]
    source = parse_weights(weights)

    if source is None:
        if require_pretrained:
            raise PretrainedWeightsError(
                f"require_pretrained=True but {config_key}={weights!r} asks for random "
                f"initialisation of the {spec.constructor} backbone"
            )
        return _build(spec, None, input_tensor), RANDOM_RECORD

    if source == IMAGENET_RECORD:
        return _build_imagenet(spec, input_tensor, require_pretrained, config_key)

    model = _build(spec, None, input_tensor)
    _load_weights_file(model, source, spec)
    record = f"file: {source.name} (sha256 {file_sha256(source)[:12]})"
    pretraining = pretraining_provenance(source)
    if pretraining is not None:
        record += f"; pretrained: {pretraining.get('summary', 'see ' + pretraining_card_path(source).name)}"
    return model, record


def pretraining_card_path(weights_path: str | os.PathLike) -> Path:
    """Where the provenance of a pre-trained weights file is kept: beside it, ``<stem>.pretraining.json``
    (``backbone.weights.h5`` -> ``backbone.pretraining.json``)."""
    path = Path(weights_path)
    stem = path.name
    for suffix in (".weights.h5", ".h5", ".keras"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return path.with_name(stem + ".pretraining.json")


def pretraining_provenance(weights) -> dict | None:
    """The provenance card of a local weights file written by pre-training (method, backbone, data,
    epochs, input size, commit, ``summary``), or None for ImageNet, random init or a file without
    a card. A card that is not valid JSON is a PretrainedWeightsError naming it."""
    source = parse_weights(weights)
    if not isinstance(source, Path):
        return None
    card = pretraining_card_path(source)
    if not card.is_file():
        return None
    try:
        return json.loads(card.read_text())
    except (OSError, ValueError) as exc:
        raise PretrainedWeightsError(f"{card}: unreadable pre-training card ({_one_line(exc)})") from exc


def _build(spec: BackboneSpec, weights, input_tensor) -> keras.Model:
    # Looked up at call time, so tests can monkeypatch keras.applications.<constructor>.
    constructor = getattr(keras.applications, spec.constructor)
    return constructor(include_top=False, weights=weights, input_tensor=input_tensor)


def _build_imagenet(spec, input_tensor, require_pretrained, config_key):
    try:
        return _build(spec, IMAGENET_RECORD, input_tensor), IMAGENET_RECORD
    except Exception as exc:  # only the download failure is handled, see _is_download_failure
        if not _is_download_failure(exc):
            raise
        cause = _one_line(exc, limit=200)
    where = _keras_models_dir()
    if require_pretrained:
        raise PretrainedWeightsError(
            f"ImageNet weights for {spec.constructor} are unavailable ({cause}); expected "
            f"{spec.imagenet_file} in {where}/ or a path via {config_key}=/path/to/file.h5"
        ) from None
    logger.warning(
        "ImageNet weights for the %s backbone could not be loaded (%s). "
        "Keras expected the file %s in its cache folder %s/ (set KERAS_HOME to use another "
        "Keras folder; the file is then looked up in $KERAS_HOME/models/). "
        "Copy that file there from a machine with internet access, or pass its path with "
        "%s=/path/to/%s . "
        "FALLING BACK TO RANDOM INITIALISATION: this run is NOT ImageNet-pretrained as in the "
        "paper, and its init record is '%s'.",
        spec.constructor,
        cause,
        spec.imagenet_file,
        where,
        config_key,
        spec.imagenet_file,
        FALLBACK_RECORD,
    )
    return _build(spec, None, input_tensor), FALLBACK_RECORD


def _load_weights_file(model: keras.Model, path: Path, spec: BackboneSpec) -> None:
    """Load ``path`` into ``model`` (the backbone), or raise PretrainedWeightsError naming it."""
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file not found: {path}")
    name = path.name.lower()
    if name.endswith(".keras"):
        _copy_weights_by_name(model, path, spec)
        return
    if not name.endswith(".h5"):
        raise PretrainedWeightsError(
            f"weights file {path} is not a .weights.h5, .h5 or .keras file"
        )
    # Keras warns (UserWarning, one per container) before it raises on a mismatching file, and a
    # warning that layers "retain their freshly-initialized weights" means a silent partial load:
    # both are turned into one clear error here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(path))
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise PretrainedWeightsError(
                f"weights file {path} does not fit the {spec.constructor} backbone: "
                f"{_one_line(exc)}"
            ) from exc
    partial = [w for w in caught if "freshly-initialized" in str(w.message)]
    if partial:
        raise PretrainedWeightsError(
            f"weights file {path} does not fit the {spec.constructor} backbone: "
            f"{_one_line(partial[0].message)}"
        )
    for other in caught:  # unrelated warnings are passed on unchanged
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)


def _layers_by_name(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """All layers of ``model`` and of models nested in it, by name (first occurrence wins)."""
    found: dict[str, keras.layers.Layer] = {}
    for layer in model.layers:
        found.setdefault(layer.name, layer)
        if isinstance(layer, keras.Model):
            for name, inner in _layers_by_name(layer).items():
                found.setdefault(name, inner)
    return found


def copy_weights_by_name(source: keras.Model, target: keras.Model) -> None:
    """Copy into every layer of ``target`` that has weights the weights of the layer of the same
    name in ``source`` (searched in nested models too).

    Raises:
        ValueError: ``source`` has no layer of that name, or its weight shapes differ.
    """
    available = _layers_by_name(source)
    for layer in target.layers:
        wanted = layer.get_weights()
        if not wanted:
            continue
        donor = available.get(layer.name)
        if donor is None:
            raise ValueError(f"it has no layer named {layer.name!r}")
        values = donor.get_weights()
        if [w.shape for w in values] != [w.shape for w in wanted]:
            raise ValueError(f"layer {layer.name!r} has weight shapes {[w.shape for w in values]}, "
                             f"expected {[w.shape for w in wanted]}")
        layer.set_weights(values)


def _copy_weights_by_name(model: keras.Model, path: Path, spec: BackboneSpec) -> None:
    try:
        copy_weights_by_name(load_model(path), model)
    except (ModelLoadError, ValueError) as exc:
        raise PretrainedWeightsError(
            f"weights file {path} does not fit the {spec.constructor} backbone: {exc}"
        ) from exc


# --------------------------------------------------------------------------------------------
# Init record and model files
# --------------------------------------------------------------------------------------------
def attach_init_record(model: keras.Model, record: str) -> keras.Model:
    """Store the backbone init record on ``model`` (in memory only; see module docstring)."""
    object.__setattr__(model, _INIT_ATTR, record)
    return model


def init_record(model: keras.Model) -> str | None:
    """The backbone init record of a freshly built model, or None (e.g. a model loaded from file:
    the record is not saved with the model; the training run's metrics.json has it)."""
    return getattr(model, _INIT_ATTR, None)


def load_model(path: str | os.PathLike, compile: bool = False) -> keras.Model:
    """Load a ``.keras`` model file in Keras safe mode with the package's custom objects.

    Raises:
        ModelLoadError: one line naming the file, when it is missing, is not a Keras ``.keras``
            file, is refused by safe mode (a ``Lambda`` layer or other arbitrary code), or cannot
            be deserialised for another reason.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise ModelLoadError(f"model file {path} is not a Keras .keras file (zip archive)")
    try:
        return keras.saving.load_model(
            path, custom_objects=CUSTOM_OBJECTS, compile=compile, safe_mode=True
        )
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ModelLoadError(
                f"model file {path} was refused by Keras safe mode (it contains a Lambda layer "
                f"or other arbitrary Python code): {_one_line(exc, limit=120)}"
            ) from exc
        raise ModelLoadError(f"model file {path} could not be loaded: {_one_line(exc)}") from exc
    except (OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"model file {path} could not be loaded: {_one_line(exc)}") from exc
