"""Run a saved model at another compute precision, or another input size, without retraining.

A model remembers the dtype policy it was trained with (``float32``, ``mixed_bfloat16``, ...).
:func:`with_compute_precision` rebuilds it layer by layer under another policy and copies the
weights (variables stay float32 under the mixed policies), so a float32-trained model can run in
bfloat16 on a CPU with AVX-512 BF16 (1.8x to 1.9x faster at inference here with the BatchNorm
layers folded, results/bench.md) and a
bfloat16-trained one in float32 on hardware without bfloat16. The model's output layers keep
float32, as the builders make them, so probabilities and masks stay float32.

:func:`with_input_size` rebuilds a fully convolutional model (both networks here: the classifier
ends in global average pooling) for another square input size with the same weights, e.g. to go on
training a classifier trained at 112 px at 224 px (progressive resizing).
"""

from __future__ import annotations

import copy
from pathlib import Path

import keras

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
PRECISION_CHOICES = ("auto", "model", *POLICIES)


def cpu_has_bfloat16() -> bool:
    """Whether this (Linux) CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str) -> str:
    """An analysis ``precision`` choice -> ``model`` or a Keras policy name.

    ``auto``: ``mixed_bfloat16`` on a CPU-only machine whose CPU has native bfloat16 (1.8x to 1.9x the
    float32 speed there with the BatchNorm layers folded; lung masks agree with float32 to Dice
    ~0.99, see results/bench_analyze.md), otherwise ``model`` (each network as it was trained).
    """
    if choice not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {choice!r}; expected one of {PRECISION_CHOICES}")
    if choice != "auto":
        return choice
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU") and cpu_has_bfloat16():
        return "mixed_bfloat16"
    return "model"


def _set_policy(config: dict, policy: str) -> None:
    entries = config.get("output_layers", [])
    if entries and isinstance(entries[0], str):   # a single output: ["name", node, tensor]
        entries = [entries]
    outputs = {entry[0] for entry in entries}
    for layer in config["layers"]:
        inner = layer["config"]
        if "layers" in inner:                      # a nested functional model
            _set_policy(inner, policy)
        elif layer["class_name"] != "InputLayer":
            inner["dtype"] = "float32" if inner["name"] in outputs else policy


def with_compute_precision(model: keras.Model, policy: str) -> keras.Model:
    """``model`` rebuilt under the dtype ``policy`` (one of :data:`POLICIES`), same weights.

    Returns ``model`` itself when every layer already uses ``policy`` (the outputs aside).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown precision {policy!r}; expected one of {POLICIES}")
    current = {layer.dtype_policy.name for layer in model.layers[1:-1]}
    if current == {policy}:
        return model
    config = copy.deepcopy(model.get_config())
    _set_policy(config, policy)
    return _rebuilt(model, config)


def with_input_size(model: keras.Model, size: int) -> keras.Model:
    """``model`` rebuilt for ``(N, size, size, C)`` inputs, same weights (``model`` itself when it
    already takes that size).

    Raises:
        ValueError: the weights do not fit the resized network (a layer whose weights depend on the
            input size, e.g. Flatten then Dense), or ``size`` is not valid for it.
    """
    if tuple(model.input_shape[1:3]) == (size, size):
        return model
    config = copy.deepcopy(model.get_config())
    inputs = [layer for layer in config["layers"] if layer["class_name"] == "InputLayer"]
    if len(inputs) != 1:
        raise ValueError(f"expected one input layer, found {len(inputs)}")
    shape = list(inputs[0]["config"]["batch_shape"])
    shape[1:3] = [size, size]
    inputs[0]["config"]["batch_shape"] = tuple(shape)
    return _rebuilt(model, config)


def built_from_config(model: keras.Model, config: dict) -> keras.Model:
    """A new, freshly initialised model of ``model``'s class from ``config`` (the package's custom
    layers known)."""
    from radlogics_repro.models.weights import CUSTOM_OBJECTS

    with keras.saving.custom_object_scope(CUSTOM_OBJECTS):
        return model.__class__.from_config(config)


def _rebuilt(model: keras.Model, config: dict) -> keras.Model:
    """A new model of ``model``'s class from ``config``, with ``model``'s weights."""
    rebuilt = built_from_config(model, config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt
