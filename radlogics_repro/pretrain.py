"""Self-supervised pre-training of a backbone on unlabeled CT (SimCLR), run by the training entry point:

    python -m radlogics_repro.train +experiment=pretrain_resnet50   # the classifier's backbone
    python -m radlogics_repro.train +experiment=pretrain_vgg16      # the lung U-Net's encoder

The run folder holds, besides the usual ``config.yaml``, ``history.csv``, ``metrics.json`` and
``model.keras`` (the whole SimCLR network, projection head included):

* ``backbone.weights.h5``: the backbone alone; pass it on as
  ``python -m radlogics_repro.train +experiment=classifier model.weights=<run>/backbone.weights.h5``
  (``+experiment=lung_unet`` for a VGG16 file);
* ``backbone.pretraining.json``: its provenance (method, data sources and slice counts, epochs,
  input size, final pretext loss and accuracy, commit). Every run that loads the weights file reads
  this card: its summary goes into that run's init record and the whole card into its
  ``metrics.json`` and ``model.json``;
* ``views.png``: a few pairs of augmented views, to check the augmentation is sensible.

The exported weights are those of the last epoch: the pretext task has no held-out set to choose an
epoch on, and SimCLR's loss keeps falling as long as the cosine schedule runs.

Interrupted runs resume from the last finished epoch like the other training runs (``run_dir=...``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import keras
import numpy as np

from radlogics_repro import RESEARCH_USE_NOTICE, atomic, augment, data, models, unlabeled
from radlogics_repro.models.weights import file_sha256

log = logging.getLogger(__name__)

METHOD = "SimCLR (NT-Xent contrastive loss, two augmented views per slice)"
WEIGHTS_FILE = "backbone.weights.h5"


def load_pretraining_slices(data_cfg: dict, *, cache_dir: Path | None) -> tuple[data.SliceSet, list[dict]]:
    """The unlabeled slices of ``data.sources`` (cached as .npz under ``cache_dir``) and a per-source
    summary ``[{"source", "items", "slices"}]``."""
    sources = [str(s) for s in data_cfg["sources"]]
    params = {"size": data_cfg["input_size"], "step_mm": data_cfg["slice_step_mm"],
              "manifest_splits": list(data_cfg["manifest_splits"]),
              "max_slices_per_source": data_cfg["max_slices_per_source"]}
    key = {"task": "pretrain", "split": "all", "sources": sources,
           "fingerprint": unlabeled.sources_fingerprint(sources), **params}
    slices = data.cached_slices(cache_dir, key,
                                lambda: unlabeled.load_unlabeled_slices(sources, **params))
    return slices, unlabeled.source_summary(slices, sources)


def compile_pretraining(model: keras.Model, learning_rate, weight_decay: float,
                        temperature: float) -> None:
    """AdamW on the NT-Xent loss, with the pair accuracy (chance: 1 / (2B - 1)) as metric."""
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=learning_rate,
                                                   weight_decay=weight_decay),
                  loss=models.NTXentLoss(temperature=temperature),
                  metrics=[models.pair_accuracy])


def provenance_card(*, backbone: str, data_cfg: dict, sources: list[dict], n_slices: int,
                    trainer: dict, model_cfg: dict, history: dict, environment: dict,
                    run_dir: Path, weights_sha256: str) -> dict:
    """What a later run needs to know about the weights file: ``backbone.pretraining.json``."""
    epochs_done = len(history.get("loss", []))
    batch = trainer["batch_size"]
    summary = (f"SimCLR {backbone}, {epochs_done} epochs, {n_slices} unlabeled slices from "
               f"{len(sources)} source(s), {data_cfg['input_size']} px, batch {batch}, "
               f"commit {environment['commit']}")
    return {
        "notice": RESEARCH_USE_NOTICE,
        "method": METHOD,
        "backbone": backbone,
        "summary": summary,
        "epochs": epochs_done,
        "batch_size_slices": batch,
        "views_per_batch": 2 * batch,
        "temperature": model_cfg["temperature"],
        "projection_units": list(model_cfg["projection_units"]),
        "input_size": data_cfg["input_size"],
        "slice_step_mm": data_cfg["slice_step_mm"],
        "data": {"name": data_cfg.get("name"), "sources": sources, "n_slices": n_slices,
                 "manifest_splits": list(data_cfg["manifest_splits"])},
        "trainer": {k: trainer[k] for k in ("learning_rate", "lr_schedule", "warmup_epochs",
                                            "weight_decay", "precision", "batchnorm_momentum")},
        "final": {"loss": _last(history, "loss"), "pair_accuracy": _last(history, "pair_accuracy"),
                  "chance_pair_accuracy": 1.0 / max(2 * batch - 1, 1),
                  "random_encoder_loss": float(np.log(max(2 * batch - 1, 1)))},
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": weights_sha256,
        "run_dir": str(run_dir),
        "environment": environment,
    }


def _last(history: dict, key: str) -> float | None:
    values = history.get(key) or []
    return float(values[-1]) if values else None


def run_pretraining(*, run_dir: Path, resume: dict | None, config_yaml: str, plain: dict,
                    environment: dict, strategy, seed: int, training_callbacks) -> dict:
    """One pre-training run from plain settings (``plain``: the resolved config as dicts).

    ``training_callbacks(model_init, stateful)`` gives the callbacks every training run uses
    (NaN guard, CSV log, resume checkpoint) so the loop here stays the same as the supervised one.
    Returns metrics.json's content.
    """
    from radlogics_repro.report import view_pairs_figure
    from radlogics_repro.train import (
        TrainingError,
        learning_rate_schedule,
        save_model_atomically,
        set_batchnorm_momentum,
    )

    trainer, data_cfg, model_cfg = plain["trainer"], plain["data"], plain["model"]
    backbone, size = model_cfg["backbone"], data_cfg["input_size"]
    if len(model_cfg["projection_units"]) != 2:
        raise TrainingError(f"model.projection_units={model_cfg['projection_units']}: give two widths, "
                            "[hidden, output]")
    cache_dir = Path(plain["paths"]["cache_dir"]) / "pretrain-slices" if trainer["cache_slices"] else None
    slices, sources = load_pretraining_slices(data_cfg, cache_dir=cache_dir)
    if len(slices) < 2:
        raise TrainingError(f"data.sources: {len(slices)} slice(s); contrastive pre-training needs "
                            "at least 2")
    batch, epochs = min(trainer["batch_size"], len(slices)), trainer["epochs"]
    first_epoch = resume["epoch"] if resume else 0
    log.info("pre-training on %d unlabeled slices of %d source(s): %s", len(slices), len(sources),
             json.dumps(sources))
    view = augment.contrastive_view_augmenter(**plain["augment"])
    dataset = unlabeled.contrastive_dataset(slices.images, view=view, batch_size=batch, seed=seed,
                                            first_epoch=first_epoch, epochs=epochs)
    steps = data.steps_per_epoch(len(slices), batch)
    with strategy.scope():
        if resume:
            model, init = models.load_model(run_dir / "resume" / "last.keras", compile=True), resume["init"]
        else:
            model = models.build_contrastive_model(backbone, (size, size, 3),
                                                   model_cfg["projection_units"], model_cfg["weights"])
            init = models.init_record(model)
            set_batchnorm_momentum(model, trainer["batchnorm_momentum"])
            schedule = learning_rate_schedule(trainer["learning_rate"], epochs * steps,
                                              trainer["warmup_epochs"] * steps, trainer["lr_schedule"])
            compile_pretraining(model, schedule, trainer["weight_decay"], model_cfg["temperature"])
    log.info("model %s, %.1f M parameters, init %s; %d steps of %d slices (%d views) per epoch",
             model.name, model.count_params() / 1e6, init, steps, batch, 2 * batch)

    callbacks, nan_guard = training_callbacks(init, {})
    if first_epoch < epochs:
        model.fit(dataset, epochs=epochs, initial_epoch=first_epoch, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
        if nan_guard.stopped_on_nan:
            raise TrainingError(f"{run_dir}: the loss became NaN; lower trainer.learning_rate "
                                "(the last good epoch is kept in resume/)")
    history = _read_history(run_dir / "history.csv")

    weights_path = run_dir / WEIGHTS_FILE
    tmp = run_dir / ("tmp-" + WEIGHTS_FILE)
    models.export_backbone(model, backbone, tmp)
    tmp.replace(weights_path)
    card = provenance_card(backbone=backbone, data_cfg=data_cfg, sources=sources, n_slices=len(slices),
                           trainer=trainer, model_cfg=model_cfg, history=history,
                           environment=environment, run_dir=run_dir,
                           weights_sha256=file_sha256(weights_path))
    atomic.write_text(models.pretraining_card_path(weights_path), json.dumps(card, indent=2))
    save_model_atomically(model, run_dir / "model.keras")
    sample, _ = next(iter(unlabeled.contrastive_dataset(
        slices.evenly_spaced(6).images, view=view, batch_size=6, seed=seed)))
    view_pairs_figure(sample.numpy(), run_dir / "views.png",
                      f"SimCLR views ({backbone}, {size} px): each column is one slice")
    return {"notice": RESEARCH_USE_NOTICE, "task": "pretrain", "init": init,
            "pretraining": card, "slices": {"train": len(slices)},
            "environment": environment}


def _read_history(path: Path) -> dict:
    """history.csv as {column: [values]} ({} when absent)."""
    if not path.is_file():
        return {}
    import pandas as pd

    frame = pd.read_csv(path)
    return {column: frame[column].tolist() for column in frame.columns}
