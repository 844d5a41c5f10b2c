"""Preprocessing and augmentation: hand-computed values, eagerly and inside tf.data.map."""

import numpy as np
import pytest
import tensorflow as tf

from radlogics_repro import augment, preprocess
from radlogics_repro.preprocess import Box


def test_window_hu_hand_values():
    hu = np.array([-2048.0, -1000.0, -750.0, -500.0, 0.0, 40.0, 1200.0])
    expected = [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(preprocess.window_hu(hu).numpy(), expected, atol=1e-7)


def test_window_hu_inside_tf_data_equals_eager():
    hu = np.linspace(-1500, 500, 64, dtype=np.float32).reshape(4, 4, 4)
    eager = preprocess.window_hu(hu).numpy()
    ds = tf.data.Dataset.from_tensor_slices(hu).map(preprocess.window_hu)
    graph = np.stack([x.numpy() for x in ds])
    np.testing.assert_array_equal(eager, graph)


def test_window_rejects_inverted_bounds():
    with pytest.raises(ValueError, match="upper"):
        preprocess.window_hu(np.zeros(3), lower=0, upper=-10)


def test_gray_image_conversion_is_the_same_for_every_mode():
    grey = np.array([[0, 128], [255, 64]], np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 255, np.uint8)], axis=-1)
    expected = grey / 255.0
    for image in (grey, rgb, rgba, grey[..., None]):
        np.testing.assert_allclose(preprocess.gray_image_to_unit(image), expected, atol=1e-6)
    # luma weights for colour: pure red -> 0.299
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert preprocess.gray_image_to_unit(red)[0, 0] == pytest.approx(0.299, abs=1e-6)


def test_resize_images_keeps_rank_and_labels_with_nearest():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 2
    out = preprocess.resize_images(masks, 16, nearest=True).numpy()
    assert out.shape == (2, 16, 16)
    assert set(np.unique(out)) == {0.0, 2.0}
    assert out[0, 4:12, 4:12].min() == 2 and out[0, :4].max() == 0


def test_model_input_has_three_equal_channels():
    hu = np.full((3, 32, 32), -500.0, np.float32)
    out = preprocess.hu_slices_to_model_input(hu, 16).numpy()
    assert out.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_lung_bounding_box_hand_computed():
    mask = np.zeros((100, 100), bool)
    mask[20:40, 30:80] = True  # rows 20..39, cols 30..79
    # margin 5 mm at 0.5 mm pixels -> 10 px: rows [10, 50), cols [20, 90) -> 40 x 70, square 70
    box = preprocess.lung_bounding_box(mask, (0.5, 0.5), margin_mm=5.0)
    assert box == Box(y0=10 - 15, y1=10 - 15 + 70, x0=20, x1=90)
    assert box.height == box.width == 70
    assert preprocess.lung_bounding_box(np.zeros((5, 5)), (1, 1)) is None


def test_lung_bounding_box_uses_row_and_column_spacing():
    mask = np.zeros((50, 50), bool)
    mask[20:30, 20:30] = True
    box = preprocess.lung_bounding_box(mask, (1.0, 2.0), margin_mm=4.0)  # 4 rows, 2 columns
    # rows [16, 34) = 18, cols [18, 32) = 14 -> square 18, cols grown by 2 on each side
    assert box == Box(16, 34, 16, 34)


def test_crop_and_resize_identity_box_and_known_pixels():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    same = preprocess.crop_and_resize(image, [Box(0, 4, 0, 4)], 4).numpy()
    np.testing.assert_allclose(same, image, atol=1e-5)
    # the 2x2 box rows 1..2, cols 2..3 resized to 2x2 is the box itself
    sub = preprocess.crop_and_resize(image, [Box(1, 3, 2, 4)], 2).numpy()
    np.testing.assert_allclose(sub[0], [[6, 7], [10, 11]], atol=1e-5)
    # outside the image reads as 0
    out = preprocess.crop_and_resize(np.ones((1, 4, 4), np.float32), [Box(-4, 4, 0, 8)], 2,
                                     nearest=True).numpy()
    np.testing.assert_allclose(out[0], [[0, 0], [1, 0]])


def test_paste_into_slice_inverts_crop():
    height, width = 60, 80
    box = Box(10, 40, 30, 60)
    crop_map = np.zeros((30, 30), np.float32)
    crop_map[5:15, 10:20] = 1.0  # a block in crop pixels, crop size == box size here
    pasted = preprocess.paste_into_slice(crop_map, box, height, width)
    assert pasted.shape == (height, width)
    np.testing.assert_allclose(pasted[15:25, 40:50], 1.0)
    assert pasted.sum() == pytest.approx(100.0)
    # resized round trip: crop a slice then paste back -> same pixels inside the box
    slice_ = np.random.default_rng(0).random((height, width)).astype(np.float32)
    slice_ = tf.image.resize(slice_[None, ..., None], (height, width))[0, ..., 0].numpy()
    crop = preprocess.crop_and_resize(slice_[None], [box], 30).numpy()[0]
    back = preprocess.paste_into_slice(crop, box, height, width)
    np.testing.assert_allclose(back[10:40, 30:60], slice_[10:40, 30:60], atol=1e-5)


def test_paste_clips_boxes_outside_the_slice():
    out = preprocess.paste_into_slice(np.ones((4, 4), np.float32), Box(-2, 2, -2, 2), 3, 3)
    np.testing.assert_allclose(out, [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_slice_labels_from_masks():
    lesion = np.zeros((3, 10, 10), np.uint8)
    lesion[1, :5, :5] = 1  # 25 px
    lesion[2, :2, :2] = 2  # 4 px
    labels = preprocess.abnormal_slice_labels(lesion, pixel_area_mm2=1.0, min_lesion_area_mm2=25)
    np.testing.assert_array_equal(labels, [False, True, False])
    labels = preprocess.abnormal_slice_labels(lesion, pixel_area_mm2=10.0, min_lesion_area_mm2=25)
    np.testing.assert_array_equal(labels, [False, True, True])
    lung = np.zeros((2, 10, 10), np.uint8)
    lung[1, :4, :] = 2
    np.testing.assert_array_equal(preprocess.slices_with_lung(lung, 10.0, 400.0), [False, True])


# ---- augmentation ----------------------------------------------------------------------------


def _image_and_mask(size=32):
    mask = np.zeros((size, size, 1), np.float32)
    mask[8:20, 4:14] = 1.0
    image = np.where(mask > 0, 0.3, 0.8).astype(np.float32)
    return np.repeat(image, 3, axis=-1), mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_geometric_augmentation_keeps_image_and_mask_aligned(seed):
    image, mask = _image_and_mask()
    aug = augment.segmentation_augmenter(crop=True, flip=True, noise=False, crop_min_scale=0.6)
    out_image, out_mask = aug(tf.constant(image), tf.constant(mask), tf.constant([seed, 7]))
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    inside = out_mask[..., 0] > 0
    # the lung pixels of the image are 0.3, the rest 0.8: the mask must sit on the dark pixels
    # (away from the interpolated border)
    core = inside & (np.abs(out_image[..., 0] - 0.3) < 0.05)
    assert core.sum() >= 0.7 * inside.sum()
    assert np.all(out_image[..., 0][~inside & (np.abs(out_image[..., 0] - 0.8) > 0.05)] < 0.8)


def test_lung_noise_only_inside_lung_and_repeatable():
    image, mask = _image_and_mask()
    seed = tf.constant([3, 4])
    noisy = augment.lung_noise(tf.constant(image), tf.constant(mask), seed=seed).numpy()
    outside = mask[..., 0] == 0
    np.testing.assert_array_equal(noisy[outside], image[outside])
    inside_diff = noisy[~outside] - image[~outside]
    assert np.abs(inside_diff).max() > 0.01
    # scale 0.1 * N(0, 0.8): std about 0.08
    assert 0.04 < inside_diff[..., 0].std() < 0.12
    again = augment.lung_noise(tf.constant(image), tf.constant(mask), seed=seed).numpy()
    np.testing.assert_array_equal(noisy, again)


def test_lung_noise_probability_leaves_a_share_of_images_clean():
    """Noise on every image gives the mask away; with probability p about p of the images get it."""
    image, mask = _image_and_mask()
    image_t, mask_t = tf.constant(image), tf.constant(mask)

    def noisy(seed, probability):
        out = augment.lung_noise(image_t, mask_t, seed=tf.constant([seed, 9]), probability=probability)
        return not np.array_equal(out.numpy(), image)

    assert not any(noisy(s, 0.0) for s in range(20))
    assert all(noisy(s, 1.0) for s in range(20))
    share = np.mean([noisy(s, 0.5) for s in range(300)])
    assert 0.4 < share < 0.6   # binomial(300, 0.5): std 0.029
    aug = augment.segmentation_augmenter(crop=False, flip=False, noise=True, noise_probability=0.0)
    out_image, _ = aug(image_t, mask_t, tf.constant([1, 2]))
    np.testing.assert_array_equal(out_image.numpy(), image)


def test_segmentation_augmenter_noise_lands_inside_the_returned_mask():
    image, mask = _image_and_mask()
    aug = augment.segmentation_augmenter(crop=True, flip=True, noise=True)
    clean = augment.segmentation_augmenter(crop=True, flip=True, noise=False)
    seed = tf.constant([5, 6])
    noisy_image, out_mask = aug(tf.constant(image), tf.constant(mask), seed)
    clean_image, _ = clean(tf.constant(image), tf.constant(mask), seed)
    changed = np.abs(noisy_image.numpy() - clean_image.numpy())[..., 0] > 0
    assert changed.any()
    assert np.all(out_mask.numpy()[..., 0][changed] > 0)


@pytest.mark.parametrize("sigma_px, lag1_correlation", [(0.0, 0.0), (1.0, np.exp(-0.25))])
def test_scanner_noise_has_the_drawn_hu_level_and_the_kernel_correlation(sigma_px, lag1_correlation):
    """100 HU on the 1000 HU wide window is 0.1 on the [0, 1] scale; Gaussian-blurred white noise of
    sigma s has lag-1 correlation exp(-1 / (4 s^2))."""
    image = np.full((160, 160, 1), 0.5, np.float32)
    noisy = augment.scanner_noise(tf.constant(image), seed=tf.constant([7, 8]), noise_hu=(100.0, 100.0),
                                  sigma_px=sigma_px, probability=1.0).numpy()
    diff = (noisy - image)[8:-8, 8:-8, 0]                      # away from the zero-padded border
    assert diff.std() == pytest.approx(0.1, rel=0.08)
    lag1 = np.corrcoef(diff[:, :-1].ravel(), diff[:, 1:].ravel())[0, 1]
    assert lag1 == pytest.approx(lag1_correlation, abs=0.06)
    again = augment.scanner_noise(tf.constant(image), seed=tf.constant([7, 8]), noise_hu=(100.0, 100.0),
                                  sigma_px=sigma_px, probability=1.0).numpy()
    np.testing.assert_array_equal(noisy, again)
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0


def test_classifier_scanner_noise_leaves_the_other_augmentations_unchanged():
    """Switching the noise on must not change the geometric draws (same seed, same crop): with
    probability 0 the images equal those of the augmenter without noise, bit for bit."""
    image, _ = _image_and_mask()
    image_t, seed = tf.constant(image), tf.constant([11, 12])
    plain = augment.classification_augmenter(rotate=True, flip=True, crop=True)(image_t, seed).numpy()
    never = augment.classification_augmenter(rotate=True, flip=True, crop=True, noise=True,
                                              noise_probability=0.0)(image_t, seed).numpy()
    always = augment.classification_augmenter(rotate=True, flip=True, crop=True, noise=True,
                                               noise_hu=(80.0, 80.0), noise_probability=1.0)(image_t, seed)
    np.testing.assert_array_equal(never, plain)
    inside = (plain > 0.2) & (plain < 0.8)                    # where clipping does not cut the noise
    assert (always.numpy() - plain)[inside].std() == pytest.approx(0.08, rel=0.15)


def test_rotation_by_zero_range_is_identity_and_rotation_moves_pixels():
    image, _ = _image_and_mask()
    same = augment.random_rotation(tf.constant(image), seed=tf.constant([1, 2]), max_degrees=0.0)
    np.testing.assert_allclose(same.numpy(), image, atol=1e-5)
    turned = augment.random_rotation(tf.constant(image), seed=tf.constant([1, 2]), max_degrees=40)
    assert np.abs(turned.numpy() - image).max() > 0.1


def test_augmenters_run_inside_tf_data():
    image, mask = _image_and_mask()
    seg = augment.segmentation_augmenter(crop=True, flip=True, noise=True)
    cls = augment.classification_augmenter(rotate=True, flip=True, crop=True)
    ds = tf.data.Dataset.from_tensors((image, mask, tf.constant([1, 2])))
    out_image, out_mask = next(iter(ds.map(seg)))
    assert out_image.shape == image.shape and out_mask.shape == mask.shape
    eager = seg(tf.constant(image), tf.constant(mask), tf.constant([1, 2]))
    np.testing.assert_allclose(out_image.numpy(), eager[0].numpy(), atol=1e-6)
    out = next(iter(ds.map(lambda i, m, s: cls(i, s))))
    assert out.shape == image.shape
