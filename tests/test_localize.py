"""Tests of radlogics_repro.localize: Grad-CAM engines, normalization, fusion, crop -> slice mapping.

The classifier is built once per module with random weights (never a download) and a fixed seed;
the batch is two random [0, 1] images at 224.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from radlogics_repro.localize import (
    GradcamError,
    _fused_function,  # the cached compiled function
    classify_keeping_cut,
    cut_layer,
    fine_map_in_slice,
    fuse_maps,
    gradcam_maps,
    gradcam_maps_from_cut,
    gradcam_scales,
    normalize_maps,
    scale_maps,
    scales_from_maxima,
)
from radlogics_repro.models import GRADCAM_LAYERS, build_slice_classifier
from radlogics_repro.preprocess import Box, crop_and_resize

L14, L28 = "conv4_block6_out", "conv3_block4_out"


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    return build_slice_classifier(weights=None)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def fused(classifier, images):
    return gradcam_maps(classifier, images, engine="fused", batch_size=2)


@pytest.fixture(scope="module")
def reference(classifier, images):
    return gradcam_maps(classifier, images, engine="tf-keras-vis", batch_size=2)


# ------------------------------------------------------------------------------------------------
# the two engines
# ------------------------------------------------------------------------------------------------
def test_paper_layers_are_default():
    assert GRADCAM_LAYERS == (L14, L28)


def test_raw_maps_have_the_layer_grids_and_are_not_degenerate(fused):
    assert fused.raw[L14].shape == (2, 14, 14)
    assert fused.raw[L28].shape == (2, 28, 28)
    for name in (L14, L28):
        raw = fused.raw[name]
        assert raw.min() >= 0.0  # ReLU
        for i in range(2):
            # a real map: positive somewhere, not flat, and zero or smaller elsewhere
            assert raw[i].max() > 0.0
            assert np.count_nonzero(raw[i]) >= 10
            assert np.ptp(fused.normalized[name][i]) == pytest.approx(1.0)


def test_fused_and_tf_keras_vis_give_the_same_maps(fused, reference):
    for name in (L14, L28):
        diff = np.abs(fused.normalized[name] - reference.normalized[name]).max()
        assert diff <= 1e-3, f"{name}: max |difference| {diff}"
        # and the raw maps agree to float rounding relative to their scale
        scale = reference.raw[name].max()
        assert np.abs(fused.raw[name] - reference.raw[name]).max() <= 1e-3 * scale
    assert np.abs(fused.fine - reference.fine).max() <= 2e-3


def test_probabilities_equal_the_model_output(classifier, images, fused, reference):
    expected = classifier(images, training=False).numpy()[:, 0]
    np.testing.assert_allclose(fused.probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(reference.probabilities, expected, atol=1e-5)
    assert fused.probabilities.shape == (2,) and fused.probabilities.dtype == np.float32


def test_fine_map_is_the_product_of_the_resized_normalized_maps(fused):
    assert fused.fine.shape == (2, 224, 224)
    assert fused.fine.dtype == np.float32
    assert 0.0 <= fused.fine.min() and fused.fine.max() <= 1.0
    assert fused.fine.max() > 0.0
    up14 = tf.image.resize(fused.normalized[L14][..., None], (224, 224), "bilinear").numpy()
    up28 = tf.image.resize(fused.normalized[L28][..., None], (224, 224), "bilinear").numpy()
    np.testing.assert_allclose(fused.fine, (up14 * up28)[..., 0], atol=1e-6)


def test_single_layer_ablation(classifier, images, fused):
    for name, side in ((L14, 14), (L28, 28)):
        one = gradcam_maps(classifier, images, layers=(name,), batch_size=2)
        assert one.layers == (name,) and set(one.raw) == {name}
        assert one.raw[name].shape == (2, side, side)
        np.testing.assert_allclose(one.raw[name], fused.raw[name], rtol=1e-4,
                                   atol=1e-6 * fused.raw[name].max())
        resized = tf.image.resize(one.normalized[name][..., None], (224, 224)).numpy()[..., 0]
        np.testing.assert_allclose(one.fine, resized, atol=1e-6)


def test_batch_size_does_not_change_results(classifier, images, fused):
    # same compiled function for batches of 1 and 2 (no retrace); oneDNN may block the convolutions
    # differently by batch size, so agreement is to float rounding, as between the engines
    single = gradcam_maps(classifier, images, batch_size=1)
    np.testing.assert_allclose(single.probabilities, fused.probabilities, atol=1e-5)
    np.testing.assert_allclose(single.normalized[L28], fused.normalized[L28], atol=1e-3)
    assert _fused_function(classifier, GRADCAM_LAYERS).experimental_get_tracing_count() == 1


def test_bad_inputs_are_reported(classifier, images):
    with pytest.raises(GradcamError, match="no layer"):
        gradcam_maps(classifier, images, layers=("conv9_block1_out",))
    with pytest.raises(GradcamError, match="engine"):
        gradcam_maps(classifier, images, engine="scorecam")
    with pytest.raises(GradcamError, match=r"\[0, 1\]"):
        gradcam_maps(classifier, images * 255.0)
    with pytest.raises(GradcamError, match="shape"):
        gradcam_maps(classifier, images[..., 0])


# ------------------------------------------------------------------------------------------------
# normalization and fusion (no model)
# ------------------------------------------------------------------------------------------------
def test_normalize_hand_values_and_constant_maps():
    maps = np.stack([
        np.array([[0.0, 1.0], [2.0, 4.0]]),  # -> 0, .25, .5, 1
        np.full((2, 2), 3.0),  # constant -> zeros
        np.zeros((2, 2)),  # all zero -> zeros
    ]).astype(np.float32)
    out = normalize_maps(maps)
    np.testing.assert_allclose(out[0], [[0.0, 0.25], [0.5, 1.0]])
    assert np.all(out[1] == 0.0) and np.all(out[2] == 0.0)
    assert not np.isnan(out).any()
    # small but real contrast is kept (Grad-CAM maps of confident images are tiny)
    np.testing.assert_allclose(normalize_maps(maps[:1] * 1e-9)[0], out[0], atol=1e-6)


def test_fuse_hand_values():
    # 2 x 2 maps upsampled to 4 x 4 with half-pixel centres: output row i samples input row
    # (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped 0, 0.25, 0.75, 1 between rows 0 and 1
    a = np.array([[[0.0, 0.0], [1.0, 1.0]]], np.float32)  # rows 0 -> 1
    b = np.array([[[1.0, 1.0], [1.0, 1.0]]], np.float32)
    fine = fuse_maps([a, b], (4, 4))
    np.testing.assert_allclose(fine[0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(fuse_maps([a, a], (4, 4))[0, :, 0], [0.0, 0.0625, 0.5625, 1.0],
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------
# crop -> slice
# ------------------------------------------------------------------------------------------------
def crop_map_with_block() -> np.ndarray:
    """224 x 224 crop map: 1 on rows 56..111 and columns 112..167 (inclusive), 0 elsewhere."""
    m = np.zeros((224, 224), np.float32)
    m[56:112, 112:168] = 1.0
    return m


def test_fine_map_lands_at_the_right_slice_pixels_same_scale():
    # box side 224 = crop side: slice pixel = box corner + crop pixel
    out = fine_map_in_slice(crop_map_with_block(), Box(100, 324, 50, 274), 512, 512)
    assert out.shape == (512, 512) and out.dtype == np.float32
    expected = np.zeros((512, 512), np.float32)
    expected[156:212, 162:218] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_fine_map_lands_at_the_right_slice_pixels_twice_the_scale():
    # box side 448: box-relative row r samples crop row (r + 0.5) / 2 - 0.5.
    # r = 113 .. 222 -> 56.25 .. 110.75: inside the block -> 1; r = 112 -> 55.75 and
    # r = 223 -> 111.25: 0.75; r = 111 -> 55.25: 0.25; r <= 110 and r >= 225: 0.
    out = fine_map_in_slice(crop_map_with_block(), Box(32, 480, 40, 488), 512, 512)
    rows = slice(32 + 113, 32 + 223)  # slice rows 145..254
    cols = slice(40 + 2 * 112 + 1, 40 + 2 * 168 - 1)  # slice cols 265..374
    assert np.all(np.abs(out[rows, cols] - 1.0) < 1e-6)
    assert out[32 + 112, 300] == pytest.approx(0.75)
    assert out[32 + 223, 300] == pytest.approx(0.75)
    assert out[32 + 111, 300] == pytest.approx(0.25)
    assert out[32 + 110, 300] == 0.0 and out[32 + 225, 300] == 0.0
    assert out[:100].max() == 0.0 and out[:, :200].max() == 0.0 and out[300:].max() == 0.0


def test_fine_map_box_reaching_outside_the_slice():
    out = fine_map_in_slice(crop_map_with_block(), Box(-20, 204, -10, 214), 200, 200)
    expected = np.zeros((200, 200), np.float32)
    expected[36:92, 102:158] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_crop_then_paste_round_trip():
    # a slice pattern cropped by preprocess.crop_and_resize comes back in place
    slice_img = np.zeros((512, 512), np.float32)
    slice_img[200:260, 220:300] = 1.0
    box = Box(100, 324, 50, 274)
    crop = crop_and_resize(slice_img[None], [box]).numpy()[0]
    np.testing.assert_allclose(fine_map_in_slice(crop, box, 512, 512)[100:324, 50:274],
                               slice_img[100:324, 50:274], atol=1e-6)


def test_fine_map_in_slice_rejects_a_batch():
    with pytest.raises(GradcamError, match="one"):
        fine_map_in_slice(np.zeros((2, 224, 224)), Box(0, 224, 0, 224), 224, 224)


# ------------------------------------------------------------------------------------------------
# classify first, Grad-CAM the positives from the cut
# ------------------------------------------------------------------------------------------------
def test_the_cut_is_the_lowest_gradcam_layer(classifier):
    assert cut_layer(classifier) == L28
    assert cut_layer(classifier, (L14,)) == L14


def test_maps_from_the_cut_equal_the_fused_engine(classifier, images, fused):
    probabilities, cut = classify_keeping_cut(classifier, images)
    assert cut.shape == (2, 28, 28, 512)
    np.testing.assert_allclose(probabilities, fused.probabilities, atol=1e-5)
    np.testing.assert_allclose(probabilities, classifier.predict_on_batch(images)[:, 0], atol=1e-5)
    from_cut = gradcam_maps_from_cut(classifier, cut, (224, 224))
    for name in GRADCAM_LAYERS:
        np.testing.assert_allclose(from_cut.normalized[name], fused.normalized[name], atol=1e-3)
    np.testing.assert_allclose(from_cut.fine, fused.fine, atol=1e-3)
    # a subset of the batch (the positives) gives that subset's maps
    second = gradcam_maps_from_cut(classifier, cut, (224, 224), rows=np.array([False, True]))
    np.testing.assert_allclose(second.fine[0], fused.fine[1], atol=1e-3)
    empty = gradcam_maps_from_cut(classifier, cut[:0], (224, 224))
    assert empty.fine.shape == (0, 224, 224) and empty.raw[L14].shape == (0, 14, 14)


def test_single_layer_from_the_cut(classifier, images, fused):
    _, cut = classify_keeping_cut(classifier, images, layers=(L14,))
    assert cut.shape == (2, 14, 14, 1024)
    one = gradcam_maps_from_cut(classifier, cut, (224, 224), layers=(L14,))
    np.testing.assert_allclose(one.normalized[L14], fused.normalized[L14], atol=1e-3)


# ------------------------------------------------------------------------------------------------
# the logit score
# ------------------------------------------------------------------------------------------------
def test_logit_maps_are_the_probability_maps_over_the_sigmoid_slope(classifier, images, fused):
    """d p / d A = p (1 - p) d logit / d A, and ReLU commutes with a positive factor."""
    logit = gradcam_maps(classifier, images, batch_size=2, score="logit")
    assert logit.score == "logit" and fused.score == "probability"
    np.testing.assert_allclose(logit.probabilities, fused.probabilities, atol=1e-6)
    p = fused.probabilities.astype(np.float64)
    slope = (p * (1 - p))[:, None, None]
    assert (slope > 1e-3).all()  # untrained: far from saturation, so the division is exact enough
    for name in GRADCAM_LAYERS:
        expected = fused.raw[name] / slope
        np.testing.assert_allclose(logit.raw[name], expected, rtol=1e-3, atol=1e-4 * expected.max())
        np.testing.assert_allclose(logit.normalized[name], fused.normalized[name], atol=1e-3)
    _, cut = classify_keeping_cut(classifier, images)
    from_cut = gradcam_maps_from_cut(classifier, cut, (224, 224), score="logit")
    for name in GRADCAM_LAYERS:
        np.testing.assert_allclose(from_cut.raw[name], logit.raw[name], rtol=1e-3,
                                   atol=1e-4 * logit.raw[name].max())


def test_unknown_score_or_engine_without_it_is_refused(classifier, images):
    with pytest.raises(GradcamError, match="unknown Grad-CAM score"):
        gradcam_maps(classifier, images, score="margin")
    with pytest.raises(GradcamError, match="needs engine 'fused'"):
        gradcam_maps(classifier, images, engine="tf-keras-vis", score="logit")


def test_fixed_scales_keep_weak_maps_weak(classifier, images):
    logit = gradcam_maps(classifier, images, batch_size=2, score="logit")
    maxima = {name: m.reshape(2, -1).max(axis=1) for name, m in logit.raw.items()}
    scales = gradcam_scales(classifier, images, 1.0, batch_size=2)
    for name in GRADCAM_LAYERS:
        assert scales[name] == pytest.approx(maxima[name].max(), rel=1e-4)
    fixed = gradcam_maps(classifier, images, batch_size=2, score="logit", scales=scales)
    weaker = int(np.argmin(maxima[L14]))
    for name in GRADCAM_LAYERS:
        np.testing.assert_allclose(fixed.normalized[name], np.clip(logit.raw[name] / scales[name], 0, 1),
                                   atol=1e-6)
    # the image with the weaker raw map does not reach 1 on the fixed scale (min-max would)
    assert fixed.normalized[L14][weaker].max() < 1.0 - 1e-3
    assert logit.normalized[L14][weaker].max() == pytest.approx(1.0)
    _, cut = classify_keeping_cut(classifier, images)
    from_cut = gradcam_maps_from_cut(classifier, cut, (224, 224), score="logit", scales=scales)
    np.testing.assert_allclose(from_cut.fine, fixed.fine, atol=1e-3)
    half = scales_from_maxima(maxima, 0.5)
    assert all(half[name] == pytest.approx(np.quantile(maxima[name], 0.5)) for name in half)
    with pytest.raises(GradcamError, match="no map scale"):
        gradcam_maps(classifier, images, score="logit", scales={L14: 1.0})
    with pytest.raises(GradcamError, match="finite number > 0"):
        scale_maps(logit.raw[L14], 0.0)
    with pytest.raises(GradcamError, match="quantile"):
        scales_from_maxima(maxima, 0.0)
