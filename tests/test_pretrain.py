"""Self-supervised pre-training: sources, two-view pipeline, NT-Xent, a run whose weights file the
classifier loads with its provenance."""

import json

import keras
import numpy as np
import pytest
from PIL import Image

from radlogics_repro import augment, data, io, models, unlabeled


def test_a_folder_source_finds_dicom_series_nifti_and_images_and_ignores_the_rest(tmp_path):
    hu = np.full((3, 40, 40), -1000.0, np.float32)
    hu[:, 10:30, 10:30] = 0.0
    io.write_dicom_series(hu, (5.0, 0.8, 0.8), tmp_path / "ct" / "series1")
    io.write_dicom_series(hu, (5.0, 0.8, 0.8), tmp_path / "ct" / "pacs", seed=1)
    for file in (tmp_path / "ct" / "pacs").iterdir():  # a PACS export: no file suffix
        file.rename(file.with_suffix(""))
    io.save_volume(io.study_from_array(hu, (5.0, 0.8, 0.8)), hu, tmp_path / "ct" / "vol.nii.gz")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "ct" / "slice.png")
    (tmp_path / "ct" / "README.txt").write_text("not an image")

    kinds = sorted((kind, path.name) for kind, path in unlabeled.expand_source(tmp_path / "ct"))
    assert kinds == [("image", "slice.png"), ("volume", "pacs"), ("volume", "series1"),
                     ("volume", "vol.nii.gz")]
    slices = unlabeled.load_unlabeled_slices([tmp_path / "ct"], size=32, step_mm=10.0)
    # 2 of 3 slices per volume (every 10 mm at 5 mm spacing), 1 image
    assert slices.images.shape == (7, 32, 32) and slices.images.dtype == np.float16
    assert 0.0 <= float(slices.images.min()) and float(slices.images.max()) <= 1.0
    grey = slices.images[slices.case_ids == str(tmp_path / "ct" / "slice.png")]
    assert grey.shape == (1, 32, 32) and np.isclose(float(grey.mean()), 200 / 255, atol=0.01)
    capped = unlabeled.load_unlabeled_slices([tmp_path / "ct"], size=32, step_mm=10.0,
                                             max_slices_per_source=3)
    # 3 slices spread over the 7 come from 3 of the 4 items
    assert unlabeled.source_summary(capped, [tmp_path / "ct"]) == [
        {"source": str(tmp_path / "ct"), "items": 3, "slices": 3}]


def test_bad_sources_are_one_line_errors_naming_the_path(tmp_path):
    with pytest.raises(data.DatasetError, match="nowhere: pre-training source not found"):
        unlabeled.expand_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(data.DatasetError, match="empty: no DICOM series, NIfTI volume or image"):
        unlabeled.expand_source(tmp_path / "empty")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match="broken.png: cannot read image"):
        unlabeled.load_unlabeled_slices([tmp_path / "broken.png"], size=32, step_mm=5.0)


def test_a_manifest_source_leaves_its_test_split_out(tiny_dataset):
    every = unlabeled.load_unlabeled_slices([tiny_dataset], size=32, step_mm=0.0,
                                            manifest_splits=())
    no_test = unlabeled.load_unlabeled_slices([tiny_dataset], size=32, step_mm=0.0)
    manifest = data.read_manifest(tiny_dataset)
    test_images = set(manifest.loc[manifest["split"] == "test", "image"])
    assert test_images and not test_images & set(no_test.case_ids)
    assert test_images <= set(every.case_ids)


def test_two_views_are_different_augmentations_repeatable_from_the_seed():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (5, 32, 32)).astype(np.float16)
    view = augment.contrastive_view_augmenter()

    def first_batch(seed):
        views, targets = next(iter(unlabeled.contrastive_dataset(images, view=view, batch_size=2,
                                                                 seed=seed, epochs=1)))
        return views.numpy(), targets.numpy()

    views, targets = first_batch(3)
    assert views.shape == (4, 32, 32, 3) and targets.shape == (4,)
    assert 0.0 <= views.min() and views.max() <= 1.0
    assert np.abs(views[0] - views[1]).mean() > 0.02  # two different views of one slice
    np.testing.assert_array_equal(views, first_batch(3)[0])
    assert not np.array_equal(views, first_batch(4)[0])
    steps = data.steps_per_epoch(5, 2)
    batches = list(unlabeled.contrastive_dataset(images, view=view, batch_size=2, seed=3, epochs=2))
    assert len(batches) == 2 * steps and batches[steps - 1][0].shape[0] == 2  # 1 slice left over


def test_nt_xent_rewards_matching_pairs_and_counts_pair_accuracy():
    loss = models.NTXentLoss(temperature=0.1)
    eye = np.eye(4, dtype=np.float32)
    matched = np.repeat(eye, 2, axis=0)  # views 2k and 2k+1 identical, pairs orthogonal
    swapped = matched[[0, 2, 1, 3, 4, 6, 5, 7]]  # each view's partner is another slice's view
    zeros = np.zeros(8, np.float32)
    assert float(loss(zeros, matched)) < 0.01
    assert float(loss(zeros, swapped)) > 5.0
    rng = np.random.default_rng(1)
    random_loss = float(models.NTXentLoss(temperature=100.0)(zeros, rng.normal(size=(8, 16))))
    assert random_loss == pytest.approx(np.log(7), abs=0.01)  # chance level: log(2B - 1)
    np.testing.assert_array_equal(np.asarray(models.pair_accuracy(zeros, matched)), np.ones(8))
    assert float(np.mean(models.pair_accuracy(zeros, swapped))) == 0.0


def test_the_pretext_loss_decreases_on_a_tiny_run(tmp_path):
    """The VGG16 network (the lung U-Net's encoder; the ResNet-50 one trains in the fixture run)
    learns to pair the views of one batch, and the U-Net starts from its exported encoder."""
    keras.utils.set_random_seed(0)
    model = models.build_contrastive_model("vgg16", (32, 32, 3), (32, 16))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=models.NTXentLoss(0.2),
                  metrics=[models.pair_accuracy])
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (8, 32, 32)).astype(np.float16)
    views, targets = next(iter(unlabeled.contrastive_dataset(
        images, view=augment.contrastive_view_augmenter(), batch_size=8, seed=0)))
    before = model.evaluate(views, targets, verbose=0, return_dict=True)
    model.fit(views, targets, batch_size=16, epochs=12, verbose=0, shuffle=False)
    after = model.evaluate(views, targets, verbose=0, return_dict=True)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["pair_accuracy"] > before["pair_accuracy"]

    models.export_backbone(model, "vgg16", tmp_path / "vgg16.weights.h5")
    unet = models.build_lung_unet((64, 64, 3), encoder_weights=tmp_path / "vgg16.weights.h5",
                                  decoder_filters=(8, 8, 8, 8))
    for layer in ("block1_conv1", "block5_conv3"):
        for got, want in zip(unet.get_layer(layer).get_weights(), model.get_layer(layer).get_weights(),
                             strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_pretraining_run_writes_a_backbone_file_with_its_provenance_card(pretrained_backbone,
                                                                         tiny_dataset):
    run_dir = pretrained_backbone
    weights = run_dir / "backbone.weights.h5"
    for name in ("backbone.weights.h5", "backbone.pretraining.json", "model.keras", "metrics.json",
                 "history.csv", "views.png", "config.yaml"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "resume").exists()
    card = json.loads((run_dir / "backbone.pretraining.json").read_text())
    assert card == json.loads((run_dir / "metrics.json").read_text())["pretraining"]
    assert card["method"].startswith("SimCLR") and card["backbone"] == "resnet50"
    assert card["epochs"] == 1 and card["data"]["n_slices"] == 8 and card["input_size"] == 32
    assert card["data"]["sources"][0]["source"] == str(tiny_dataset)
    assert card["data"]["sources"][0]["slices"] == 8
    assert card["weights_sha256"] == models.weights.file_sha256(weights)
    assert np.isfinite(card["final"]["loss"]) and "Research use only" in card["notice"]

    # The classifier (here at another input size) starts from exactly these backbone weights.
    pretrained = keras.saving.load_model(run_dir / "model.keras")
    built = models.build_slice_classifier((64, 64, 3), weights=weights, dense_units=(8, 4))
    for layer in ("conv1_conv", "conv5_block3_3_conv", "conv5_block3_3_bn"):
        for got, want in zip(built.get_layer(layer).get_weights(),
                             pretrained.get_layer(layer).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    assert models.init_record(built).endswith(f"; pretrained: {card['summary']}")
    assert models.pretraining_provenance(str(weights)) == card
    assert models.pretraining_provenance("imagenet") is None
