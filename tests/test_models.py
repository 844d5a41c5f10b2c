"""Tests of radlogics_repro.models: architecture, in-model preprocessing, weights policy, FLOPs.

Every model is built with random weights (never a download): keras' download function is replaced
by one that fails the test if anything tries to fetch a file, and the offline behaviour is simulated
by making it raise what keras raises when the URL fetch fails.
"""

from __future__ import annotations

import hashlib
import logging

import keras
import keras.src.utils.file_utils as keras_file_utils
import numpy as np
import pytest

from radlogics_repro.models import (
    GRADCAM_LAYERS,
    ImageNetCaffePreprocess,
    ModelLoadError,
    PretrainedWeightsError,
    build_lung_unet,
    build_slice_classifier,
    count_flops,
    init_record,
    load_model,
)
from radlogics_repro.models.weights import FALLBACK_RECORD, resolve_backbone

VGG_ENCODER_LAYERS = (
    "block1_conv1 block1_conv2 block2_conv1 block2_conv2 block3_conv1 block3_conv2 block3_conv3 "
    "block4_conv1 block4_conv2 block4_conv3 block5_conv1 block5_conv2 block5_conv3"
).split()
VGG16_NOTOP_PARAMS = 14_714_688  # keras.applications.VGG16(include_top=False).count_params()
OFFLINE = "URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -3] no network"


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any keras download attempt fails the test (AssertionError is not a download failure, so the
    weights policy re-raises it instead of falling back)."""

    def forbidden(fname, *args, **kwargs):
        raise AssertionError(f"test tried to download {fname}")

    monkeypatch.setattr(keras_file_utils, "get_file", forbidden)


@pytest.fixture(scope="module")
def unet224():
    return build_lung_unet(encoder_weights=None)


@pytest.fixture(scope="module")
def classifier224():
    return build_slice_classifier(weights=None)


@pytest.fixture(scope="module")
def images224():
    return np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def saved_small_unet(tmp_path_factory):
    """A 64 x 64 U-Net with random weights, and the .keras file it was saved to."""
    model = build_lung_unet(input_shape=(64, 64, 3), encoder_weights=None)
    path = tmp_path_factory.mktemp("unet") / "lung_unet.keras"
    model.save(path)
    return model, path


def _weights_equal(model_a, model_b, names):
    return all(
        all(
            np.array_equal(a, b)
            for a, b in zip(
                model_a.get_layer(n).get_weights(), model_b.get_layer(n).get_weights(), strict=True
            )
        )
        for n in names
    )


def _offline_get_file(calls):
    def fake(fname, *args, **kwargs):
        calls.append(fname)
        raise Exception(OFFLINE)  # exactly what keras' get_file raises on a URL fetch failure

    return fake


# ------------------------------------------------------------------------------------------------
# U-Net
# ------------------------------------------------------------------------------------------------
def test_unet_output_shape_dtype_and_range(unet224, images224):
    assert unet224.name == "lung_unet"
    out = unet224.predict(images224, verbose=0)
    assert out.shape == (2, 224, 224, 1)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert unet224.get_layer("lung_mask").dtype_policy.compute_dtype == "float32"


def test_unet_vgg_layers_are_direct_layers(unet224):
    names = [layer.name for layer in unet224.layers]
    assert [n for n in names if n in VGG_ENCODER_LAYERS] == VGG_ENCODER_LAYERS
    assert not any(isinstance(layer, keras.Model) for layer in unet224.layers)
    assert "block5_pool" not in names  # the bottleneck is block5_conv3
    assert names[:2] == ["image", "imagenet_preprocess"]


def test_unet_skip_wiring(unet224):
    expected = {1: ("block4_conv3", 28), 2: ("block3_conv3", 56), 3: ("block2_conv2", 112)}
    expected[4] = ("block1_conv2", 224)
    below = unet224.get_layer("block5_conv3")
    for level, (skip, size) in expected.items():
        concat = unet224.get_layer(f"decoder{level}_concat")
        upsampled, skip_tensor = concat.input
        assert skip_tensor is unet224.get_layer(skip).output
        assert tuple(upsampled.shape[1:3]) == (size, size)
        assert tuple(skip_tensor.shape[1:3]) == (size, size)
        # the up-sampled branch comes from the level below (the bottleneck for level 1)
        up = unet224.get_layer(f"decoder{level}_up")
        assert upsampled is up.output
        assert up.input is below.output
        below = unet224.get_layer(f"decoder{level}_2_relu")


def _expected_decoder_params(widths):
    """Decoder parameters by hand: per level conv1 (3x3, in = up + skip channels, no bias) +
    BN (4 per channel) + conv2 (3x3, no bias) + BN; then the 1x1 sigmoid head with bias."""
    skips = (512, 256, 128, 64)  # block4_conv3, block3_conv3, block2_conv2, block1_conv2
    below, total = 512, 0  # block5_conv3
    for width, skip in zip(widths, skips, strict=True):
        total += 9 * (below + skip) * width + 4 * width + 9 * width * width + 4 * width
        below = width
    return total + below + 1


@pytest.mark.parametrize("widths", [(64, 32, 16, 8), (128, 64, 32, 16)])
def test_unet_decoder_widths_set_parameter_count(widths):
    model = build_lung_unet(input_shape=(32, 32, 3), encoder_weights=None, decoder_filters=widths)
    assert model.count_params() == VGG16_NOTOP_PARAMS + _expected_decoder_params(widths)


def test_unet_default_widths_parameter_count(unet224):
    assert unet224.count_params() == VGG16_NOTOP_PARAMS + _expected_decoder_params(
        (256, 128, 64, 32)
    )


@pytest.mark.parametrize("builder", ["unet", "classifier"])
def test_outputs_stay_float32_under_mixed_precision(builder):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        if builder == "unet":
            model = build_lung_unet(input_shape=(32, 32, 3), encoder_weights=None)
        else:
            model = build_slice_classifier(input_shape=(32, 32, 3), weights=None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    first_conv = "block1_conv1" if builder == "unet" else "conv1_conv"
    assert model.get_layer(first_conv).compute_dtype == "float16"
    out = model.predict(np.full((1, 32, 32, 3), 0.5, np.float32), verbose=0)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))


@pytest.mark.parametrize("shape", [(224, 224, 1), (40, 64, 3), (16, 16, 3)])
def test_unet_rejects_bad_input_shape(shape):
    with pytest.raises(ValueError, match=r"input"):
        build_lung_unet(input_shape=shape, encoder_weights=None)


# ------------------------------------------------------------------------------------------------
# Classifier
# ------------------------------------------------------------------------------------------------
def test_classifier_output_shape_and_range(classifier224, images224):
    assert classifier224.name == "slice_classifier"
    out = classifier224.predict(images224, verbose=0)
    assert out.shape == (2, 1)
    assert out.dtype == np.float32
    assert np.all((out >= 0.0) & (out <= 1.0))


def test_classifier_head_structure(classifier224):
    names = [layer.name for layer in classifier224.layers]
    head = classifier224.layers[names.index("head_gap") + 1 :]
    dense = [layer for layer in head if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [256, 64, 1]
    assert [d.activation.__name__ for d in dense] == ["relu", "relu", "sigmoid"]
    assert dense[-1].name == "covid_probability" and dense[-1] is classifier224.layers[-1]
    assert dense[-1].dtype_policy.compute_dtype == "float32"
    assert [type(layer).__name__ for layer in head] == [
        "Dense",
        "Dropout",
        "Dense",
        "Dropout",
        "Dense",
    ]
    assert [layer.rate for layer in head if isinstance(layer, keras.layers.Dropout)] == [0.3, 0.3]
    # the head sits on the last ResNet-50 block (original top removed)
    assert (
        classifier224.get_layer("head_gap").input
        is classifier224.get_layer("conv5_block3_out").output
    )


def test_classifier_gradcam_layers_are_direct_layers(classifier224):
    assert GRADCAM_LAYERS == ("conv4_block6_out", "conv3_block4_out")
    assert not any(isinstance(layer, keras.Model) for layer in classifier224.layers)
    assert classifier224.get_layer("conv4_block6_out").output.shape == (None, 14, 14, 1024)
    assert classifier224.get_layer("conv3_block4_out").output.shape == (None, 28, 28, 512)
    # what a Grad-CAM tool builds: maps and prediction from the classifier's own graph
    probe = keras.Model(
        classifier224.inputs,
        [classifier224.get_layer(n).output for n in GRADCAM_LAYERS] + [classifier224.output],
    )
    assert len(probe.outputs) == 3


# ------------------------------------------------------------------------------------------------
# In-model ImageNet preprocessing
# ------------------------------------------------------------------------------------------------
def test_preprocess_layer_hand_computed():
    layer = ImageNetCaffePreprocess()
    pixels = np.array([[[[1.0, 1.0, 1.0], [0.1, 0.5, 0.9]]]], dtype=np.float32)  # (1, 1, 2, 3)
    out = keras.ops.convert_to_numpy(layer(pixels))
    # white: 255 minus the BGR mean; RGB (0.1, 0.5, 0.9): channels reversed, x 255, minus mean
    np.testing.assert_allclose(
        out[0, 0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68], rtol=1e-6
    )
    np.testing.assert_allclose(
        out[0, 0, 1], [229.5 - 103.939, 127.5 - 116.779, 25.5 - 123.68], rtol=1e-5, atol=1e-4
    )
    reference = keras.applications.vgg16.preprocess_input(255.0 * pixels.copy())
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-4)


def test_preprocess_layer_config_round_trip():
    layer = ImageNetCaffePreprocess(input_scale=1.0, name="pre")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(clone, ImageNetCaffePreprocess)
    assert clone.input_scale == 1.0 and clone.name == "pre"


# ------------------------------------------------------------------------------------------------
# Weights policy
# ------------------------------------------------------------------------------------------------
def test_random_init_record(unet224, classifier224):
    assert init_record(unet224) == "random"
    assert init_record(classifier224) == "random"
    for spelling in ("null", "random", "None"):
        _, record = resolve_backbone(
            "vgg16", weights=spelling, input_tensor=keras.Input((32, 32, 3))
        )
        assert record == "random"


def test_local_weights_file_round_trip(tmp_path):
    source, _ = resolve_backbone("vgg16", weights=None, input_tensor=keras.Input((32, 32, 3)))
    path = tmp_path / "encoder.weights.h5"
    source.save_weights(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    model = build_lung_unet(input_shape=(32, 32, 3), encoder_weights=str(path))
    assert init_record(model) == f"file: encoder.weights.h5 (sha256 {sha})"
    assert _weights_equal(model, source, VGG_ENCODER_LAYERS)
    fresh = build_lung_unet(input_shape=(32, 32, 3), encoder_weights=None)
    assert not _weights_equal(fresh, source, VGG_ENCODER_LAYERS)


def test_legacy_h5_file_is_accepted(tmp_path):
    """The Keras ImageNet files are legacy .h5 files; a legacy .h5 of the backbone must load."""
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_legacy.h5"
    source.save(path)  # legacy HDF5 format (keras logs that it is legacy)
    model, record = resolve_backbone("vgg16", weights=path, input_tensor=keras.Input((32, 32, 3)))
    assert record.startswith("file: vgg16_legacy.h5 (sha256 ")
    assert _weights_equal(model, source, VGG_ENCODER_LAYERS)


def test_keras_model_file_copies_encoder_by_name(saved_small_unet):
    trained, path = saved_small_unet
    model = build_lung_unet(input_shape=(32, 32, 3), encoder_weights=path)
    assert init_record(model).startswith("file: lung_unet.keras (sha256 ")
    assert _weights_equal(model, trained, VGG_ENCODER_LAYERS)


def test_keras_model_file_without_backbone_layers_is_refused(tmp_path):
    path = tmp_path / "tiny.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")]).save(path)
    with pytest.raises(PretrainedWeightsError, match="no layer named 'block1_conv1'") as info:
        resolve_backbone("vgg16", weights=path, input_tensor=keras.Input((32, 32, 3)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["other_architecture", "not_hdf5", "missing", "bad_suffix"])
def test_wrong_weights_file_gives_one_line_error_naming_it(tmp_path, kind):
    if kind == "other_architecture":
        path = tmp_path / "tiny.weights.h5"
        keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]).save_weights(path)
    elif kind == "not_hdf5":
        path = tmp_path / "junk.weights.h5"
        path.write_text("not an HDF5 file")
    elif kind == "missing":
        path = tmp_path / "absent.weights.h5"
    else:
        path = tmp_path / "weights.txt"
        path.write_text("x")
    with pytest.raises(PretrainedWeightsError) as info:
        resolve_backbone("vgg16", weights=str(path), input_tensor=keras.Input((32, 32, 3)))
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "backbone, expected_file",
    [
        ("vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ],
)
def test_offline_imagenet_falls_back_with_one_warning(
    monkeypatch, caplog, tmp_path, backbone, expected_file
):
    calls = []
    monkeypatch.setattr(keras_file_utils, "get_file", _offline_get_file(calls))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    caplog.set_level(logging.WARNING)

    model, record = resolve_backbone(
        backbone, weights="imagenet", input_tensor=keras.Input((32, 32, 3))
    )

    assert record == FALLBACK_RECORD == "random (imagenet unavailable)"
    assert calls == [expected_file]  # keras asked for exactly this file
    warnings_logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_logged) == 1
    message = warnings_logged[0].getMessage()
    assert expected_file in message
    assert "model.weights=" in message
    assert str(tmp_path / "keras_home" / "models") in message
    assert "URL fetch failure" in message
    assert isinstance(model, keras.Model)
    assert not (tmp_path / "keras_home").exists()  # nothing written to the keras cache


def test_offline_unet_still_builds_and_records_fallback(monkeypatch, caplog):
    monkeypatch.setattr(keras_file_utils, "get_file", _offline_get_file([]))
    caplog.set_level(logging.WARNING)
    model = build_lung_unet(input_shape=(32, 32, 3), encoder_weights="imagenet")
    assert init_record(model) == "random (imagenet unavailable)"
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert [n for n in (layer.name for layer in model.layers) if n in VGG_ENCODER_LAYERS] == (
        VGG_ENCODER_LAYERS
    )
    assert model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 32, 32, 1)


def test_offline_with_require_pretrained_raises(monkeypatch):
    monkeypatch.setattr(keras_file_utils, "get_file", _offline_get_file([]))
    with pytest.raises(PretrainedWeightsError, match="vgg16_weights_tf_dim_ordering") as info:
        build_lung_unet(input_shape=(32, 32, 3), require_pretrained=True)
    assert "model.weights=" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PretrainedWeightsError, match="random"):
        resolve_backbone(
            "vgg16", weights=None, input_tensor=keras.Input((32, 32, 3)), require_pretrained=True
        )


def test_programming_errors_are_not_taken_for_offline(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a download failure")

    monkeypatch.setattr(keras_file_utils, "get_file", broken)
    with pytest.raises(ValueError, match="a bug"):
        resolve_backbone("vgg16", weights="imagenet", input_tensor=keras.Input((32, 32, 3)))


def test_imagenet_file_in_cache_is_used(monkeypatch, tmp_path):
    """keras' get_file returns the cached file without network; simulate that with our own file."""
    source, _ = resolve_backbone("vgg16", weights=None, input_tensor=keras.Input((32, 32, 3)))
    cached = tmp_path / "cached.weights.h5"
    source.save_weights(cached)
    monkeypatch.setattr(keras_file_utils, "get_file", lambda *a, **k: str(cached))
    model, record = resolve_backbone(
        "vgg16", weights="imagenet", input_tensor=keras.Input((32, 32, 3))
    )
    assert record == "imagenet"
    assert _weights_equal(model, source, VGG_ENCODER_LAYERS)


# ------------------------------------------------------------------------------------------------
# Saved models
# ------------------------------------------------------------------------------------------------
def test_saved_unet_round_trip(saved_small_unet):
    model, path = saved_small_unet
    loaded = load_model(path)
    x = np.random.default_rng(1).random((2, 64, 64, 3), dtype=np.float32)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    assert isinstance(loaded.get_layer("imagenet_preprocess"), ImageNetCaffePreprocess)
    assert init_record(loaded) is None  # the record lives in metrics.json, not in the file


def test_saved_classifier_round_trip(tmp_path):
    model = build_slice_classifier(input_shape=(64, 64, 3), weights=None)
    path = tmp_path / "slice_classifier.keras"
    model.save(path)
    loaded = load_model(path)
    x = np.random.default_rng(2).random((2, 64, 64, 3), dtype=np.float32)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    assert loaded.get_layer("conv4_block6_out").output.shape == (None, 4, 4, 1024)


def test_load_model_refuses_lambda_layer(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    path = tmp_path / "with_lambda.keras"
    model.save(path)
    with pytest.raises(ModelLoadError, match="safe mode") as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_model_missing_or_not_keras(tmp_path):
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_model(tmp_path / "absent.keras")
    assert "absent.keras" in str(info.value)
    fake = tmp_path / "fake.keras"
    fake.write_text("not a zip archive")
    with pytest.raises(ModelLoadError, match="not a Keras .keras file") as info:
        load_model(fake)
    assert str(fake) in str(info.value)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def test_count_flops_tiny_model_by_hand():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="valid")(inputs)  # -> (6, 6, 4)
    x = keras.layers.Flatten()(x)  # 144
    outputs = keras.layers.Dense(5)(x)
    model = keras.Model(inputs, outputs)
    conv_macs = 6 * 6 * 4 * (3 * 3 * 3)  # output positions x filters x (kernel x in channels)
    dense_macs = 144 * 5
    assert count_flops(model) == 2 * (conv_macs + dense_macs) == 9216


def test_count_flops_strided_and_transposed_conv_by_hand():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(3, 3, strides=2, padding="same")(inputs)  # -> (4, 4, 3)
    outputs = keras.layers.Conv2DTranspose(5, 2, strides=2)(x)  # -> (8, 8, 5)
    model = keras.Model(inputs, outputs)
    conv_macs = 4 * 4 * 3 * (3 * 3 * 2)
    transpose_macs = 4 * 4 * 3 * (2 * 2) * 5  # every input value x kernel x filters
    assert count_flops(model) == 2 * (conv_macs + transpose_macs)


def test_count_flops_matches_published_figures(classifier224):
    # ResNet-50 at 224: ~7.75 GFLOP (2 x 3.87 GMACs); the dense head adds ~0.001 GFLOP
    assert count_flops(classifier224) == pytest.approx(7.75e9, rel=0.02)
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert count_flops(vgg) == pytest.approx(30.7e9, rel=0.01)  # VGG16 convolutional part


def test_auto_precision_is_bfloat16_only_on_cpus_that_have_it(monkeypatch):
    from radlogics_repro.models import precision

    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda: True)
    assert precision.resolve_precision("auto") == "mixed_bfloat16"   # no GPU in the test machine
    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda: False)
    assert precision.resolve_precision("auto") == "model"
    assert precision.resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve_precision("int8")


def test_a_model_rebuilt_at_bfloat16_keeps_weights_and_float32_outputs():
    import numpy as np

    from radlogics_repro import models

    model = models.build_slice_classifier(input_shape=(32, 32, 3), weights=None, dense_units=(8, 4))
    fast = models.with_compute_precision(model, "mixed_bfloat16")
    assert fast.get_layer("conv4_block6_out").compute_dtype == "bfloat16"
    assert fast.output.dtype == "float32"
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    assert np.abs(model.predict_on_batch(x) - fast.predict_on_batch(x)).max() < 0.02
    back = models.with_compute_precision(fast, "float32")
    np.testing.assert_array_equal(model.predict_on_batch(x), back.predict_on_batch(x))
    assert models.with_compute_precision(model, "float32") is model


def _randomize_batchnorm(model, seed: int = 0) -> None:
    """Non-trivial inference statistics, so that folding them changes the weights."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n),
                               rng.normal(0, 0.2, n), rng.uniform(0.5, 2.0, n)])


@pytest.mark.parametrize("builder", ["classifier", "unet"])
def test_folded_batchnorm_computes_the_same_function_and_keeps_layer_names(builder):
    """Inference copy (analyze runs it): no BatchNormalization left, the same outputs and the same
    activations at the Grad-CAM layers, up to float32 rounding."""
    import tensorflow as tf

    from radlogics_repro.models import fold_batchnorm

    keras.utils.set_random_seed(4)
    if builder == "classifier":
        model = build_slice_classifier(input_shape=(64, 64, 3), weights=None, dense_units=(8, 4))
    else:
        model = build_lung_unet(input_shape=(64, 64, 3), encoder_weights=None,
                                decoder_filters=(8, 8, 8, 8))
    _randomize_batchnorm(model)
    n_batchnorm = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert n_batchnorm > 0
    folded = fold_batchnorm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert [layer.name for layer in folded.layers] == [layer.name for layer in model.layers]
    x = np.random.default_rng(1).random((4, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(folded.predict_on_batch(x), model.predict_on_batch(x), atol=2e-5)
    if builder == "classifier":
        names = list(GRADCAM_LAYERS)
        probe = [keras.Model(m.inputs, [m.get_layer(n).output for n in names]) for m in (model, folded)]
        for a, b in zip(*(p(tf.constant(x), training=False) for p in probe), strict=True):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4)
    assert fold_batchnorm(folded) is folded             # nothing left to fold


def test_batchnorm_after_an_activation_or_a_shared_output_is_not_folded():
    from radlogics_repro.models import fold_batchnorm

    x = keras.Input((8, 8, 2))
    relu_conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="relu_conv")(x)
    after_relu = keras.layers.BatchNormalization(name="after_relu")(relu_conv)
    shared = keras.layers.Conv2D(3, 1, name="shared")(after_relu)
    after_shared = keras.layers.BatchNormalization(name="after_shared")(shared)
    plain = keras.layers.Conv2D(3, 1, use_bias=False, name="plain")(after_shared)
    after_plain = keras.layers.BatchNormalization(name="after_plain")(plain)
    model = keras.Model(x, keras.layers.Add()([after_plain, shared]))
    _randomize_batchnorm(model, seed=1)
    folded = fold_batchnorm(model)
    kinds = {layer.name: type(layer).__name__ for layer in folded.layers}
    assert kinds["after_relu"] == kinds["after_shared"] == "BatchNormalization"
    assert kinds["after_plain"] == "Identity" and folded.get_layer("plain").use_bias
    inputs = np.random.default_rng(2).normal(size=(2, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(folded.predict_on_batch(inputs), model.predict_on_batch(inputs), atol=1e-5)
