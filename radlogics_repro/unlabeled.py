"""Unlabeled CT slices for self-supervised pre-training, and their two-view input pipeline.

A *source* is one path:

* a dataset manifest (``manifest.csv``, e.g. the synthetic phantoms): the studies of the chosen
  splits (default train and val, so a test split stays unseen even without its labels);
* a NIfTI file (``.nii`` / ``.nii.gz``): one HU volume;
* a folder: searched recursively. Each folder holding DICOM files (``.dcm``, or no suffix and the
  DICOM preamble) is one DICOM series (HU);
  NIfTI files are volumes; ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` / ``.tif`` files are 8-bit
  display slices (already windowed; no HU). Other files (READMEs, licences) are ignored.

HU volumes are windowed to [-1000, 0] HU like the networks' inputs (``preprocess.window_hu``) and
one slice is kept every ``step_mm``; 8-bit images go through ``preprocess.gray_image_to_unit``.
Every slice is resized whole to ``size`` x ``size`` (no lung crop: the random-resized-crop views of
pre-training cut pieces out of it anyway). Labels, masks and patient data are never read.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from radlogics_repro import data, io, preprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _is_dicom(path: Path) -> bool:
    """A ``.dcm`` file, or a file without a suffix (PACS exports) with the DICOM preamble mark."""
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def expand_source(source: str | os.PathLike) -> list[tuple[str, Path]]:
    """The items of one source, as ``(kind, path)`` with kind ``manifest``, ``volume`` or ``image``,
    in sorted path order.

    Raises:
        DatasetError: the path does not exist, or a folder holds no CT volume or image.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise data.DatasetError(f"{path}: pre-training source not found")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return [("manifest", path)]
        if _is_nifti(path):
            return [("volume", path)]
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return [("image", path)]
        raise data.DatasetError(f"{path}: not a manifest .csv, NIfTI volume, image or folder")
    items: list[tuple[str, Path]] = []
    for folder, _, files in sorted(os.walk(path)):
        names = sorted(files)
        if any(_is_dicom(Path(folder) / n) for n in names):
            items.append(("volume", Path(folder)))
        for name in names:
            file = Path(folder) / name
            if _is_nifti(file):
                items.append(("volume", file))
            elif file.suffix.lower() in IMAGE_SUFFIXES:
                items.append(("image", file))
    if not items:
        raise data.DatasetError(f"{path}: no DICOM series, NIfTI volume or image file found")
    return items


def volume_slices(hu: np.ndarray, spacing_z_mm: float, *, size: int, step_mm: float) -> np.ndarray:
    """Windowed, resized slices of one HU volume, one every ``step_mm``.

    Args:
        hu: ``(z, y, x)`` Hounsfield units.
        spacing_z_mm: slice spacing, mm.

    Returns:
        float16 ``(n, size, size)`` in [0, 1].
    """
    keep = data.slice_indices(np.ones(hu.shape[0], bool), spacing_z_mm, step_mm)
    windowed = preprocess.window_hu(hu[keep])
    return preprocess.resize_images(windowed, size).numpy().clip(0, 1).astype(np.float16)


def _manifest_studies(manifest: Path, splits: Sequence[str]) -> list[str]:
    frame = data.read_manifest(manifest)
    if "split" in frame.columns and splits:
        frame = frame[frame["split"].isin(list(splits))]
    if frame.empty:
        raise data.DatasetError(f"{manifest}: no studies in split(s) {list(splits)}")
    return frame["image"].tolist()


def _items_slices(kind: str, path: Path, *, size: int, step_mm: float,
                  manifest_splits: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    if kind == "image":
        return [(str(path), data.read_display_image(path, size)[np.newaxis].astype(np.float16))]
    if kind == "volume":
        study = io.load_study(path)
        return [(str(path), volume_slices(study.hu, study.spacing[0], size=size, step_mm=step_mm))]
    out = []
    for image in _manifest_studies(path, manifest_splits):
        out += _items_slices("volume", Path(image), size=size, step_mm=step_mm,
                             manifest_splits=manifest_splits)
    return out


def load_unlabeled_slices(sources: Sequence[str | os.PathLike], *, size: int, step_mm: float,
                          manifest_splits: Sequence[str] = ("train", "val"),
                          max_slices_per_source: int | None = None) -> data.SliceSet:
    """Every slice of every source, for pre-training.

    Args:
        sources: paths, see the module docstring.
        size: side of the returned slices, pixels.
        step_mm: keep one slice every ``step_mm`` of a HU volume (0: all slices).
        manifest_splits: the splits of a manifest source that are used.
        max_slices_per_source: keep at most this many slices of one source, evenly spread (None: all),
            so one large source cannot drown the others.

    Returns:
        ``images`` float16 ``(N, size, size)`` in [0, 1]; ``case_ids`` the item each slice came from,
        ``patient_ids`` the source's index as text (see :func:`source_summary`); labels are all 0
        and there are no masks.

    Raises:
        DatasetError / StudyReadError: one line naming a missing or unreadable path.
    """
    if not sources:
        raise data.DatasetError("data.sources: no pre-training source given")
    parts = []
    for number, source in enumerate(sources):
        pieces = []
        for kind, path in expand_source(source):
            pieces += _items_slices(kind, path, size=size, step_mm=step_mm,
                                    manifest_splits=manifest_splits)
        names = np.concatenate([np.full(len(s), name) for name, s in pieces])
        images = np.concatenate([s for _, s in pieces])
        part = data.SliceSet(images, np.zeros((len(images), 0, 0), np.uint8),
                             np.zeros(len(images), np.uint8), names,
                             np.full(len(images), str(number)), np.full(len(images), -1))
        part = part.evenly_spaced(max_slices_per_source)
        log.info("pre-training source %s: %d item(s) found, %d slice(s) kept", source, len(pieces),
                 len(part))
        parts.append(part)
    return data.SliceSet.concatenate(parts, size)


def source_summary(slices: data.SliceSet, sources: Sequence[str | os.PathLike]) -> list[dict]:
    """Per source of :func:`load_unlabeled_slices`: its path, how many items (volumes, images) gave
    slices and how many slices it gave."""
    out = []
    for number, source in enumerate(sources):
        mine = slices.patient_ids == str(number)
        out.append({"source": str(source), "items": int(np.unique(slices.case_ids[mine]).size),
                    "slices": int(mine.sum())})
    return out


def sources_fingerprint(sources: Sequence[str | os.PathLike]) -> str:
    """A hash of every file under the sources (path, size, mtime): the cache key of their slices."""
    digest = hashlib.sha256()
    for source in sources:
        path = Path(source).expanduser()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            stat = file.stat()
            digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def contrastive_dataset(images: np.ndarray, *, view: Callable, batch_size: int, seed: int,
                        first_epoch: int = 0, epochs: int = 1) -> tf.data.Dataset:
    """Batches of two random views per slice, for a contrastive loss.

    Args:
        images: float16 ``(N, S, S)`` in [0, 1].
        view: ``(image (S, S, 3), seed) -> view (S, S, 3)``, e.g.
            :func:`radlogics_repro.augment.contrastive_view_augmenter`.
        batch_size: slices per batch (a batch holds ``2 * batch_size`` views).

    Returns:
        ``(views, zeros)`` batches: views float32 ``(2B, S, S, 3)`` with the two views of slice i at
        rows ``2i`` and ``2i + 1``; zeros ``(2B,)`` stand in for targets. The stream is a function of
        (seed, epoch), as in :func:`radlogics_repro.data.epoch_batches`, so a resumed run sees the
        batches the uninterrupted run would have seen.
    """
    size = images.shape[1]

    def two_views(image, example_seed):
        image = tf.repeat(tf.cast(image, tf.float32)[..., tf.newaxis], 3, axis=-1)
        first, second = tf.unstack(tf.random.experimental.stateless_split(example_seed, num=2))
        return tf.stack([view(image, first), view(image, second)])

    def flatten(pairs):
        views = tf.reshape(pairs, (-1, size, size, 3))
        return views, tf.zeros(tf.shape(views)[:1])

    batches = data.epoch_batches((images,), two_views, batch_size=batch_size, seed=seed,
                                 first_epoch=first_epoch, epochs=epochs)
    return batches.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)
