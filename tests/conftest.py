"""Shared fixtures: the real-data folder (optional) and one tiny synthetic dataset per session."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("RADLOGICS_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $RADLOGICS_SHARED_DATA); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six synthetic patients at 64 x 64 x 24 (two scanned twice): the manifest path."""
    from radlogics_repro import synth

    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    return synth.generate_dataset(
        out, n_patients=6, seed=11, in_plane=64, slices=24, slice_mm=(4.0, 6.0),
        covid_fraction=0.5, longitudinal_fraction=0.34, timepoints=2, progress=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Untrained 32-pixel networks saved as .keras with model cards, as training would write them."""
    import json

    import keras

    from radlogics_repro import models
    from radlogics_repro.bench.study import untrained_map_scales

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(2)  # untrained, but the same networks in every session
    lung = models.build_lung_unet(input_shape=(32, 32, 3), encoder_weights=None,
                                  decoder_filters=(8, 8, 8, 8))
    classifier = models.build_slice_classifier(input_shape=(32, 32, 3), weights=None,
                                               dense_units=(8, 4))
    paths = {}
    for name, model in (("lung", lung), ("classifier", classifier)):
        path = folder / name / "model.keras"
        path.parent.mkdir()
        model.save(path)
        card = {"task": name, "input_size": 32, "init": "random", "input_mode": "lung_crop",
                "crop_margin_mm": 10.0, "min_lung_area_mm2": 100.0,
                "operating_threshold": 0.0, "case_threshold": 0.5}  # every lung slice positive
        if name == "classifier":
            card["gradcam_scales"] = untrained_map_scales(model)  # analysis.map_scale=fixed
        (path.parent / "model.json").write_text(json.dumps(card))
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def pretrained_backbone(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny SimCLR pre-training run of the ResNet-50 (32 px, one epoch, 8 slices of the tiny
    dataset), as ``python -m radlogics_repro.train +experiment=pretrain_resnet50`` writes it: its
    run folder (``backbone.weights.h5``, ``backbone.pretraining.json``, ...)."""
    from hydra import compose, initialize_config_module

    from radlogics_repro import train

    base = tmp_path_factory.mktemp("pretrain")
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "+experiment=pretrain_resnet50", "trainer=smoke", "trainer.epochs=1",
            "trainer.batch_size=4", f"data.manifest={tiny_dataset}", "data.generate_if_missing=false",
            "data.input_size=32", "data.max_slices_per_source=8", "model.projection_units=[16,8]",
            f"paths.cache_dir={base / 'cache'}", f"run_dir={base / 'run'}"])
    train.train(cfg)
    return base / "run"
