"""Training entry point: Hydra composition, smoke runs of both experiments, resume, refusals."""

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from radlogics_repro import calibrate_maps, localize, train


def compose_train(overrides):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def smoke_overrides(experiment, manifest, run_dir, extra=()):
    model = (["model.decoder_filters=[16,8,8,8]"] if experiment == "lung_unet"
             else ["model.dense_units=[8,4]"])
    return [f"+experiment={experiment}", "trainer=smoke", f"data.manifest={manifest}",
            "data.generate_if_missing=false", "data.input_size=32", "model.weights=null",
            f"run_dir={run_dir}", *model, *extra]


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment")
                     .glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_smoke_shrinks_it(experiment):
    cfg = compose_train([f"+experiment={experiment}"])
    assert cfg.task in ("lung_unet", "classifier", "pretrain")
    assert cfg.model.kind == cfg.task
    if cfg.task == "pretrain":  # self-supervised: from random init, on a smaller input
        assert cfg.model.weights is None and cfg.data.kind == "unlabeled"
        assert cfg.model.backbone == experiment.removeprefix("pretrain_")
    else:
        assert cfg.data.input_size == 224
        assert cfg.model.weights == "imagenet"
    assert cfg.trainer.epochs > 2
    smoke = compose_train([f"+experiment={experiment}", "trainer=smoke"])
    assert smoke.trainer.epochs == 2 and smoke.trainer.max_cases_per_split == 2


def test_classifier_smoke_run_writes_every_output(tiny_dataset, pretrained_backbone, tmp_path):
    """Also: a backbone from self-supervised pre-training carries its provenance card into the run."""
    run_dir = tmp_path / "run"
    weights = pretrained_backbone / "backbone.weights.h5"
    pretraining = json.loads((pretrained_backbone / "backbone.pretraining.json").read_text())
    overrides = [o for o in smoke_overrides("classifier", tiny_dataset, run_dir, extra=[
        "trainer.precision=mixed_bfloat16", "trainer.batchnorm_momentum=0.9",
        "trainer.max_cases_per_split=3"])  # the third validation scan has lesions
        if o != "model.weights=null"]
    result = train.train(compose_train([*overrides, f"model.weights={weights}"]))
    init = result["init"]
    assert init.startswith("file: backbone.weights.h5 (sha256 ")
    assert init.endswith(f"; pretrained: {pretraining['summary']}")
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    for name in ("model.keras", "model.json", "history.csv", "config.yaml", "metrics.json",
                 "predictions.png"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "resume").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["init"] == init and metrics["pretraining"] == pretraining
    assert "Research use only" in metrics["notice"]
    assert len(pd.read_csv(run_dir / "history.csv")) == 2
    val = metrics["metrics"]["val"]
    assert {"auc", "at_0.5", "at_operating_point"} <= set(val)
    assert 0.0 <= metrics["operating_threshold"] <= 1.0
    card = json.loads((run_dir / "model.json").read_text())
    assert card["input_size"] == 32 and card["task"] == "classifier"
    assert card["operating_threshold"] == metrics["operating_threshold"]
    assert card["input_mode"] == "lung_crop" and card["init"] == init
    assert card["pretraining"] == pretraining
    # fixed Grad-CAM map scales from the validation slices called positive (analysis.map_scale=fixed)
    scales = card["gradcam_scales"]
    assert scales["quantile"] == localize.MAP_SCALE_QUANTILE and scales["score"] == "logit"
    assert scales["slices"] >= 1 and set(scales["layers"]) == set(localize.GRADCAM_LAYERS)
    assert all(value > 0 for value in scales["layers"].values())
    # a run without them gets the same from calibrate_maps, which never replaces them unasked
    with pytest.raises(calibrate_maps.CalibrationError, match="already has gradcam_scales"):
        calibrate_maps.calibrate_run(run_dir)
    again = calibrate_maps.calibrate_run(run_dir, overwrite=True)
    assert again["slices"] == scales["slices"]
    for name, value in scales["layers"].items():
        assert again["layers"][name] == pytest.approx(value, rel=2e-2)
    assert json.loads((run_dir / "model.json").read_text())["gradcam_scales"] == again
    with pytest.raises(SystemExit) as exit_info:
        calibrate_maps.main([f"classifier_run={tmp_path / 'missing'}"])
    assert exit_info.value.code == 2


def test_finished_run_is_not_overwritten(tiny_dataset, tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    cfg = compose_train(smoke_overrides("lung_unet", tiny_dataset, run_dir))
    with pytest.raises(train.TrainingError, match="finished run"):
        train.train(cfg)


def test_resume_refuses_a_different_config(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "resume").mkdir(parents=True)
    (run_dir / "resume" / "state.json").write_text(json.dumps({"epoch": 1, "config": "other"}))
    cfg = compose_train(smoke_overrides("lung_unet", tiny_dataset, run_dir))
    with pytest.raises(train.TrainingError, match="different configuration"):
        train.train(cfg)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    schedule = train.learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10, schedule="cosine")
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(0.5e-3, rel=1e-3)  # half-way through the decay
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    assert train.learning_rate_schedule(1e-3, 100, 10, "constant") == 1e-3
    with pytest.raises(train.TrainingError, match="lr_schedule"):
        train.learning_rate_schedule(1e-3, 100, 10, "step")


def test_batchnorm_momentum_reaches_every_batchnorm_layer():
    from radlogics_repro import models

    model = models.build_slice_classifier(input_shape=(32, 32, 3), weights=None, dense_units=(4, 2))
    train.set_batchnorm_momentum(model, 0.9)
    momenta = {layer.momentum for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}


def test_frozen_batchnorm_keeps_its_statistics_and_scales_while_the_rest_trains():
    import numpy as np

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x)))
    assert train.freeze_batchnorm(model) == 1
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    bn, conv = model.get_layer("bn"), model.get_layer("conv")
    before = {name: keras.ops.convert_to_numpy(getattr(bn, name)).copy()
              for name in ("moving_mean", "moving_variance", "gamma", "beta")}
    kernel = keras.ops.convert_to_numpy(conv.kernel).copy()
    x_train = np.random.default_rng(0).normal(5.0, 3.0, (16, 8, 8, 1)).astype("float32")
    model.fit(x_train, np.ones((16, 1), "float32"), epochs=1, batch_size=8, verbose=0)
    for name, value in before.items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(getattr(bn, name)), value, err_msg=name)
    assert not np.array_equal(keras.ops.convert_to_numpy(conv.kernel), kernel)


def test_first_stage_trains_at_its_size_then_the_run_goes_on_from_it(tiny_dataset, tmp_path, monkeypatch):
    """Progressive resizing (trainer.first_stage): a finished first run at 32 px in
    run_dir/first_stage, the main run at 64 px starting from its model; a restart reuses it."""
    run_dir = tmp_path / "run"
    overrides = smoke_overrides("classifier", tiny_dataset, run_dir, extra=[
        "data.input_size=64", "trainer.epochs=1", "trainer.max_cases_per_split=1",
        "trainer.precision=auto",
        "trainer.first_stage={input_size: 32, epochs: 1, learning_rate: 1e-3, warmup_epochs: 0}"])
    cfg = compose_train(overrides)
    result = train.train(cfg)
    stage = run_dir / "first_stage"
    stage_card = json.loads((stage / "model.json").read_text())
    assert stage_card["input_size"] == 32 and (stage / "metrics.json").exists()
    assert len(pd.read_csv(stage / "history.csv")) == 1
    assert result["init"] == f"finetuned from {stage / 'model.keras'} (random), resized from 32x32 px"
    assert json.loads((run_dir / "model.json").read_text())["input_size"] == 64
    stage_metrics = json.loads((stage / "metrics.json").read_text())
    assert stage_metrics["environment"] == result["environment"]  # read once, for both stages
    assert result["precision"] == train.training_precision("auto")
    assert train.training_precision("auto") in ("float32", "mixed_bfloat16")

    def must_not_train(*_):
        raise AssertionError("the finished first stage was trained again")

    monkeypatch.setattr(train, "_train", must_not_train)
    again = train.after_first_stage(cfg, environment={})
    assert again.model.init_from == str(stage / "model.keras") and again.data.input_size == 64
    longer = compose_train([*overrides[:-1], "trainer.first_stage={input_size: 32, epochs: 2, "
                            "learning_rate: 1e-3, warmup_epochs: 0}"])
    with pytest.raises(train.TrainingError, match="a finished first stage with other settings"):
        train.after_first_stage(longer, environment={})


def test_first_stage_takes_its_own_augmentation_and_patience(tiny_dataset, tmp_path, monkeypatch):
    """trainer.first_stage.augment and .early_stopping_patience change the first stage only."""
    overrides = smoke_overrides("classifier", tiny_dataset, tmp_path / "run", extra=[
        "augment.scanner_noise=true", "trainer.early_stopping_patience=3",
        "trainer.first_stage={input_size: 32, epochs: 1, learning_rate: 1e-3, warmup_epochs: 0, "
        "early_stopping_patience: 4, augment: {scanner_noise: false}}"])
    stages = []
    monkeypatch.setattr(train, "_train", lambda cfg, environment: stages.append(cfg))
    main = train.after_first_stage(compose_train(overrides), environment={})
    assert [stage.augment.scanner_noise for stage in stages] == [False]
    assert stages[0].data.input_size == 32 and stages[0].augment.flip == main.augment.flip
    assert main.augment.scanner_noise is True
    assert stages[0].trainer.early_stopping_patience == 4
    assert main.trainer.early_stopping_patience == 3


def test_finetune_local_starts_from_a_saved_model(tiny_dataset, tiny_models, tmp_path):
    base_model = tiny_models["lung"].resolve()  # a saved 32-pixel U-Net with its model.json
    tuned_dir = tmp_path / "tuned"
    cfg = compose_train(["+experiment=finetune_local", "task=lung_unet", "trainer=smoke",
                         "trainer.max_cases_per_split=1", "trainer.epochs=1", f"model.init_from={base_model}",
                         f"data.manifest={tiny_dataset}", "data.input_size=32", f"run_dir={tuned_dir}"])
    assert cfg.trainer.epochs == 1 and cfg.model.kind == "lung_unet"
    result = train.train(cfg)
    expected_init = f"finetuned from {base_model} (random)"
    assert result["init"] == expected_init
    card = json.loads((tuned_dir / "model.json").read_text())
    assert card["init"] == expected_init and card["task"] == "lung_unet" and card["input_size"] == 32
    for name in ("model.keras", "history.csv", "config.yaml", "metrics.json", "predictions.png"):
        assert (tuned_dir / name).exists(), name
    assert len(pd.read_csv(tuned_dir / "history.csv")) == 1
    base, tuned = keras.saving.load_model(base_model), keras.saving.load_model(tuned_dir / "model.keras")
    assert tuned.count_params() == base.count_params()  # the saved U-Net, not a newly built network
    assert any(not (a == b).all() for a, b in zip(base.get_weights(), tuned.get_weights(), strict=True))

    with pytest.raises(train.TrainingError, match="a lung_unet model, but task=classifier"):
        train.load_init_model(base_model, "classifier", 32)
    resized, init = train.load_init_model(base_model, "lung_unet", 64)  # progressive resizing
    assert resized.input_shape == (None, 64, 64, 3) and resized.output_shape == (None, 64, 64, 1)
    assert init == f"finetuned from {base_model} (random), resized from 32x32 px"
    for a, b in zip(base.get_weights(), resized.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    flat_inputs = keras.Input((8, 8, 3))  # Flatten -> Dense: weights tied to the input size
    flat = keras.Model(flat_inputs, keras.layers.Dense(1)(keras.layers.Flatten()(flat_inputs)))
    flat.save(tmp_path / "flat.keras")
    too_big = "trained at 8x8 pixels, cannot run at data.input_size=16"
    with pytest.raises(train.TrainingError, match=too_big) as err:
        train.load_init_model(tmp_path / "flat.keras", "classifier", 16)
    assert "\n" not in str(err.value)
    with pytest.raises(train.TrainingError, match="model.init_from: missing"):
        train.build_model("lung_unet", {"init_from": "???"}, 32)
