"""Training input pipeline: ``fit`` on the real ``tf.data`` pipeline vs on the same tensors in memory.

The real pipeline is what training builds (:func:`radlogics_repro.data.classification_dataset` /
:func:`~radlogics_repro.data.segmentation_dataset` with the experiment's augmentation from
:func:`radlogics_repro.train.make_augmenter`): gather the cached float16 slices, convert to three
float32 channels, augment (rotation, crop, flip, lung noise), batch, prefetch. The reference feeds
``fit`` the first ``steps`` batches of that pipeline, materialised beforehand, from memory. Both run
the same compiled network for the same number of steps, interleaved; the ratio of their steps/s is
how much of the network's speed the pipeline keeps (target >= 0.9).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from radlogics_repro import data, io, preprocess, train
from radlogics_repro.bench.compute import ModelZoo, precision
from radlogics_repro.bench.timing import Row, interleaved

PIPELINE_TARGET = 0.9


def task_slices(task: str, study: io.Study, lung_mask: np.ndarray, lesion_mask: np.ndarray,
                size: int) -> data.SliceSet:
    """Every usable slice of one study, prepared as training prepares them (windowed, resized to
    ``size``; lung crops with slice labels for the classifier)."""
    n = study.hu.shape[0]
    if task == "lung_unet":
        images, masks, z = data.segmentation_slices_from_study(study, lung_mask, size=size, step_mm=0.0)
        labels = np.zeros(len(z), np.uint8)
    else:
        images, labels, z = data.classification_slices_from_study(
            study, lung_mask, lesion_mask, size=size, step_mm=0.0, input_mode="lung_crop",
            margin_mm=preprocess.DEFAULT_CROP_MARGIN_MM,
            min_lesion_area_mm2=preprocess.DEFAULT_MIN_LESION_AREA_MM2,
            min_lung_area_mm2=preprocess.DEFAULT_MIN_LUNG_AREA_MM2)
        masks = np.zeros((len(z), 0, 0), np.uint8)
    ids = np.full(len(z), "bench")
    if len(z) == 0:
        raise ValueError(f"the benchmark study ({n} slices) has no lung slice for {task}")
    return data.SliceSet(images, masks, labels, ids, ids, np.asarray(z, int))


def training_pipeline(task: str, slices: data.SliceSet, batch: int, augment_settings: dict
                      ) -> tf.data.Dataset:
    """The training ``tf.data`` pipeline of ``task`` as :mod:`radlogics_repro.train` builds it."""
    augmenter = train.make_augmenter(task, augment_settings)
    if task == "classifier":
        return data.classification_dataset(
            slices, batch_size=batch, training=True, augment=augmenter, seed=0, epochs=1_000_000,
            class_weights=data.balanced_class_weights(slices.labels))
    return data.segmentation_dataset(slices, batch_size=batch, training=True, augment=augmenter, seed=0,
                                     epochs=1_000_000)


def in_memory(dataset: tf.data.Dataset, steps: int, batch: int) -> tf.data.Dataset:
    """The first ``steps`` batches of ``dataset``, computed now and served from memory, repeated.

    Served as examples re-batched by ``batch`` (no drop of the remainder), so that its element
    spec, batch dimension None, is the pipeline's: ``fit`` then runs the same traced step on both.
    """
    batches = list(dataset.take(steps).as_numpy_iterator())
    examples = tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))
    return (tf.data.Dataset.from_tensor_slices(examples).batch(batch).repeat()
            .prefetch(tf.data.AUTOTUNE))


def pipeline_row(zoo: ModelZoo, task: str, policy: str, slices: data.SliceSet, *, batch: int,
                 augment_settings: dict, steps: int, repeats: int) -> Row:
    """Steps/s of ``fit`` on the real pipeline and on the same batches in memory (interleaved)."""
    steps = max(1, min(steps, len(slices) // batch))
    model = zoo.compiled(task, policy)
    real = training_pipeline(task, slices, batch, augment_settings)
    memory = in_memory(real, steps, batch)
    if memory.element_spec != real.element_spec:
        raise ValueError(f"in-memory batches {memory.element_spec} differ from the pipeline's "
                         f"{real.element_spec}")

    def fit(dataset, n_steps=steps):
        with precision(policy):
            model.fit(dataset, epochs=1, steps_per_epoch=n_steps, verbose=0, shuffle=False)

    for dataset in (real, memory):  # warm-up: one step each (tracing, the pipeline's first batch)
        fit(dataset, n_steps=1)
    timings = interleaved({"pipeline": lambda: fit(real), "memory": lambda: fit(memory)}, repeats,
                          warmup=0)
    pipeline_rate = timings["pipeline"].rate(steps)
    memory_rate = timings["memory"].rate(steps)
    ratio = pipeline_rate / memory_rate
    augmentation = ", ".join(k for k, v in augment_settings.items() if v is True) or "none"
    return Row("pipeline", f"{zoo.describe(task)} fit, {policy}, batch {batch}, {steps} steps "
                           f"(augment: {augmentation})",
               f"{pipeline_rate:.3f} steps/s (tf.data pipeline)",
               reference=f"{memory_rate:.3f} steps/s (same batches in memory)",
               ratio=ratio, ratio_text=f"{ratio:.2f}", target=f">= {PIPELINE_TARGET}",
               met=ratio >= PIPELINE_TARGET, cpu=timings["pipeline"].cpu_share)
