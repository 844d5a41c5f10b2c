"""Manifest-driven slice datasets: splits by patient, slice selection, labels, tf.data pipelines."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from radlogics_repro import augment, data, io


def _write_case(folder, case_id, *, lesion: bool, n=10, size=32, spacing=(2.0, 1.0, 1.0)):
    """A box 'lung' (HU -850) in soft tissue (HU 40), slices 2..7; a lesion block (HU -500) on
    slices 4..5 when ``lesion``."""
    hu = np.full((n, size, size), 40.0, np.float32)
    lung = np.zeros(hu.shape, np.uint8)
    lung[2:8, 6:26, 4:14] = 1
    lung[2:8, 6:26, 18:28] = 2
    hu[lung > 0] = -850.0
    lesion_mask = np.zeros(hu.shape, np.uint8)
    if lesion:
        lesion_mask[4:6, 10:18, 6:12] = 1  # 48 px = 48 mm^2 per slice
        hu[lesion_mask > 0] = -500.0
    study = io.study_from_array(hu, spacing)
    image = io.save_volume(study, hu, folder / f"{case_id}.nii.gz", dtype=np.int16)
    lung_path = io.save_mask(study, lung, folder / f"{case_id}_lung.nii.gz")
    lesion_path = io.save_mask(study, lesion_mask, folder / f"{case_id}_lesion.nii.gz")
    return image.name, lung_path.name, lesion_path.name


@pytest.fixture
def manifest_path(tmp_path):
    rows = []
    plan = [("c1", "P1", "train", True), ("c2", "P1", "train", False), ("c3", "P2", "train", False),
            ("c4", "P3", "val", True), ("c5", "P4", "test", False)]
    for case_id, patient, split, lesion in plan:
        image, lung, lesion_path = _write_case(tmp_path, case_id, lesion=lesion)
        rows.append({"case_id": case_id, "patient_id": patient, "split": split, "label": int(lesion),
                     "image": image, "lung_mask": lung, "lesion_mask": lesion_path})
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_read_manifest_resolves_paths(manifest_path):
    frame = data.read_manifest(manifest_path, required=("image", "lung_mask"))
    assert len(frame) == 5
    assert all(p.startswith(str(manifest_path.parent)) for p in frame["image"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f.iloc[0:0], "no rows"),
        (lambda f: f.drop(columns=["patient_id"]), "patient_id"),
        (lambda f: f.assign(split=["train", "train", "train", "val", "holdout"]), "holdout"),
        (lambda f: f.assign(image=["nope.nii.gz"] + list(f["image"][1:])), "nope.nii.gz"),
        (lambda f: f.assign(patient_id=["P1", "P1", "P2", "P1", "P4"]), "several splits"),
    ],
)
def test_bad_manifests_name_the_problem(manifest_path, edit, message):
    frame = pd.read_csv(manifest_path)
    edit(frame).to_csv(manifest_path, index=False)
    with pytest.raises(data.DatasetError, match=message) as err:
        data.read_manifest(manifest_path)
    assert str(manifest_path) in str(err.value)


def test_missing_manifest_is_a_one_line_error(tmp_path):
    with pytest.raises(data.DatasetError, match="manifest not found"):
        data.read_manifest(tmp_path / "none.csv")


def test_assign_patient_splits_never_shares_a_patient():
    patients = [f"P{i // 2}" for i in range(40)]  # 20 patients, 2 scans each
    labels = [int(i % 4 < 2) for i in range(40)]
    splits = data.assign_patient_splits(patients, labels, (0.6, 0.2, 0.2), seed=3)
    assert set(splits) == set(patients)
    assert set(splits.values()) == {"train", "val", "test"}
    frame = pd.DataFrame({"patient_id": patients, "split": [splits[p] for p in patients]})
    data.check_patient_splits(frame)
    assert splits == data.assign_patient_splits(patients, labels, (0.6, 0.2, 0.2), seed=3)


def test_slice_indices_step_in_mm():
    candidates = np.zeros(20, bool)
    candidates[3:15] = True
    np.testing.assert_array_equal(data.slice_indices(candidates, 1.0, 5.0), [3, 8, 13])
    np.testing.assert_array_equal(data.slice_indices(candidates, 5.0, 5.0), np.arange(3, 15))
    np.testing.assert_array_equal(data.slice_indices(candidates, 2.5, 0.0), np.arange(3, 15))


def test_segmentation_slices(manifest_path):
    frame = data.read_manifest(manifest_path, required=("image", "lung_mask"))
    slices = data.load_segmentation_slices(frame, "train", size=32, step_mm=0.0, empty_fraction=0.5)
    # 3 train cases x 6 lung slices + ceil(0.5 * 6) = 3 lung-free slices each
    assert len(slices) == 3 * (6 + 3)
    assert slices.images.dtype == np.float16 and slices.images.shape[1:] == (32, 32)
    assert set(np.unique(slices.masks)) == {0, 1}
    lung_free = slices.masks.reshape(len(slices), -1).max(axis=1) == 0
    assert lung_free.sum() == 9
    # windowing: -850 HU inside the lung -> 0.15
    inside = slices.images[~lung_free][slices.masks[~lung_free] > 0].astype(np.float32)
    np.testing.assert_allclose(np.median(inside), 0.15, atol=2e-3)


def test_classification_slices_and_labels(manifest_path):
    frame = data.read_manifest(manifest_path, required=("image", "lesion_mask"))
    slices = data.load_classification_slices(frame, "train", size=16, step_mm=0.0,
                                             min_lesion_area_mm2=25.0, min_lung_area_mm2=100.0)
    assert len(slices) == 3 * 6  # only slices containing lung
    assert set(slices.z) == set(range(2, 8))
    abnormal = slices.labels.astype(bool)
    assert abnormal.sum() == 2  # c1, slices 4 and 5
    assert set(slices.case_ids[abnormal]) == {"c1"} and set(slices.z[abnormal]) == {4, 5}
    with pytest.raises(data.DatasetError, match="no slice contains lung"):
        data.load_classification_slices(frame, "train", size=16, min_lung_area_mm2=10_000.0)


def test_classifier_input_modes():
    hu = np.full((1, 40, 40), 40.0, np.float32)
    lung = np.zeros((1, 40, 40), np.uint8)
    lung[0, 10:30, 10:30] = 1
    hu[0, 10:30, 10:30] = -1000.0
    whole, boxes = data.classifier_inputs_from_study(hu, lung, (1.0, 1.0), np.array([0]), size=40,
                                                     input_mode="whole_slice")
    np.testing.assert_allclose(whole[0], data.preprocess.window_hu(hu[0]).numpy(), atol=1e-5)
    crop, boxes = data.classifier_inputs_from_study(hu, lung, (1.0, 1.0), np.array([0]), size=20,
                                                    input_mode="lung_crop", margin_mm=0.0)
    assert boxes[0] == data.preprocess.Box(10, 30, 10, 30)
    np.testing.assert_allclose(crop[0], 0.0, atol=1e-6)  # all lung (-1000 HU -> 0)
    masked, _ = data.classifier_inputs_from_study(hu, lung, (1.0, 1.0), np.array([0]), size=40,
                                                  input_mode="lung_masked", margin_mm=10.0)
    assert masked.max() == pytest.approx(0.0)  # outside the lung set to 0
    with pytest.raises(ValueError, match="input_mode"):
        data.classifier_inputs_from_study(hu, lung, (1.0, 1.0), np.array([0]), size=8,
                                          input_mode="nope")


def _toy_slices(n=10, size=8):
    rng = np.random.default_rng(0)
    images = rng.random((n, size, size)).astype(np.float16)
    masks = (images > 0.5).astype(np.uint8)
    labels = (np.arange(n) % 3 == 0).astype(np.uint8)
    ids = np.array([f"c{i}" for i in range(n)])
    return data.SliceSet(images, masks, labels, ids, ids, np.arange(n))


def test_epoch_stream_is_a_function_of_seed_and_epoch():
    slices = _toy_slices()
    aug = augment.segmentation_augmenter(crop=True, flip=True, noise=True)

    def batches(first, last):
        ds = data.segmentation_dataset(slices, batch_size=4, training=True, augment=aug, seed=5,
                                       first_epoch=first, epochs=last)
        return [b[0].numpy() for b in ds]

    full = batches(0, 3)
    assert len(full) == 3 * data.steps_per_epoch(10, 4)
    resumed = batches(2, 3)  # a run resumed at epoch 2 sees epoch 2's batches exactly
    for a, b in zip(full[-3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(full[0], full[3])  # epochs differ (order and augmentation)


def test_classification_dataset_weights_and_shapes():
    slices = _toy_slices()
    weights = data.balanced_class_weights(slices.labels)
    # 4 positives of 10: 10 / (2 * 4) = 1.25 and 10 / (2 * 6)
    assert weights == {0: pytest.approx(10 / 12), 1: pytest.approx(1.25)}
    ds = data.classification_dataset(slices, batch_size=10, training=False, class_weights=weights)
    images, labels, sample_weights = next(iter(ds))
    assert images.shape == (10, 8, 8, 3) and labels.shape == (10, 1)
    np.testing.assert_allclose(sample_weights.numpy(),
                               np.where(slices.labels == 1, 1.25, 10 / 12), rtol=1e-6)
    np.testing.assert_array_equal(images.numpy()[..., 0], images.numpy()[..., 2])


def test_augmenting_one_channel_equals_augmenting_the_three():
    """The pipelines augment the single grey channel, then repeat it: the same images (bit for bit)
    as augmenting the three equal channels the networks take."""
    rng = np.random.default_rng(4)
    image = tf.constant(rng.random((32, 32)).astype(np.float16))
    mask = tf.constant((rng.random((32, 32)) > 0.5).astype(np.float32)[..., None])
    seed = tf.constant([3, 9], tf.int32)
    three = tf.repeat(tf.cast(image, tf.float32)[..., None], 3, axis=-1)
    classify = augment.classification_augmenter(rotate=True, flip=True, crop=True)
    one = data._three_channels(classify(data._one_channel(image), seed))
    np.testing.assert_array_equal(one.numpy(), classify(three, seed).numpy())
    segment = augment.segmentation_augmenter(crop=True, flip=True, noise=True)
    one_image, one_mask = segment(data._one_channel(image), mask, seed)
    ref_image, ref_mask = segment(three, mask, seed)
    np.testing.assert_array_equal(data._three_channels(one_image).numpy(), ref_image.numpy())
    np.testing.assert_array_equal(one_mask.numpy(), ref_mask.numpy())


def test_slice_cache_round_trip(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return _toy_slices()

    key = {"task": "t", "split": "train", "p": 1}
    first = data.cached_slices(tmp_path, key, build)
    second = data.cached_slices(tmp_path, key, build)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.case_ids, second.case_ids)
    data.cached_slices(tmp_path, {**key, "p": 2}, build)
    assert len(calls) == 2


def test_image_folder_slices_convert_every_mode(tmp_path):
    from PIL import Image

    (tmp_path / "train" / "COVID").mkdir(parents=True)
    (tmp_path / "train" / "NonCOVID").mkdir(parents=True)
    grey = np.full((20, 30), 100, np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "train" / "COVID" / "a%1.png")
    Image.fromarray(grey).save(tmp_path / "train" / "NonCOVID" / "b.jpg", quality=100)
    pd.DataFrame({"filename": ["a%1.png", "b.jpg"], "label": ["COVID", "NonCOVID"],
                  "split": ["train", "train"]}).to_csv(tmp_path / "split.csv", index=False)
    slices = data.load_image_folder_slices(tmp_path / "split.csv", "train", size=16)
    np.testing.assert_array_equal(slices.labels, [1, 0])
    # RGB PNG and greyscale JPEG of the same grey give the same input
    np.testing.assert_allclose(slices.images[0].astype(np.float32), slices.images[1].astype(np.float32),
                               atol=2 / 255)
    with pytest.raises(data.DatasetError, match="no rows for split 'val'"):
        data.load_image_folder_slices(tmp_path / "split.csv", "val", size=16)


def test_pipeline_map_matches_eager_windowing():
    hu = np.array([[-1000.0, -500.0], [0.0, 300.0]], np.float32)
    ds = tf.data.Dataset.from_tensors(hu).map(data.preprocess.window_hu)
    np.testing.assert_allclose(next(iter(ds)).numpy(), [[0, 0.5], [1, 1]])


def test_evenly_spaced_subset():
    slices = _toy_slices(10)
    sub = slices.evenly_spaced(4)
    np.testing.assert_array_equal(sub.z, [0, 3, 6, 9])
    assert slices.evenly_spaced(None) is slices and slices.evenly_spaced(20) is slices


def test_the_slice_cache_keeps_image_sizes_apart(manifest_path):
    """Regression: the manifest's byte size once overwrote the image ``size`` in the cache key, so a
    run at another ``data.input_size`` was handed the cached slices of the first."""
    from radlogics_repro import train

    settings = {"kind": "volumes", "manifest": str(manifest_path), "slice_step_mm": 0.0,
                "input_mode": "lung_crop", "crop_margin_mm": 5.0, "min_lesion_area_mm2": 0.0,
                "min_lung_area_mm2": 0.0}
    shapes = [train.load_task_slices("classifier", {**settings, "input_size": size}, "train",
                                     max_cases=None, cache=True).images.shape[1:]
              for size in (32, 48, 32)]
    assert shapes == [(32, 32), (48, 48), (32, 32)]
    assert len(list((manifest_path.parent / ".cache").glob("slices-classifier-train-*.npz"))) == 2
