"""Training entry point for both networks (Hydra).

    python -m radlogics_repro.train +experiment=lung_unet
    python -m radlogics_repro.train +experiment=classifier
    python -m radlogics_repro.train +experiment=classifier trainer=smoke      # seconds, for checks

Every run writes into its own folder (``run_dir``, default ``runs/<task>/<timestamp>``):
``model.keras`` (best validation epoch), ``model.json`` (what inference needs: input size, window,
operating threshold, init), ``history.csv``, ``config.yaml`` (resolved), ``metrics.json`` (val and
test metrics, init, data provenance, environment), ``predictions.png``, ``tensorboard/`` and, while
the run is going, ``resume/`` (the last epoch's full model and optimiser state). A run that was killed
resumes when started again with the same ``run_dir=...``: it continues from the last finished epoch
with the same batches it would have seen (the input stream is a function of seed and epoch).

The sections below follow the order of a run: run folder -> input pipeline -> model -> callbacks ->
fit -> evaluation -> outputs. Only :func:`main` and :func:`train` see the Hydra config; the functions
they call take plain arguments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import keras
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from radlogics_repro import RESEARCH_USE_NOTICE, atomic, augment, data, localize, losses, models, provenance
from radlogics_repro.cli import TRAIN_CONFIG_RULES, UserError, check_config, exit_on_user_error
from radlogics_repro.evaluate import metrics as M

log = logging.getLogger(__name__)

MODEL_CARD_VERSION = 1


class TrainingError(UserError):
    """A training run that cannot start or continue (finished run in the folder, NaN loss, ...)."""


# =============================================================================================
# Run folder and resume state
# =============================================================================================


def check_run_dir(run_dir: Path, config_yaml: str, overwrite: bool) -> dict | None:
    """Decide what to do with ``run_dir``: start fresh, resume, or refuse.

    Returns:
        The resume state (``{"epoch": n, ...}``) when an interrupted run of the same config is
        there, else None.

    Raises:
        TrainingError: the folder holds a finished run (and not ``overwrite``), or an interrupted
            run of a different configuration.
    """
    if (run_dir / "metrics.json").exists():
        if not overwrite:
            raise TrainingError(
                f"{run_dir}: holds a finished run; start a new one (omit run_dir) or pass overwrite=true"
            )
        log.warning("overwrite=true: replacing the finished run in %s", run_dir)
        for name in ("metrics.json", "model.keras", "model.json", "history.csv", "resume"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return None
    state_file = run_dir / "resume" / "state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    if state.get("config") != config_yaml:
        raise TrainingError(
            f"{run_dir}: holds an interrupted run of a different configuration; "
            "resume it with its own settings or start a new run"
        )
    log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    return state


class ResumeCheckpoint(keras.callbacks.Callback):
    """Saves the full model (weights + optimiser) and the trainer state after every epoch, atomically,
    so a killed run resumes from its last finished epoch. Removed when the run finishes."""

    def __init__(self, run_dir: Path, config_yaml: str, init: str, stateful_callbacks: dict):
        super().__init__()
        self.folder = run_dir / "resume"
        self.config_yaml = config_yaml
        self.init = init
        self.stateful = stateful_callbacks

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        save_model_atomically(self.model, self.folder / "last.keras")
        state = {"epoch": epoch + 1, "config": self.config_yaml, "init": self.init,
                 "callbacks": {name: _callback_state(cb) for name, cb in self.stateful.items()}}
        atomic.write_text(self.folder / "state.json", json.dumps(state, indent=1))


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, and remembers it."""

    stopped_on_nan = False

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.stopped_on_nan = True
            self.model.stop_training = True


def _callback_state(callback) -> dict:
    keys = ("best", "wait", "best_epoch")
    return {k: float(getattr(callback, k)) for k in keys if getattr(callback, k, None) is not None}


def _restore_callback_state(callback, state: dict) -> None:
    for key, value in state.items():
        setattr(callback, key, int(value) if key in ("wait", "best_epoch") else value)


def save_model_atomically(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


# =============================================================================================
# Input pipeline
# =============================================================================================


def load_task_slices(task: str, data_cfg: dict, split: str, *, max_cases: int | None,
                     cache: bool, lung_segmenter=None) -> data.SliceSet:
    """The slices of one split for ``task`` ('lung_unet' or 'classifier'), from plain settings."""
    if data_cfg["kind"] == "image_folder":
        if task != "classifier":
            raise TrainingError(f"{data_cfg['split_csv']}: an image-folder dataset has no lung masks; "
                                "it can train the classifier only")
        wanted = data_cfg.get("eval_split", "val") if split == "test" else split
        return data.load_image_folder_slices(data_cfg["split_csv"], wanted,
                                             size=data_cfg["input_size"],
                                             positive_label=data_cfg["positive_label"])
    manifest_path = Path(data_cfg["manifest"])
    required = ("image", "lung_mask") if task == "lung_unet" else ("image", "lesion_mask")
    manifest = data.read_manifest(manifest_path, required=required)
    if task == "lung_unet":
        params = {"size": data_cfg["input_size"], "step_mm": data_cfg["slice_step_mm"],
                  "empty_fraction": data_cfg["empty_fraction"], "max_cases": max_cases}

        def build():
            return data.load_segmentation_slices(manifest, split, **params)
        key_extra = {}
    else:
        params = {"size": data_cfg["input_size"], "step_mm": data_cfg["slice_step_mm"],
                  "input_mode": data_cfg["input_mode"], "margin_mm": data_cfg["crop_margin_mm"],
                  "min_lesion_area_mm2": data_cfg["min_lesion_area_mm2"],
                  "min_lung_area_mm2": data_cfg["min_lung_area_mm2"], "max_cases": max_cases}

        def build():
            return data.load_classification_slices(manifest, split, lung_segmenter=lung_segmenter,
                                                   **params)
        key_extra = {"lung_masks": str(data_cfg.get("lung_masks", "ground_truth"))}
    key = {"task": task, "split": split, **params, **key_extra,
           **data.manifest_fingerprint(manifest_path)}
    cache_dir = manifest_path.parent / ".cache" if cache else None
    return data.cached_slices(cache_dir, key, build)


def make_augmenter(task: str, aug: dict):
    """The augmentation function for ``task`` from the ``augment`` settings (None: no augmentation)."""
    if not aug:
        return None
    if task == "lung_unet":
        return augment.segmentation_augmenter(
            crop=aug["crop"], flip=aug["flip"], noise=aug["lung_noise"],
            crop_min_scale=aug["crop_min_scale"], noise_scale=aug["noise_scale"],
            noise_mean=aug["noise_mean"], noise_std=aug["noise_std"],
            noise_probability=aug.get("noise_probability", 1.0))
    return augment.classification_augmenter(
        rotate=aug["rotate"], flip=aug["flip"], crop=aug["crop"], max_degrees=aug["max_degrees"],
        crop_min_scale=aug["crop_min_scale"], noise=aug.get("scanner_noise", False),
        noise_hu=tuple(aug.get("scanner_noise_hu", (0.0, 120.0))),
        noise_sigma_px=aug.get("scanner_noise_sigma_px", 1.0),
        noise_probability=aug.get("scanner_noise_probability", 0.5))


# =============================================================================================
# Model
# =============================================================================================


def build_model(task: str, model_cfg: dict, input_size: int) -> tuple[keras.Model, str]:
    """Build the task's network, or load it from ``model.init_from`` (fine-tuning); returns (model,
    init record)."""
    if model_cfg.get("init_from"):
        return load_init_model(model_cfg["init_from"], task, input_size)
    shape = (input_size, input_size, 3)
    if task == "lung_unet":
        model = models.build_lung_unet(
            input_shape=shape, encoder_weights=model_cfg["weights"],
            decoder_filters=tuple(model_cfg["decoder_filters"]),
            require_pretrained=model_cfg["require_pretrained"])
    else:
        model = models.build_slice_classifier(
            input_shape=shape, weights=model_cfg["weights"],
            dense_units=tuple(model_cfg["dense_units"]), dropout=model_cfg["dropout"],
            require_pretrained=model_cfg["require_pretrained"])
    return model, models.init_record(model)


def load_init_model(path: str | os.PathLike, task: str, input_size: int) -> tuple[keras.Model, str]:
    """A trained ``.keras`` model to fine-tune (Keras safe mode), checked against ``task``; the init
    record is ``finetuned from <path> (<its own init>)``, its own init read from the ``model.json``
    beside it.

    A model trained at another input size is rebuilt for ``input_size`` with the same weights
    (both networks are fully convolutional): e.g. a classifier trained at 112 px goes on at 224 px
    (progressive resizing; the record then adds ``, resized from 112x112 px``).
    """
    if str(path) == "???":
        raise TrainingError("model.init_from: missing; give the .keras model to fine-tune from")
    path = Path(path).expanduser().resolve()
    model = models.load_model(path)
    model_task = "lung_unet" if len(model.output_shape) == 4 else "classifier"
    if model_task != task:
        raise TrainingError(f"model.init_from={path}: a {model_task} model, but task={task}")
    resized = ""
    if tuple(model.input_shape[1:3]) != (input_size, input_size):
        trained_at = f"{model.input_shape[1]}x{model.input_shape[2]}"
        try:
            model = models.with_input_size(model, input_size)
        except ValueError as error:
            reason = " ".join(str(error).split())[:200]  # Keras' messages span lines: keep one
            raise TrainingError(f"model.init_from={path}: trained at {trained_at} pixels, cannot run at "
                                f"data.input_size={input_size} ({reason})") from None
        log.info("model.init_from: trained at %s pixels, rebuilt for %d with the same weights",
                 trained_at, input_size)
        resized = f", resized from {trained_at} px"
    card = path.parent / "model.json"
    its_init = json.loads(card.read_text()).get("init") if card.is_file() else None
    return model, f"finetuned from {path} ({its_init or 'init unknown'}){resized}"


def training_precision(choice: str) -> str:
    """``trainer.precision`` -> a Keras dtype policy. ``auto``: ``mixed_bfloat16`` on a CPU-only
    machine whose CPU has native bfloat16 (ResNet-50 training 1.5x, U-Net 1.2x the float32 speed
    here, results/bench.md), else ``float32`` (on a GPU choose ``mixed_float16`` or
    ``mixed_bfloat16`` yourself)."""
    resolved = models.resolve_precision(choice)
    return "float32" if resolved == "model" else resolved


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, schedule: str):
    """The learning rate as a function of the optimizer step.

    ``constant``: ``peak`` throughout. ``cosine``: linear warm-up from 0 over ``warmup_steps``, then
    cosine decay to 0 at ``total_steps``. The schedule depends only on the step count, which the
    optimizer saves with the model, so a resumed run continues on the same curve.
    """
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise TrainingError(f"trainer.lr_schedule={schedule!r}: use constant or cosine")
    warmup_steps = min(max(int(warmup_steps), 0), max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak, decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=peak if warmup_steps else None, warmup_steps=warmup_steps)


def freeze_batchnorm(model: keras.Model) -> int:
    """Keep every BatchNormalization layer in inference mode while training (``trainable = False``:
    Keras then normalises with the stored moving statistics, neither updates them nor trains gamma
    and beta); returns how many layers were frozen.

    For fine-tuning (Keras' transfer-learning guide recommends it): the stored statistics describe
    the data the model learnt from, and a small local set with another scanner would replace them
    within a few dozen steps (at momentum 0.9). On the synthetic site, fine-tuning with it neither
    helped nor harmed the preset's model (results/local_site_noise_half.md); the earlier losses came
    from models trained with the lung noise on every image (results/train_lung_unet.md).
    """
    layers = list(_batchnorm_layers(model))
    for layer in layers:
        layer.trainable = False
    return len(layers)


def set_batchnorm_momentum(model: keras.Model, momentum: float | None) -> None:
    """Set every BatchNormalization layer's moving-average momentum (None: keep Keras' 0.99).

    A from-scratch network on a few hundred steps per epoch changes faster than a 0.99 moving average
    follows; its inference-mode statistics then lag the weights and validation scores jump from epoch
    to epoch. 0.9 tracks them within ~10 steps.
    """
    if momentum is None:
        return
    for layer in _batchnorm_layers(model):
        layer.momentum = float(momentum)


def _batchnorm_layers(model: keras.Model) -> Iterator[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model``, nested models included."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            yield layer
        elif isinstance(layer, keras.Model):
            yield from _batchnorm_layers(layer)


def compile_model(model: keras.Model, task: str, learning_rate, weight_decay: float) -> None:
    """Compile with AdamW; ``learning_rate`` is a float or a schedule."""
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    if task == "lung_unet":
        model.compile(optimizer=optimizer, loss=losses.dice_bce_loss, metrics=[losses.DiceScore()])
    else:
        model.compile(optimizer=optimizer, loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc"), "accuracy"],
                      weighted_metrics=[])


STRATEGIES = ("default", "mirrored", "multi_worker")


def distribution_strategy(name: str):
    """The ``tf.distribute`` strategy for ``trainer.strategy``.

    * ``default``: no distribution (TensorFlow's default strategy, one device).
    * ``mirrored``: synchronous data parallelism over this machine's devices
      (``MirroredStrategy``): every GPU, or every logical CPU device when there is no GPU.
    * ``multi_worker``: the same over several machines (``MultiWorkerMirroredStrategy``); each
      machine runs the same command with its own ``TF_CONFIG`` (the cluster and its task index,
      see README). Without ``TF_CONFIG`` it trains alone on its local devices.

    ``trainer.batch_size`` is the global batch of one step: each of N replicas computes
    ``batch_size / N`` examples, and the replicas' gradients are combined into the update one device
    would make with the whole batch.

    Must be called before other TensorFlow work in the process (the multi-worker collectives are
    configured at program start).
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if name == "multi_worker":
        class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
            """Accepts the reductions Keras 3's ``fit`` asks of it (keras-team/keras#20585): a
            nested structure (the first input batch) is reduced element by element, and a scalar
            (a loss or metric value) reduced "along axis 0" is reduced over the replicas."""

            def reduce(self, reduce_op, value, axis):
                parent = super()

                def one(v):
                    rank = self.experimental_local_results(v)[0].shape.rank
                    return parent.reduce(reduce_op, v, axis if rank else None)

                return tf.nest.map_structure(one, value)

        return MultiWorkerStrategy()
    raise TrainingError(f"trainer.strategy={name!r}: use one of {', '.join(STRATEGIES)}")


def monitored_metric(task: str) -> str:
    return "val_dice" if task == "lung_unet" else "val_auc"


# =============================================================================================
# Evaluation
# =============================================================================================


def predict(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Model outputs for float16 ``(N, S, S)`` images in [0, 1], batched; returns float32."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32)
        batch = np.repeat(batch[..., np.newaxis], 3, axis=-1)
        outputs.append(np.asarray(model(batch, training=False), np.float32))
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def evaluate_segmentation(model, slices: data.SliceSet, batch_size: int) -> dict:
    """Mean per-slice Dice and IoU on 224 masks, and the pooled Dice over all pixels."""
    probs = predict(model, slices.images, batch_size)[..., 0]
    pred = probs >= 0.5
    truth = slices.masks.astype(bool)
    return {
        "dice_mean": float(np.mean([M.dice(p, t) for p, t in zip(pred, truth, strict=True)])),
        "iou_mean": float(np.mean([M.iou(p, t) for p, t in zip(pred, truth, strict=True)])),
        "dice_pooled": M.dice(pred, truth),
        "n_slices": len(slices),
    }


def evaluate_classifier(model, slices: data.SliceSet, batch_size: int,
                        threshold: float) -> tuple[dict, np.ndarray]:
    """Slice AUC and sensitivity/specificity at 0.5 and at ``threshold``; returns (metrics, scores)."""
    scores = predict(model, slices.images, batch_size)[:, 0]
    out = {"at_0.5": M.classification_summary(slices.labels, scores, 0.5),
           "at_operating_point": M.classification_summary(slices.labels, scores, threshold),
           "auc": M.auc(slices.labels, scores), "n_slices": len(slices),
           "n_abnormal": int(slices.labels.sum())}
    return out, scores


def gradcam_map_scales(model: keras.Model, slices: data.SliceSet, scores: np.ndarray, threshold: float,
                       quantile: float, batch_size: int) -> dict | None:
    """The classifier's fixed Grad-CAM map scales (``analysis.map_scale=fixed``): per Grad-CAM layer,
    the ``quantile`` of the per-slice maxima of the logit's raw maps over the slices of ``slices``
    (float16 ``(N, S, S)`` in [0, 1], a validation split) it calls positive (``scores >= threshold``).
    None when it calls none positive."""
    positive = np.flatnonzero(np.asarray(scores) >= threshold)
    if not len(positive):
        return None
    images = np.repeat(slices.images[positive].astype(np.float32)[..., np.newaxis], 3, axis=-1)
    layers = localize.gradcam_scales(model, images, quantile, batch_size=batch_size)
    return {"quantile": quantile, "score": "logit", "slices": len(positive), "layers": layers}


def case_ratios(slices: data.SliceSet, scores: np.ndarray, slice_threshold: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per case: the share of its (sampled) lung slices called positive, and the case label (any
    abnormal slice). Returns (ratios, labels), one entry per case in sorted case order."""
    frame = pd.DataFrame({"case": slices.case_ids, "positive": scores >= slice_threshold,
                          "abnormal": slices.labels > 0})
    per_case = frame.groupby("case").agg(ratio=("positive", "mean"), label=("abnormal", "max"))
    return per_case["ratio"].to_numpy(float), per_case["label"].to_numpy(int)


def tune_case_threshold(slices: data.SliceSet, scores: np.ndarray, slice_threshold: float
                        ) -> tuple[float, dict]:
    """The case threshold on positive-slice ratios chosen on validation cases: Youden's J, moved
    half-way down to the next lower ratio so it does not sit on a validation case. Falls back to
    0.1 when the validation cases are all of one class."""
    ratios, labels = case_ratios(slices, scores, slice_threshold)
    if np.unique(labels).size < 2:
        threshold = 0.1
    else:
        threshold = M.youden_threshold(labels, ratios)
        below = ratios[ratios < threshold]
        if below.size:
            threshold = (threshold + below.max()) / 2.0
    return threshold, M.classification_summary(labels, ratios, threshold)


def case_level_summary(slices: data.SliceSet, scores: np.ndarray, slice_threshold: float,
                       case_threshold: float) -> dict:
    ratios, labels = case_ratios(slices, scores, slice_threshold)
    return M.classification_summary(labels, ratios, case_threshold)


# =============================================================================================
# The run
# =============================================================================================


def train(cfg: DictConfig) -> dict:
    """Run one training experiment from its composed config; returns metrics.json's content.

    The Keras dtype policy is set from ``trainer.precision`` for the run and restored afterwards.
    """
    policy = keras.mixed_precision.global_policy()
    # Read once, at the start: the code this process trains with, for both stages of a run (the
    # checkout may move on during an hour-long run).
    environment = provenance.environment()
    try:
        if cfg.trainer.get("first_stage") and not cfg.model.get("init_from"):
            cfg = after_first_stage(cfg, environment)
        return _train(cfg, environment)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def after_first_stage(cfg: DictConfig, environment: dict) -> DictConfig:
    """Progressive resizing: train the run's model at ``trainer.first_stage.input_size`` first,
    then return the config that goes on from that model at ``data.input_size``.

    The first stage is a complete run of its own in ``<run_dir>/first_stage/`` (same data, model
    and augmentation; ``epochs``, ``learning_rate`` and ``warmup_epochs`` from ``first_stage``, and
    ``first_stage.early_stopping_patience`` and ``first_stage.augment``, when given, override the
    patience and augmentation settings for it),
    so it resumes, and a finished one is reused when the whole run is restarted. The returned
    config sets ``model.init_from`` to its ``model.keras``; the main stage's init record then
    reads ``finetuned from .../first_stage/model.keras (...), resized from 112x112 px``.
    """
    stage = cfg.trainer.first_stage
    stage_dir = Path(cfg.run_dir) / "first_stage"
    stage_cfg = cfg.copy()
    with open_dict(stage_cfg):
        stage_cfg.run_dir = str(stage_dir)
        stage_cfg.data.input_size = stage.input_size
        for key in ("epochs", "learning_rate", "warmup_epochs"):
            stage_cfg.trainer[key] = stage[key]
        if stage.get("early_stopping_patience") is not None:   # the stage's own patience
            stage_cfg.trainer.early_stopping_patience = stage.early_stopping_patience
        for key, value in (stage.get("augment") or {}).items():   # the stage's own augmentation
            stage_cfg.augment[key] = value
        stage_cfg.trainer.first_stage = None
    if (stage_dir / "metrics.json").exists() and not cfg.overwrite:
        stored = OmegaConf.to_container(OmegaConf.load(stage_dir / "config.yaml"), resolve=True)
        if _settings(stored) != _settings(OmegaConf.to_container(stage_cfg, resolve=True)):
            raise TrainingError(f"{stage_dir}: a finished first stage with other settings; start a new "
                                "run (omit run_dir) or pass overwrite=true")
        log.info("first stage (%d px) already finished in %s: going on from its model",
                 stage.input_size, stage_dir)
    else:
        log.info("first stage: %d epochs at %d px in %s, then %d epochs at %d px",
                 stage.epochs, stage.input_size, stage_dir, cfg.trainer.epochs, cfg.data.input_size)
        _train(stage_cfg, environment)
    main_cfg = cfg.copy()
    with open_dict(main_cfg):
        main_cfg.run_dir = str(stage_dir.parent)  # resolved once: ${now:...} must not move it
        main_cfg.model.init_from = str(stage_dir / "model.keras")
    return main_cfg


def _settings(plain: dict) -> dict:
    """A run's resolved settings (the config as plain dicts) without where it writes (``run_dir``,
    ``overwrite``)."""
    return {k: v for k, v in plain.items() if k not in ("run_dir", "overwrite")}


def _train(cfg: DictConfig, environment: dict) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.to_container(cfg, resolve=True)
    config_yaml = OmegaConf.to_yaml(_settings(plain))
    resume = check_run_dir(run_dir, config_yaml, cfg.overwrite)
    task, trainer, data_cfg = cfg.task, plain["trainer"], plain["data"]
    if task not in ("lung_unet", "classifier", "pretrain"):
        raise TrainingError(f"task={task!r}: use +experiment=lung_unet, classifier or "
                            "pretrain_resnet50 / pretrain_vgg16")
    # Before any other TensorFlow work: multi-worker collectives are set up at program start.
    strategy = distribution_strategy(trainer["strategy"])
    keras.utils.set_random_seed(cfg.seed)
    if trainer["deterministic"]:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(training_precision(trainer["precision"]))
    atomic.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(plain))
    log.info("%s | run folder %s", RESEARCH_USE_NOTICE, run_dir)
    given = [a for a in sys.argv[1:] if not a.startswith(("run_dir=", "--"))]
    log.info("to resume this run if it stops: python -m radlogics_repro.train %s run_dir=%s",
             " ".join(given) or f"+experiment={task}", run_dir)

    if data_cfg.get("generate_if_missing"):
        from radlogics_repro import synth

        synth.ensure_dataset(data_cfg["manifest"], data_cfg["generator"])
    if task == "pretrain":
        from radlogics_repro.pretrain import run_pretraining

        metrics_doc = run_pretraining(
            run_dir=run_dir, resume=resume, config_yaml=config_yaml, plain=plain,
            environment=environment, strategy=strategy, seed=cfg.seed,
            training_callbacks=lambda init, stateful: run_callbacks(run_dir, config_yaml, init,
                                                                    stateful, resume))
        return _finish_run(run_dir, metrics_doc)

    # ---- input pipeline -----------------------------------------------------------------------
    lung_segmenter = lung_segmenter_for(data_cfg) if task == "classifier" else None
    load = lambda split: load_task_slices(  # noqa: E731
        task, data_cfg, split, max_cases=trainer["max_cases_per_split"],
        cache=trainer["cache_slices"], lung_segmenter=lung_segmenter)
    train_slices, val_slices = load("train"), load("val")
    log.info("slices: train %d, val %d", len(train_slices), len(val_slices))
    first_epoch = resume["epoch"] if resume else 0
    epochs, batch = trainer["epochs"], trainer["batch_size"]
    class_weights = None
    if task == "classifier":
        class_weights = data.balanced_class_weights(train_slices.labels)
        log.info("abnormal slices: train %d/%d, val %d/%d; class weights %s",
                 train_slices.labels.sum(), len(train_slices), val_slices.labels.sum(),
                 len(val_slices), class_weights)
        make_ds = data.classification_dataset
        extra = {"class_weights": class_weights}
    else:
        make_ds, extra = data.segmentation_dataset, {}
    train_ds = make_ds(train_slices, batch_size=batch, training=True, seed=cfg.seed,
                       augment=make_augmenter(task, plain.get("augment") or {}),
                       first_epoch=first_epoch, epochs=epochs, **extra)
    # Per-epoch validation (checkpoint choice, early stopping) on an evenly spread subset; the
    # final evaluation below uses every validation and test slice.
    val_ds = make_ds(val_slices.evenly_spaced(trainer["max_val_slices_per_epoch"]),
                     batch_size=trainer["eval_batch_size"], training=False)

    # ---- model --------------------------------------------------------------------------------
    # Built (or loaded) and compiled inside the strategy's scope, so that its variables, optimizer
    # state and metrics are mirrored on every replica; batch is the global batch of one step.
    with strategy.scope():
        if resume:
            model = models.load_model(run_dir / "resume" / "last.keras", compile=True)
            init = resume["init"]
        else:
            model, init = build_model(task, plain["model"], data_cfg["input_size"])
            set_batchnorm_momentum(model, trainer["batchnorm_momentum"])
            if trainer.get("freeze_batchnorm"):
                log.info("BatchNorm frozen (inference mode) in %d layers", freeze_batchnorm(model))
            steps = data.steps_per_epoch(len(train_slices), batch)
            schedule = learning_rate_schedule(trainer["learning_rate"], epochs * steps,
                                              trainer["warmup_epochs"] * steps, trainer["lr_schedule"])
            compile_model(model, task, schedule, trainer["weight_decay"])
    log.info("model %s, %.1f M parameters, init: %s", model.name, model.count_params() / 1e6, init)
    log.info("strategy %s: %d replica(s), global batch %d (%s per replica)", trainer["strategy"],
             strategy.num_replicas_in_sync, batch, batch / strategy.num_replicas_in_sync)

    # ---- callbacks ----------------------------------------------------------------------------
    monitor = monitored_metric(task)
    best_weights = run_dir / "resume" / "best.weights.h5"
    best_weights.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = keras.callbacks.ModelCheckpoint(best_weights, monitor=monitor, mode="max",
                                                 save_best_only=True, save_weights_only=True)
    stopping = keras.callbacks.EarlyStopping(monitor=monitor, mode="max",
                                             patience=trainer["early_stopping_patience"])
    stateful = {"checkpoint": checkpoint, "early_stopping": stopping}
    if resume:
        for name, callback in stateful.items():
            _restore_callback_state(callback, resume["callbacks"].get(name, {}))
    callbacks, nan_guard = run_callbacks(run_dir, config_yaml, init, stateful, resume)

    # ---- fit ----------------------------------------------------------------------------------
    if first_epoch < epochs:
        history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=first_epoch,
                            steps_per_epoch=data.steps_per_epoch(len(train_slices), batch),
                            callbacks=callbacks, shuffle=False,
                            verbose=1 if sys.stdout.isatty() else 2)
        if nan_guard.stopped_on_nan or _loss_is_nan(history):
            raise TrainingError(f"{run_dir}: the loss became NaN; lower trainer.learning_rate or check "
                                "the data (the last good epoch is kept in resume/)")
    if best_weights.exists():
        model.load_weights(best_weights)

    # ---- evaluation ---------------------------------------------------------------------------
    test_slices = _load_test(load)
    eval_batch = trainer["eval_batch_size"]
    case_threshold = None
    if task == "lung_unet":
        results = {"val": evaluate_segmentation(model, val_slices, eval_batch)}
        if test_slices is not None:
            results["test"] = evaluate_segmentation(model, test_slices, eval_batch)
        threshold = 0.5
    else:
        val_scores = predict(model, val_slices.images, eval_batch)[:, 0]
        threshold = (M.youden_threshold(val_slices.labels, val_scores)
                     if np.unique(val_slices.labels).size == 2 else 0.5)
        results = {"val": evaluate_classifier(model, val_slices, eval_batch, threshold)[0]}
        if data_cfg["kind"] == "volumes":
            case_threshold, results["val"]["cases"] = tune_case_threshold(val_slices, val_scores,
                                                                          threshold)
        if test_slices is not None:
            results["test"], test_scores = evaluate_classifier(model, test_slices, eval_batch, threshold)
            if case_threshold is not None:
                results["test"]["cases"] = case_level_summary(test_slices, test_scores, threshold,
                                                              case_threshold)

    # ---- outputs ------------------------------------------------------------------------------
    card = model_card(task, data_cfg, init, threshold, plain, environment["commit"])
    card["case_threshold"] = case_threshold
    if task == "classifier":
        card["gradcam_scales"] = gradcam_map_scales(model, val_slices, val_scores, threshold,
                                                    localize.MAP_SCALE_QUANTILE, eval_batch)
    pretraining = _pretraining_of(plain["model"])
    card["pretraining"] = pretraining
    save_model_atomically(model, run_dir / "model.keras")
    atomic.write_text(run_dir / "model.json", json.dumps(card, indent=2))
    from radlogics_repro.report import training_figure

    training_figure(task, model, val_slices, run_dir / "predictions.png")
    metrics_doc = {
        "notice": RESEARCH_USE_NOTICE, "task": task, "init": init, "operating_threshold": threshold,
        "case_threshold": case_threshold,
        "data": _data_provenance(data_cfg), "metrics": results,
        "slices": {"train": len(train_slices), "val": len(val_slices),
                   "test": len(test_slices) if test_slices is not None else 0},
        "environment": environment,
        "precision": keras.mixed_precision.global_policy().name,
        "distribution": {"strategy": trainer["strategy"], "replicas": strategy.num_replicas_in_sync,
                         "global_batch_size": batch},
    }
    if pretraining is not None:
        metrics_doc["pretraining"] = pretraining
    log.info("done: %s", json.dumps(results, default=float))
    return _finish_run(run_dir, metrics_doc)


def run_callbacks(run_dir: Path, config_yaml: str, init: str, stateful: dict,
                  resume: dict | None) -> tuple[list, StopOnNaN]:
    """The callbacks of every training run: NaN guard, the ``stateful`` ones (checkpoint, early
    stopping: their state is saved for resuming), CSV history, TensorBoard, resume checkpoint.
    Returns (callbacks, the NaN guard)."""
    nan_guard = StopOnNaN()
    callbacks = [
        nan_guard, *stateful.values(),
        keras.callbacks.CSVLogger(run_dir / "history.csv", append=resume is not None),
        keras.callbacks.TensorBoard(run_dir / "tensorboard", write_graph=False, profile_batch=0),
        ResumeCheckpoint(run_dir, config_yaml, init, stateful),
    ]
    return callbacks, nan_guard


def _finish_run(run_dir: Path, metrics_doc: dict) -> dict:
    """Write metrics.json (the mark of a finished run) and drop the resume state."""
    metrics_doc["finished"] = provenance.environment()["date"]
    atomic.write_text(run_dir / "metrics.json", json.dumps(metrics_doc, indent=2, default=float))
    shutil.rmtree(run_dir / "resume", ignore_errors=True)
    return metrics_doc


def _pretraining_of(model_cfg: dict) -> dict | None:
    """The provenance card of the self-supervised weights the backbone started from, if any (not
    for a fine-tuning run: its init record names the model it started from)."""
    if model_cfg.get("init_from"):
        return None
    return models.pretraining_provenance(model_cfg.get("weights"))


def _loss_is_nan(history) -> bool:
    return any(not math.isfinite(v) for v in history.history.get("loss", []))


def _load_test(load):
    try:
        return load("test")
    except data.DatasetError as err:
        log.info("no test split evaluated (%s)", err)
        return None


def lung_segmenter_for(data_cfg: dict):
    """None for ground-truth lung masks, else a function study -> mask from a trained U-Net."""
    source = data_cfg.get("lung_masks", "ground_truth")
    if data_cfg["kind"] != "volumes" or source in (None, "ground_truth"):
        return None
    from radlogics_repro.lung_segmentation import load_lung_segmenter

    return load_lung_segmenter(source)


def _data_provenance(data_cfg: dict) -> dict:
    out = {"name": data_cfg.get("name"), "kind": data_cfg["kind"]}
    source = data_cfg.get("manifest") or data_cfg.get("split_csv")
    out["source"] = str(source)
    dataset_json = Path(str(source)).parent / "dataset.json"
    if dataset_json.exists():
        out["dataset"] = json.loads(dataset_json.read_text())
    return out


def model_card(task: str, data_cfg: dict, init: str, threshold: float, config: dict,
               commit: str) -> dict:
    """What inference needs to use the model as it was trained (stored as model.json)."""
    return {
        "schema_version": MODEL_CARD_VERSION,
        "task": task,
        "notice": RESEARCH_USE_NOTICE,
        "input_size": data_cfg["input_size"],
        "input_kind": "hu" if data_cfg["kind"] == "volumes" else "8bit",
        "hu_window": [-1000.0, 0.0],
        "input_mode": data_cfg.get("input_mode"),
        "crop_margin_mm": data_cfg.get("crop_margin_mm"),
        "min_lung_area_mm2": data_cfg.get("min_lung_area_mm2"),
        "min_lesion_area_mm2": data_cfg.get("min_lesion_area_mm2"),
        "operating_threshold": threshold,
        "init": init,
        "data": data_cfg.get("name"),
        "commit": commit,
        "model": config["model"],
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        check_config(cfg, TRAIN_CONFIG_RULES)
        train(cfg)


if __name__ == "__main__":
    from radlogics_repro.cli import check_overrides

    check_overrides("train")
    main()
