"""Slice datasets for the two networks: manifest -> patient-wise split -> 2D slices -> ``tf.data``.

Two input paths:

* **CT volumes with HU** (the synthetic phantoms, or any manifest of DICOM/NIfTI studies): each study
  is read with :func:`radlogics_repro.io.load_study`, windowed to [-1000, 0] HU and resized by
  :mod:`radlogics_repro.preprocess`, the same functions inference uses.
* **8-bit display images** (real slice sets such as UCSD COVID-CT): already windowed by whoever made
  them, HU unrecoverable; every file is converted to one grey format
  (:func:`radlogics_repro.preprocess.gray_image_to_unit`) and resized whole.

Slices are extracted once per (manifest, split, parameters) and cached as ``.npz`` beside the
manifest (``<dataset>/.cache/``), so a second run or a resumed run starts at once. Images are kept as
float16 in [0, 1] (a 1000 HU window in 2^11 steps near 1, finer below: well under scanner noise).

A manifest is a CSV with at least ``case_id, patient_id, split, image``; ``lung_mask``,
``lesion_mask`` and ``label`` where a task needs them. Paths are relative to the manifest's folder or
absolute. Splits are by patient: :func:`check_patient_splits` refuses a manifest where one patient
appears in two splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from radlogics_repro import atomic, io, preprocess

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


class DatasetError(ValueError):
    """A manifest or dataset that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Manifests and splits
# ---------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike, required: Sequence[str] = ("image",)) -> pd.DataFrame:
    """Read a manifest CSV, resolve its paths and check them.

    Args:
        path: the CSV file.
        required: path columns that must be present and point at existing files or folders
            (``case_id``, ``patient_id`` and ``split`` are always required).

    Returns:
        The manifest with path columns made absolute (str).

    Raises:
        DatasetError: missing file, empty manifest, missing column, an empty, repeated or unsafe
            id (see :func:`check_ids`), a path that does not exist, a patient in two splits, an
            unknown split name.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    try:
        frame = pd.read_csv(path, dtype={"case_id": str, "patient_id": str, "split": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a readable CSV manifest ({err})") from None
    if frame.empty:
        raise DatasetError(f"{path}: manifest has no rows")
    missing = [c for c in ("case_id", "patient_id", "split", *required) if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    check_ids(frame, source=path)
    bad = sorted(set(frame["split"]) - set(SPLITS))
    if bad:
        raise DatasetError(f"{path}: unknown split name(s) {bad}; use {list(SPLITS)}")
    for column in ("image", "lung_mask", "lesion_mask", "dicom"):
        if column in frame.columns:
            frame[column] = [_resolve(path, value, column, required) for value in frame[column]]
    check_patient_splits(frame, source=path)
    return frame


def _resolve(manifest: Path, value, column: str, required: Sequence[str]) -> str:
    if not isinstance(value, str) or not value:
        if column in required:
            raise DatasetError(f"{manifest}: empty '{column}' entry")
        return ""
    full = (manifest.parent / value).resolve()
    if column in required and not full.exists():
        raise DatasetError(f"{manifest}: '{column}' entry {value} does not exist ({full})")
    return str(full)


def check_ids(frame: pd.DataFrame, source: str | os.PathLike = "<manifest>") -> None:
    """Raise :class:`DatasetError` unless every row has a ``case_id`` and a ``patient_id`` that are
    plain names (:func:`radlogics_repro.atomic.check_plain_name`: outputs are named after them, so
    ``../x`` must not escape an output folder) and no ``case_id`` repeats."""
    for column in ("case_id", "patient_id"):
        for row, value in enumerate(frame[column], start=1):  # data rows, after the header
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(f"{source}: row {row} has an empty '{column}'")
            try:
                atomic.check_plain_name(value, column)
            except atomic.UnsafeNameError as err:
                raise DatasetError(f"{source}: row {row}: {err}") from None
    repeated = frame["case_id"][frame["case_id"].duplicated()].unique().tolist()
    if repeated:
        raise DatasetError(f"{source}: case_id(s) {repeated[:5]} appear in more than one row")


def check_patient_splits(frame: pd.DataFrame, source: str | os.PathLike = "<manifest>") -> None:
    """Raise :class:`DatasetError` when one patient appears in more than one split."""
    per_patient = frame.groupby("patient_id")["split"].nunique()
    leaking = per_patient[per_patient > 1].index.tolist()
    if leaking:
        raise DatasetError(
            f"{source}: patient(s) {leaking[:5]} appear in several splits; split by patient"
        )


def assign_patient_splits(
    patient_ids: Sequence[str],
    labels: Sequence[int] | None = None,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, str]:
    """Assign every patient to train/val/test, stratified by label when given.

    Args:
        patient_ids: one entry per case (repeats allowed).
        labels: case labels aligned with ``patient_ids``; a patient's label is its maximum.
        fractions: train, val, test shares (normalised).
        seed: shuffling seed.

    Returns:
        ``{patient_id: split}``; every split that gets a positive share receives at least one
        patient per stratum when the stratum has at least three patients.
    """
    frame = pd.DataFrame({"patient_id": list(patient_ids)})
    frame["label"] = 0 if labels is None else list(labels)
    per_patient = frame.groupby("patient_id")["label"].max()
    shares = np.asarray(fractions, float) / float(np.sum(fractions))
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for _, group in per_patient.groupby(per_patient):
        ids = sorted(group.index)
        rng.shuffle(ids)
        counts = np.floor(shares * len(ids)).astype(int)
        if len(ids) >= 3:
            counts = np.maximum(counts, (shares > 0).astype(int))
        counts[0] = len(ids) - counts[1:].sum()
        edges = np.cumsum(counts)
        for i, pid in enumerate(ids):
            out[pid] = SPLITS[int(np.searchsorted(edges, i, side="right"))]
    return out


# ---------------------------------------------------------------------------------------------
# Slice extraction
# ---------------------------------------------------------------------------------------------


@dataclass
class SliceSet:
    """2D slices ready for a network.

    Attributes:
        images: float16 ``(N, S, S)`` in [0, 1] (windowed HU or 8-bit grey).
        masks: uint8 ``(N, S, S)`` lung mask (0/1) for segmentation; ``(N, 0, 0)`` when unused.
        labels: uint8 ``(N,)`` abnormal (1) / normal (0) for classification; all 0 when unused.
        case_ids, patient_ids: str ``(N,)`` where each slice comes from.
        z: int ``(N,)`` slice index in the study's canonical array (-1 for 2D image sets).
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    case_ids: np.ndarray
    patient_ids: np.ndarray
    z: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, index: np.ndarray) -> SliceSet:
        """The slices at ``index`` (in that order)."""
        return SliceSet(*(getattr(self, f.name)[index] for f in fields(SliceSet)))

    def evenly_spaced(self, n: int | None) -> SliceSet:
        """At most ``n`` slices spread evenly over the set (all of them when ``n`` is None)."""
        if n is None or len(self) <= n:
            return self
        return self.take(np.linspace(0, len(self) - 1, n).round().astype(int))

    @staticmethod
    def concatenate(parts: Sequence[SliceSet], size: int) -> SliceSet:
        if not parts:
            return SliceSet(
                np.zeros((0, size, size), np.float16), np.zeros((0, size, size), np.uint8),
                np.zeros(0, np.uint8), np.zeros(0, str), np.zeros(0, str), np.zeros(0, int),
            )
        return SliceSet(*(np.concatenate([getattr(p, f.name) for p in parts])
                          for f in fields(SliceSet)))


def slice_indices(candidates: np.ndarray, spacing_z_mm: float, step_mm: float) -> np.ndarray:
    """Every k-th slice of the candidate slices, k = max(1, round(step_mm / spacing_z_mm)).

    Thin-slice studies would otherwise dominate a dataset with near-duplicate neighbours.

    Args:
        candidates: bool ``(z,)`` slices allowed.
        spacing_z_mm: slice spacing, mm.
        step_mm: wanted distance between kept slices, mm (0 keeps all).
    """
    index = np.flatnonzero(candidates)
    if step_mm <= 0 or index.size == 0:
        return index
    k = max(1, int(round(step_mm / spacing_z_mm)))
    return index[::k]


def _load_case(row: pd.Series, need: Sequence[str]) -> tuple[io.Study, dict[str, np.ndarray]]:
    study = io.load_study(row["image"])
    masks = {}
    for column in need:
        if not row.get(column):
            raise DatasetError(f"{row['image']}: case {row['case_id']} has no '{column}' file")
        masks[column] = io.load_mask(row[column], study)
    return study, masks


def segmentation_slices_from_study(
    study: io.Study, lung_mask: np.ndarray, *, size: int, step_mm: float,
    empty_fraction: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices for the lung U-Net from one study.

    Keeps the slices that contain lung (every ``step_mm``) plus about ``empty_fraction`` as many
    lung-free slices (so the model learns to say "no lung" above the apex and below the bases).

    Returns:
        images float16 ``(n, size, size)`` in [0, 1], masks uint8 ``(n, size, size)`` (lung = 1),
        z int ``(n,)``.
    """
    has_lung = preprocess.slices_with_lung(lung_mask, study.pixel_area_mm2, min_lung_area_mm2=1.0)
    keep = slice_indices(has_lung, study.spacing[0], step_mm)
    empty = np.flatnonzero(~has_lung)
    n_empty = min(empty.size, int(np.ceil(empty_fraction * keep.size)))
    if n_empty:
        keep = np.sort(np.concatenate([keep, empty[np.linspace(0, empty.size - 1, n_empty)
                                                   .round().astype(int)]]))
    images = preprocess.resize_images(preprocess.window_hu(study.hu[keep]), size).numpy()
    masks = preprocess.resize_images(lung_mask[keep] > 0, size, nearest=True).numpy()
    return images.astype(np.float16), masks.astype(np.uint8), keep


def classifier_inputs_from_study(
    hu: np.ndarray, lung_mask: np.ndarray, pixel_spacing_mm: tuple[float, float], z: np.ndarray,
    *, size: int, input_mode: str = "lung_crop", margin_mm: float = preprocess.DEFAULT_CROP_MARGIN_MM,
) -> tuple[np.ndarray, list[preprocess.Box]]:
    """The classifier's input for chosen slices of one study.

    Args:
        hu: ``(Z, H, W)`` HU.
        lung_mask: ``(Z, H, W)`` nonzero = lung.
        pixel_spacing_mm: (row, column) spacing, mm.
        z: slice indices to prepare.
        size: output side, pixels.
        input_mode: ``lung_crop`` (square lung box with margin; the paper), ``lung_masked`` (lung
            crop with everything outside the lung set to 0, i.e. -1000 HU), or ``whole_slice``.

    Returns:
        float32 ``(n, size, size)`` in [0, 1], and the n boxes (in slice pixels) used, which map
        localisation maps back into the slice.
    """
    if input_mode not in ("lung_crop", "lung_masked", "whole_slice"):
        raise ValueError(f"unknown input_mode {input_mode!r}")
    height, width = hu.shape[1:]
    windowed = preprocess.window_hu(hu[z]).numpy()
    if input_mode == "lung_masked":
        windowed = windowed * (lung_mask[z] > 0)
    boxes = []
    for i in z:
        box = None
        if input_mode != "whole_slice":
            box = preprocess.lung_bounding_box(lung_mask[i], pixel_spacing_mm, margin_mm)
        boxes.append(box or preprocess.whole_slice_box(height, width))
    if len(z) == 0:
        return np.zeros((0, size, size), np.float32), boxes
    return preprocess.crop_and_resize(windowed, boxes, size).numpy(), boxes


def classification_slices_from_study(
    study: io.Study, lung_mask: np.ndarray, lesion_mask: np.ndarray, *, size: int, step_mm: float,
    input_mode: str, margin_mm: float, min_lesion_area_mm2: float, min_lung_area_mm2: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled classifier inputs from one study: only slices containing lung take part.

    Returns:
        images float16 ``(n, size, size)``, labels uint8 ``(n,)``, z int ``(n,)``.
    """
    area = study.pixel_area_mm2
    has_lung = preprocess.slices_with_lung(lung_mask, area, min_lung_area_mm2)
    z = slice_indices(has_lung, study.spacing[0], step_mm)
    labels = preprocess.abnormal_slice_labels(lesion_mask, area, min_lesion_area_mm2)[z]
    images, _ = classifier_inputs_from_study(
        study.hu, lung_mask, tuple(study.spacing[1:]), z, size=size, input_mode=input_mode,
        margin_mm=margin_mm,
    )
    return images.astype(np.float16), labels.astype(np.uint8), z


def load_segmentation_slices(
    manifest: pd.DataFrame, split: str, *, size: int = preprocess.MODEL_INPUT_SIZE,
    step_mm: float = 5.0, empty_fraction: float = 0.1, max_cases: int | None = None,
) -> SliceSet:
    """Lung-segmentation slices of one split (images + lung masks), see
    :func:`segmentation_slices_from_study`."""
    rows = split_rows(manifest, split, max_cases)
    parts = []
    for _, row in rows.iterrows():
        study, masks = _load_case(row, ["lung_mask"])
        images, lung, z = segmentation_slices_from_study(
            study, masks["lung_mask"], size=size, step_mm=step_mm, empty_fraction=empty_fraction
        )
        parts.append(_slice_set(row, images, lung, np.zeros(len(z), np.uint8), z))
    return SliceSet.concatenate(parts, size)


def load_classification_slices(
    manifest: pd.DataFrame, split: str, *, size: int = preprocess.MODEL_INPUT_SIZE,
    step_mm: float = 5.0, input_mode: str = "lung_crop",
    margin_mm: float = preprocess.DEFAULT_CROP_MARGIN_MM,
    min_lesion_area_mm2: float = preprocess.DEFAULT_MIN_LESION_AREA_MM2,
    min_lung_area_mm2: float = preprocess.DEFAULT_MIN_LUNG_AREA_MM2,
    lung_segmenter: Callable[[io.Study], np.ndarray] | None = None,
    max_cases: int | None = None,
) -> SliceSet:
    """Labelled lung-crop slices of one split for the classifier.

    Args:
        lung_segmenter: ``study -> (z, y, x)`` lung mask; None uses the manifest's ground-truth
            ``lung_mask`` (the trained U-Net's :func:`segment_lungs` otherwise).
        Others: see :func:`classification_slices_from_study`.
    """
    rows = split_rows(manifest, split, max_cases)
    parts = []
    for _, row in rows.iterrows():
        need = ["lesion_mask"] if lung_segmenter else ["lung_mask", "lesion_mask"]
        study, masks = _load_case(row, need)
        lung = lung_segmenter(study) if lung_segmenter else masks["lung_mask"]
        images, labels, z = classification_slices_from_study(
            study, lung, masks["lesion_mask"], size=size, step_mm=step_mm,
            input_mode=input_mode, margin_mm=margin_mm, min_lesion_area_mm2=min_lesion_area_mm2,
            min_lung_area_mm2=min_lung_area_mm2,
        )
        parts.append(_slice_set(row, images, np.zeros((len(z), 0, 0), np.uint8), labels, z))
    out = SliceSet.concatenate(parts, size)
    if len(out) == 0:
        raise DatasetError(f"split '{split}': no slice contains lung; check the lung masks")
    return out


def load_image_folder_slices(
    split_csv: str | os.PathLike, split: str, *, size: int = preprocess.MODEL_INPUT_SIZE,
    positive_label: str = "COVID",
) -> SliceSet:
    """Labelled 8-bit slices listed by a CSV ``filename,label,split`` with files at
    ``<csv folder>/<split>/<label>/<filename>`` (the UCSD COVID-CT layout).

    Each image is converted to one grey format and resized whole to ``size`` (no HU, no lung crop).
    The source papers' figures carry no patient ID, so each image is its own "patient"; the
    official splits keep source papers apart.
    """
    split_csv = Path(split_csv)
    if not split_csv.is_file():
        raise DatasetError(f"{split_csv}: split CSV not found")
    table = pd.read_csv(split_csv)
    missing = {"filename", "label", "split"} - set(table.columns)
    if missing:
        raise DatasetError(f"{split_csv}: lacks column(s) {sorted(missing)}")
    table = table[table["split"] == split]
    if table.empty:
        raise DatasetError(f"{split_csv}: no rows for split '{split}'")
    images, labels = [], []
    for _, row in table.iterrows():
        images.append(read_display_image(split_csv.parent / split / row["label"] / row["filename"], size))
        labels.append(int(row["label"] == positive_label))
    names = table["filename"].astype(str).to_numpy()
    return SliceSet(
        np.stack(images).astype(np.float16), np.zeros((len(names), 0, 0), np.uint8),
        np.asarray(labels, np.uint8), names, names, np.full(len(names), -1),
    )


def read_display_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """An 8-bit display image (any PIL mode) as one grey float32 ``(size, size)`` image in [0, 1],
    resized whole (:func:`preprocess.gray_image_to_unit`, then :func:`preprocess.resize_images`).

    Raises:
        DatasetError: one line naming the file, when it cannot be read as an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            grey = preprocess.gray_image_to_unit(np.asarray(img.convert("RGBA")))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from None
    return np.clip(preprocess.resize_images(grey[np.newaxis], size).numpy()[0], 0.0, 1.0)


def split_rows(manifest: pd.DataFrame, split: str, max_cases: int | None = None) -> pd.DataFrame:
    """The manifest rows of ``split``, sorted by case id, at most ``max_cases`` of them."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {SPLITS}")
    rows = manifest[manifest["split"] == split].sort_values("case_id")
    if rows.empty:
        raise DatasetError(f"the manifest has no case in split '{split}'")
    return rows.head(max_cases) if max_cases else rows


def _slice_set(row, images, masks, labels, z) -> SliceSet:
    n = len(z)
    return SliceSet(
        images, masks, labels, np.full(n, str(row["case_id"])),
        np.full(n, str(row["patient_id"])), np.asarray(z, int),
    )


# ---------------------------------------------------------------------------------------------
# On-disk cache of extracted slices
# ---------------------------------------------------------------------------------------------


def cached_slices(cache_dir: str | os.PathLike | None, key: dict, build: Callable[[], SliceSet]
                  ) -> SliceSet:
    """Return ``build()``, cached as ``<cache_dir>/<hash of key>.npz`` (written atomically).

    ``key`` must name everything the slices depend on (manifest path and its modification time,
    split, parameters). ``cache_dir=None`` disables caching.
    """
    if cache_dir is None:
        return build()
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(
        json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    file = cache_dir / f"slices-{key.get('task', 'x')}-{key.get('split', 'x')}-{digest}.npz"
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as data:
                log.info("slices from cache %s", file)
                return SliceSet(**{f.name: data[f.name] for f in fields(SliceSet)})
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable slice cache %s; rebuilding it", file)
    slices = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, **{f.name: getattr(slices, f.name) for f in fields(SliceSet)})
    os.replace(tmp.name, file)
    return slices


def manifest_fingerprint(manifest_path: str | os.PathLike) -> dict:
    """What a cache key needs to know about a manifest file: its path, byte size and mtime.

    The keys are prefixed (``manifest_bytes``, not ``size``) so that merged into a cache key they
    cannot overwrite a slice parameter such as the image ``size``.
    """
    stat = Path(manifest_path).stat()
    return {"manifest": str(Path(manifest_path).resolve()), "manifest_bytes": stat.st_size,
            "manifest_mtime": stat.st_mtime_ns}


# ---------------------------------------------------------------------------------------------
# tf.data pipelines
# ---------------------------------------------------------------------------------------------


def _one_channel(image) -> tf.Tensor:
    """float16 ``(S, S)`` in [0, 1] -> float32 ``(S, S, 1)``, the single channel the augmentations
    transform (a third of the work of transforming the three equal channels, same result)."""
    return tf.cast(image, tf.float32)[..., tf.newaxis]


def _three_channels(image) -> tf.Tensor:
    """``(S, S, 1)`` -> ``(S, S, 3)``, the three equal channels the networks take."""
    return tf.repeat(image, 3, axis=-1)


def epoch_batches(
    arrays: Sequence[np.ndarray], prepare: Callable, *, batch_size: int, seed: int,
    first_epoch: int, epochs: int,
) -> tf.data.Dataset:
    """Training batches for epochs ``first_epoch .. epochs - 1``, each epoch a reshuffle.

    Epoch ``e`` visits the examples in the order ``stateless_shuffle(range(n), (seed, e))`` and
    hands ``prepare(*items, example_seed)`` a seed folded from the example's index and ``e``. The
    stream is therefore a pure function of (seed, epoch): a run resumed at epoch ``e`` sees exactly
    the batches the uninterrupted run saw. Use with ``fit(steps_per_epoch=ceil(n / batch_size),
    initial_epoch=first_epoch, epochs=epochs)``; batches never span two epochs.

    Args:
        arrays: equal-length arrays (first axis = example).
        prepare: ``(*items, seed (2,) int32) -> model inputs``, e.g. conversion and augmentation.
    """
    n = len(arrays[0])
    tensors = tuple(tf.constant(a) for a in arrays)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )

        def load(index):
            example_seed = tf.cast(tf.stack([index, epoch]), tf.int32)
            example_seed = tf.random.experimental.stateless_fold_in(
                example_seed, tf.constant(seed % (2**31), tf.int32))
            return prepare(*(tf.gather(t, index) for t in tensors), example_seed)

        return (tf.data.Dataset.from_tensor_slices(order)
                .map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size))

    return (tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
            .prefetch(tf.data.AUTOTUNE))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one epoch of ``n`` examples (the last one may be short)."""
    return max(1, -(-n // batch_size))


def _batches(arrays: Sequence[np.ndarray], prepare: Callable, *, training: bool, batch_size: int,
             seed: int, first_epoch: int, epochs: int) -> tf.data.Dataset:
    """Training: :func:`epoch_batches`. Otherwise one pass in order, ``prepare(*items)`` without a
    seed (no augmentation)."""
    if training:
        return epoch_batches(arrays, prepare, batch_size=batch_size, seed=seed,
                             first_epoch=first_epoch, epochs=epochs)
    return (tf.data.Dataset.from_tensor_slices(tuple(arrays))
            .map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


def segmentation_dataset(
    slices: SliceSet, *, batch_size: int, training: bool = False, augment: Callable | None = None,
    seed: int = 0, first_epoch: int = 0, epochs: int = 1,
) -> tf.data.Dataset:
    """``(image (S, S, 3) float32 in [0, 1], mask (S, S, 1) float32)`` batches.

    Training: see :func:`epoch_batches`; ``augment(image, mask, seed) -> (image, mask)``.
    Otherwise one deterministic pass in order, no augmentation.
    """
    def prepare(image, mask, example_seed=None):
        image = _one_channel(image)
        mask = tf.cast(mask, tf.float32)[..., tf.newaxis]
        if augment is not None and example_seed is not None:
            image, mask = augment(image, mask, example_seed)
        return _three_channels(image), mask

    return _batches((slices.images, slices.masks), prepare, training=training, batch_size=batch_size,
                    seed=seed, first_epoch=first_epoch, epochs=epochs)


def classification_dataset(
    slices: SliceSet, *, batch_size: int, training: bool = False, augment: Callable | None = None,
    seed: int = 0, first_epoch: int = 0, epochs: int = 1,
    class_weights: dict[int, float] | None = None,
) -> tf.data.Dataset:
    """``(image (S, S, 3) float32 in [0, 1], label (1,) float32[, weight])`` batches.

    ``class_weights`` maps a class to its weight (see :func:`balanced_class_weights`); given, every
    example carries its class's weight as a third item (Keras sample weights).
    Training: see :func:`epoch_batches`; ``augment(image, seed) -> image``.
    """
    weights = tf.constant([1.0, 1.0] if class_weights is None
                          else [class_weights.get(0, 1.0), class_weights.get(1, 1.0)], tf.float32)

    def prepare(image, label, example_seed=None):
        image = _one_channel(image)
        if augment is not None and example_seed is not None:
            image = augment(image, example_seed)
        image = _three_channels(image)
        target = tf.cast(label, tf.float32)[tf.newaxis]
        if class_weights is None:
            return image, target
        return image, target, tf.gather(weights, tf.cast(label, tf.int32))

    return _batches((slices.images, slices.labels), prepare, training=training, batch_size=batch_size,
                    seed=seed, first_epoch=first_epoch, epochs=epochs)


def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """Class weights ``n / (2 * n_class)`` (scikit-learn's "balanced"), so both classes weigh the
    same in the loss; a class that is absent gets weight 1."""
    labels = np.asarray(labels).astype(int)
    n = labels.size
    return {c: (float(n / (2.0 * np.sum(labels == c))) if np.any(labels == c) else 1.0) for c in (0, 1)}
