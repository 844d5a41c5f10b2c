"""One CT study end to end: lungs, slice probabilities, fine maps, case decision, Corona Score.

    python -m radlogics_repro.analyze input=PATH [output_dir=analysis] [lung_model=...] [classifier_model=...]
    python -m radlogics_repro.analyze input=PATH analysis.case_threshold=0.2 analysis.engine=tf-keras-vis
    python -m radlogics_repro.analyze input=MANIFEST shard=i/n      # machine i of n, then:
    python -m radlogics_repro.analyze merge=true output_dir=...     # summary.csv of all shards

``PATH`` is a DICOM folder, a DICOM file, a NIfTI file, a folder of studies (its sub-folders and NIfTI
files) or a manifest CSV (``case_id, image`` and optionally ``patient_id, day``). Without model paths
the newest finished training runs under ``runs/`` are used.

Steps of :func:`analyze_study` (METHOD.md sections 4-6):

1. lung segmentation with the U-Net (:func:`radlogics_repro.lung_segmentation.segment_lungs`, right
   and left labelled); slices containing lung are those with >= ``min_lung_area_mm2`` of lung (the
   classifier's own training setting, from its ``model.json``);
2. for every lung slice, the classifier's input (square lung crop, as in training) and its
   probability (forward passes only); a slice is positive when its probability reaches the
   classifier's stored operating threshold (``slice_threshold`` overrides); the Grad-CAM fine maps
   are computed for the positive slices only, from the activations the classification pass kept at
   the lowest Grad-CAM layer (:func:`classify_and_map_slices`); each layer's map is min-max scaled
   per slice (``map_scale="per_slice"``, METHOD.md) or, with ``map_scale="fixed"``, the logit's map
   divided by one scale per layer stored with the classifier and clipped to [0, 1]
   (:func:`fine_map_scales`);
3. case decision: positive slices / lung slices >= ``case_threshold`` (stored with the classifier,
   tuned on validation cases; the config may override) -> "suspected COVID-19";
4. fine maps of the positive slices are mapped back into the slices' own pixels (with
   ``map_within_lung``, set to 0 outside the segmented lung); the Corona Score is ``sum over
   positive slices and their pixels of map (0..1) x pixel area (mm^2) x slice spacing (mm) / 1000``
   cm^3, exactly METHOD.md section 6;
5. infection mask: fine map >= ``map_threshold`` inside the lung -> 3D Gaussian blur of that binary
   mask (sigma ``blur_sigma_mm`` in mm, per axis in voxels) -> >= 0.5, kept only where the tissue is
   denser than aerated lung (HU >= ``ggo_hu[0]``); split by HU: ground-glass opacity
   ``ggo_hu = [-750, -300)`` and consolidation ``consolidation_hu = [-300, 100]`` HU (denser voxels
   inside the map, vessels and bone, are left out);
6. volumes: lung (mL, right/left), infection (cm^3, GGO/consolidation), % of the lung involved.

Outputs per study (written into a temporary folder, moved into place when complete): report.json
(schema :data:`REPORT_SCHEMA_VERSION`), slices.csv, lung_mask.nii.gz, infection_map.nii.gz (fine map,
uint8 with scale 1/255: readers show 0..1),
infection_mask.nii.gz (1 GGO, 2 consolidation), overlay PNGs of the most involved slices,
overview_3d.png and a self-contained report.html. Nothing identifies the patient: the case id is
the manifest's (pseudonymous) id or a hash of the study UID.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from radlogics_repro import (
    RESEARCH_USE_NOTICE,
    __version__,
    atomic,
    data,
    io,
    localize,
    preprocess,
    provenance,
)
from radlogics_repro.cli import UserError
from radlogics_repro.lung_segmentation import lung_volumes_ml, segment_lungs

log = logging.getLogger(__name__)

REPORT_SCHEMA = "radlogics_repro.study_report"
REPORT_SCHEMA_VERSION = 1
CALIBRATE_COMMAND = "python -m radlogics_repro.calibrate_maps classifier_run=runs/classifier/<run>"
TRAIN_COMMANDS = ("python -m radlogics_repro.train +experiment=lung_unet",
                  "python -m radlogics_repro.train +experiment=classifier")


class AnalysisError(UserError):
    """Analysis cannot run: no trained model, an output folder that exists, a bad manifest, ..."""


# =============================================================================================
# Models and settings
# =============================================================================================


@dataclass
class AnalysisModels:
    """The two trained networks and their model cards (``model.json`` beside each ``.keras``)."""

    lung_unet: object
    classifier: object
    lung_card: dict
    classifier_card: dict
    lung_path: str
    classifier_path: str
    precision: str = "model"  # the precision the networks run at (after resolving ``auto``)


def latest_run_model(runs_dir: str | os.PathLike, task: str) -> Path:
    """The ``model.keras`` of the newest finished run of ``task`` under ``runs_dir``."""
    finished = sorted(Path(runs_dir).glob(f"{task}/*/metrics.json"), key=lambda p: p.parent.name)
    if not finished:
        raise AnalysisError(
            f"{Path(runs_dir) / task}: no trained {task} model found; train one first with "
            f"`{TRAIN_COMMANDS[0] if task == 'lung_unet' else TRAIN_COMMANDS[1]}` "
            f"(or pass {'lung_model' if task == 'lung_unet' else 'classifier_model'}=PATH)"
        )
    return finished[-1].parent / "model.keras"


def load_analysis_models(lung_model: str | None, classifier_model: str | None,
                         runs_dir: str | os.PathLike = "runs", precision: str = "model") -> AnalysisModels:
    """Load both models (newest finished runs when a path is None), in Keras safe mode.

    ``precision``: ``model`` runs each network at the precision it was trained with; ``float32``
    or ``mixed_bfloat16`` rebuilds both at that precision (:func:`models.with_compute_precision`);
    ``auto`` is bfloat16 on a CPU-only machine with native bfloat16, else ``model``. Both are run
    as inference copies with their BatchNormalization folded into the convolutions
    (:func:`radlogics_repro.models.fold_batchnorm`: the same function; ResNet-50 1.6x faster in
    bfloat16, results/bench.md).
    """
    from radlogics_repro import models

    lung_path = Path(lung_model) if lung_model else latest_run_model(runs_dir, "lung_unet")
    cls_path = Path(classifier_model) if classifier_model else latest_run_model(runs_dir, "classifier")
    lung_unet, classifier = models.load_model(lung_path), models.load_model(cls_path)
    if precision not in models.PRECISION_CHOICES:
        raise AnalysisError(f"analysis.precision={precision!r}: use one of "
                            + ", ".join(models.PRECISION_CHOICES))
    precision = models.resolve_precision(precision)
    if precision != "model":
        log.info("running both networks at %s", precision)
        lung_unet = models.with_compute_precision(lung_unet, precision)
        classifier = models.with_compute_precision(classifier, precision)
    lung_unet, classifier = models.fold_batchnorm(lung_unet), models.fold_batchnorm(classifier)
    return AnalysisModels(
        lung_unet=lung_unet, classifier=classifier,
        lung_card=_model_card(lung_path), classifier_card=_model_card(cls_path),
        lung_path=str(lung_path), classifier_path=str(cls_path), precision=precision,
    )


def _model_card(model_path: Path) -> dict:
    card = model_path.with_name("model.json")
    if not card.exists():
        log.warning("%s: no model.json beside the model; using default settings", model_path)
        return {}
    return json.loads(card.read_text())


@dataclass(frozen=True)
class AnalysisSettings:
    """Plain settings of :func:`analyze_study` (None: take the classifier card's value)."""

    slice_threshold: float | None = None
    case_threshold: float | None = None
    default_case_threshold: float = 0.1
    map_threshold: float = 0.4
    blur_sigma_mm: float = 2.0
    ggo_hu: tuple[float, float] = (-750.0, -300.0)
    consolidation_hu: tuple[float, float] = (-300.0, 100.0)
    engine: str = "fused"
    batch_size: int = 8
    n_overlays: int = 3
    precision: str = "auto"
    skip_lung_free_slices: bool = True
    lung_slice_step_mm: float | None = 2.5  # results/analyze_speed_options.md, lung_dice_slice_step.md
    gradcam_layers: tuple[str, ...] = localize.GRADCAM_LAYERS
    map_within_lung: bool = False
    map_scale: str = "fixed"  # logit Grad-CAM on the classifier card's gradcam_scales, or "per_slice"


# =============================================================================================
# The analysis
# =============================================================================================


@dataclass
class StudyReport:
    """Everything :func:`analyze_study` finds in one study.

    Arrays are in the study's canonical ``(z, y, x)`` grid: ``lung_labels`` uint8 (1 right, 2 left),
    ``fine_map`` float16 in [0, 1] (0 outside positive slices), ``infection_labels`` uint8 (1 GGO,
    2 consolidation). ``slices`` has one row per slice: z, lung, probability, positive, map sum.
    """

    case_id: str
    lung_labels: np.ndarray
    fine_map: np.ndarray
    infection_labels: np.ndarray
    slices: pd.DataFrame
    summary: dict
    timings_s: dict = field(default_factory=dict)


def case_id_for(study: io.Study) -> str:
    """A pseudonymous, stable id: a hash of the (already hashed) study/series UIDs or the HU data."""
    meta = study.metadata
    key = f"{meta.get('study_uid_hash', '')}/{meta.get('series_uid_hash', '')}"
    if key == "/":
        key = hashlib.sha256(np.ascontiguousarray(study.hu[:: max(1, study.hu.shape[0] // 8)])
                             .tobytes()).hexdigest()
    return "case-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def lung_slice_indices(study: io.Study, lung_labels: np.ndarray, card: dict) -> np.ndarray:
    """Indices of the slices with at least the classifier's ``min_lung_area_mm2`` of lung."""
    min_lung = card.get("min_lung_area_mm2") or preprocess.DEFAULT_MIN_LUNG_AREA_MM2
    return np.flatnonzero(preprocess.slices_with_lung(lung_labels, study.pixel_area_mm2, min_lung))


def classifier_crops(study: io.Study, lung_labels: np.ndarray, z: np.ndarray, model, card: dict
                     ) -> tuple[np.ndarray, list]:
    """The classifier's three-channel inputs for slices ``z`` (as in training) and their crop boxes.

    Returns:
        float32 ``(n, S, S, 3)`` in [0, 1] and the n boxes (slice pixels).
    """
    crops, boxes = data.classifier_inputs_from_study(
        study.hu, lung_labels, tuple(study.spacing[1:]), z, size=int(model.input_shape[1]),
        input_mode=card.get("input_mode") or "lung_crop",
        margin_mm=card.get("crop_margin_mm") or preprocess.DEFAULT_CROP_MARGIN_MM)
    return np.repeat(crops[..., None], 3, axis=-1), boxes


def classify_and_map_slices(study: io.Study, lung_labels: np.ndarray, z: np.ndarray,
                            models: AnalysisModels, settings: AnalysisSettings, slice_threshold: float
                            ) -> tuple[np.ndarray, list, np.ndarray, dict[str, float]]:
    """Classifier probability of every slice in ``z`` and Grad-CAM fine maps of the positive ones
    (probability >= ``slice_threshold``), batch by batch.

    Only the positive slices need a map (METHOD.md section 4). With the ``fused`` engine each batch
    goes once through the classifier, which keeps the activation at the lowest Grad-CAM layer; the
    positives' maps then come from the network above that layer alone
    (:func:`radlogics_repro.localize.gradcam_maps_from_cut`). The ``tf-keras-vis`` engine runs its
    own passes on the positives' crops. With ``map_scale="fixed"`` the maps are the logit's Grad-CAM
    on the classifier's stored per-layer scales (:func:`fine_map_scales`).

    Returns:
        float32 ``(n,)`` probabilities, the n crop boxes (slice pixels), float32
        ``(n_positive, S, S)`` fine maps in [0, 1] (the positives in ``z`` order), and the seconds
        spent ``{"classification": ..., "gradcam": ...}``.
    """
    size = int(models.classifier.input_shape[1])
    probabilities, boxes, maps = [np.zeros(0, np.float32)], [], [np.zeros((0, size, size), np.float32)]
    seconds = {"classification": 0.0, "gradcam": 0.0}
    fused = settings.engine == "fused"
    scales = fine_map_scales(settings, models.classifier_card)
    score = "probability" if scales is None else "logit"
    for start in range(0, len(z), settings.batch_size):
        clock = time.perf_counter()
        crops, chunk_boxes = classifier_crops(study, lung_labels, z[start:start + settings.batch_size],
                                              models.classifier, models.classifier_card)
        if fused:
            chunk_p, cut = localize.classify_keeping_cut(models.classifier, crops, settings.gradcam_layers)
        else:
            chunk_p = np.asarray(models.classifier.predict_on_batch(crops), np.float32)[:, 0]
        positive = chunk_p >= slice_threshold
        probabilities.append(chunk_p)
        boxes.extend(chunk_boxes)
        now = time.perf_counter()
        seconds["classification"] += now - clock
        if positive.any():
            if fused:
                result = localize.gradcam_maps_from_cut(models.classifier, cut, (size, size),
                                                        settings.gradcam_layers, rows=positive,
                                                        score=score, scales=scales)
            else:
                result = localize.gradcam_maps(models.classifier, crops[positive],
                                               layers=settings.gradcam_layers, engine=settings.engine,
                                               batch_size=settings.batch_size)
            maps.append(result.fine.astype(np.float32))
        seconds["gradcam"] += time.perf_counter() - now
    return np.concatenate(probabilities), boxes, np.concatenate(maps), seconds


def fine_map_scales(settings: AnalysisSettings, classifier_card: dict) -> dict[str, float] | None:
    """The fixed Grad-CAM map scales (layer -> raw logit Grad-CAM units) for
    ``settings.map_scale == "fixed"``, from the classifier card's ``gradcam_scales`` (written by
    training); None for ``"per_slice"`` (each positive slice's maps min-max scaled, METHOD.md)."""
    if settings.map_scale == "per_slice":
        return None
    if settings.map_scale != "fixed":
        raise AnalysisError(f"analysis.map_scale={settings.map_scale!r}: expected per_slice or fixed")
    if settings.engine != "fused":
        raise AnalysisError("analysis.map_scale=fixed needs analysis.engine=fused (the logit's Grad-CAM)")
    stored = (classifier_card.get("gradcam_scales") or {}).get("layers") or {}
    missing = [name for name in settings.gradcam_layers if name not in stored]
    if missing:
        raise AnalysisError(
            f"the classifier's model.json has no fixed Grad-CAM map scale for {', '.join(missing)}: "
            f"add them with `{CALIBRATE_COMMAND}`, or set analysis.map_scale=per_slice")
    return {name: float(stored[name]) for name in settings.gradcam_layers}


def corona_score_cm3(fine_map: np.ndarray, positive: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Corona Score: sum over positive slices and their pixels of map value x pixel area (mm^2) x
    slice spacing (mm), / 1000 -> cm^3.

    Args:
        fine_map: ``(Z, H, W)`` in [0, 1], in the slices' own pixels.
        positive: bool ``(Z,)`` slices called positive.
        spacing_mm: (z, y, x) mm.
    """
    pixel_area = float(spacing_mm[1]) * float(spacing_mm[2])
    mass = float(fine_map[np.asarray(positive, bool)].sum(dtype=np.float64))
    return mass * pixel_area * float(spacing_mm[0]) / 1000.0


def corona_score_from_slice_sums(map_sum: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """:func:`corona_score_cm3` from each slice's map sum ``(Z,)`` (0 on slices not positive),
    summed in float64 as the maps are pasted, before they are stored at half precision."""
    pixel_area = float(spacing_mm[1]) * float(spacing_mm[2])
    return float(np.sum(map_sum, dtype=np.float64)) * pixel_area * float(spacing_mm[0]) / 1000.0


def infection_labels_from_map(fine_map: np.ndarray, hu: np.ndarray, lung: np.ndarray,
                              spacing_mm: Sequence[float], settings: AnalysisSettings,
                              chunk: int = 32) -> np.ndarray:
    """Infection mask from the fine maps (see the module docstring, step 5): uint8, 1 GGO,
    2 consolidation.

    Runs in slabs of ``chunk`` slices, each read with the blur's reach of context slices on both
    sides, and in-plane on the lung's bounding box grown by the blur's reach (outside it the seed
    is 0, so the blur there is 0 too), so every work array covers one slab of the lung box; the
    result equals the whole-volume computation.
    """
    labels = np.zeros(hu.shape, np.uint8)
    positive = np.flatnonzero(np.asarray(fine_map).reshape(fine_map.shape[0], -1)
                              .max(axis=1) >= settings.map_threshold)
    if not len(positive):
        return labels
    sigma = [settings.blur_sigma_mm / float(s) for s in spacing_mm]
    reach = [int(np.ceil(4 * s)) + 1 for s in sigma]       # the Gaussian's truncation, in voxels
    ggo_lo, ggo_hi = settings.ggo_hu
    con_lo, con_hi = settings.consolidation_hu
    first, last = max(0, positive[0] - reach[0]), min(hu.shape[0], positive[-1] + 1 + reach[0])
    in_plane = np.asarray(lung[first:last]).any(axis=0)
    if not in_plane.any():
        return labels
    rows, cols = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
    ys = slice(max(0, rows[0] - reach[1]), min(hu.shape[1], rows[-1] + 1 + reach[1]))
    xs = slice(max(0, cols[0] - reach[2]), min(hu.shape[2], cols[-1] + 1 + reach[2]))
    for start in range(first, last, chunk):
        stop = min(start + chunk, last)
        lo, hi = max(0, start - reach[0]), min(hu.shape[0], stop + reach[0])
        seed = (fine_map[lo:hi, ys, xs] >= settings.map_threshold) & lung[lo:hi, ys, xs]
        blurred = ndimage.gaussian_filter(seed.astype(np.float32), sigma=sigma, truncate=4.0)
        region = (blurred[start - lo:stop - lo] >= 0.5) & lung[start:stop, ys, xs]
        slab_hu, slab = hu[start:stop, ys, xs], labels[start:stop, ys, xs]
        slab[region & (slab_hu >= ggo_lo) & (slab_hu < ggo_hi)] = 1
        slab[region & (slab_hu >= con_lo) & (slab_hu <= con_hi)] = 2
    return labels


def study_lungs(study: io.Study, models: AnalysisModels, settings: AnalysisSettings) -> np.ndarray:
    """Step 1: the U-Net's lungs, uint8 ``(Z, H, W)`` in the study's grid (1 right, 2 left)."""
    return segment_lungs(study, models.lung_unet, batch_size=settings.batch_size, label_sides=True,
                         input_size=int(models.lung_unet.input_shape[1]),
                         skip_lung_free_slices=settings.skip_lung_free_slices,
                         slice_step_mm=settings.lung_slice_step_mm)


def thresholds(settings: AnalysisSettings, classifier_card: dict) -> tuple[float, float]:
    """(slice threshold on the probability, case threshold on the positive-slice ratio): the
    settings' values, else the classifier card's, else 0.5 and ``settings.default_case_threshold``."""
    return (_first(settings.slice_threshold, classifier_card.get("operating_threshold"), 0.5),
            _first(settings.case_threshold, classifier_card.get("case_threshold"),
                   settings.default_case_threshold))


def decide_case(n_positive: int, n_lung: int, threshold: float) -> tuple[bool, float]:
    """Case decision: (positive slices / lung slices >= threshold, the ratio). No lung -> (False, 0)."""
    ratio = n_positive / n_lung if n_lung else 0.0
    return bool(n_lung and ratio >= threshold), ratio


def analyze_study(study: io.Study, models: AnalysisModels, settings: AnalysisSettings,
                  case_id: str | None = None) -> StudyReport:
    """Run the whole method on one study; see the module docstring."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    io.require_volume(study)
    lung_labels = study_lungs(study, models, settings)
    lap("lung_segmentation")

    z = lung_slice_indices(study, lung_labels, models.classifier_card)
    slice_threshold, case_threshold = thresholds(settings, models.classifier_card)
    probabilities, boxes, crop_maps, seconds = classify_and_map_slices(
        study, lung_labels, z, models, settings, slice_threshold)
    positive_lung = probabilities >= slice_threshold
    timings.update({name: round(value, 3) for name, value in seconds.items()})
    clock = time.perf_counter()

    height, width = study.hu.shape[1:]
    fine_map = np.zeros(study.hu.shape, np.float16)   # [0, 1]; half the memory of float32
    map_sum = np.zeros(study.hu.shape[0], np.float64)
    positive_boxes = [box for box, pos in zip(boxes, positive_lung, strict=True) if pos]
    for zi, crop_map, box in zip(z[positive_lung], crop_maps, positive_boxes, strict=True):
        in_slice = localize.fine_map_in_slice(crop_map, box, height, width)
        if settings.map_within_lung:
            in_slice = np.where(lung_labels[zi] > 0, in_slice, np.float32(0.0))
        fine_map[zi] = in_slice
        map_sum[zi] = in_slice.sum(dtype=np.float64)
    positive = np.zeros(study.hu.shape[0], bool)
    positive[z[positive_lung]] = True
    suspected, ratio = decide_case(int(positive.sum()), len(z), case_threshold)
    score = corona_score_from_slice_sums(map_sum, study.spacing)
    lap("decision_and_corona_score")

    lung = lung_labels > 0
    infection = infection_labels_from_map(fine_map, study.hu, lung, study.spacing, settings)
    lap("infection_mask")

    voxel_cm3 = study.voxel_volume_mm3 / 1000.0
    lung_ml = lung_volumes_ml(lung_labels, study.spacing)
    ggo = float(np.count_nonzero(infection == 1)) * voxel_cm3
    consolidation = float(np.count_nonzero(infection == 2)) * voxel_cm3
    slices = pd.DataFrame({
        "z": np.arange(study.hu.shape[0]),
        "lung_area_mm2": np.count_nonzero(lung.reshape(lung.shape[0], -1), axis=1)
        * study.pixel_area_mm2,
        "contains_lung": False, "probability": np.nan, "positive": positive,
        "map_sum": map_sum,
    })
    slices.loc[z, "contains_lung"] = True
    slices.loc[z, "probability"] = probabilities
    summary = {
        "decision": {"suspected_covid": suspected, "positive_slice_ratio": ratio,
                     "threshold": case_threshold, "positive_slices": int(positive.sum()),
                     "lung_slices": int(len(z)), "slice_threshold": slice_threshold},
        "corona_score_cm3": score,
        "volumes": {
            "lung_ml": lung_ml,
            "infection_cm3": {"total": ggo + consolidation, "ggo": ggo,
                              "consolidation": consolidation},
            "lung_involvement_percent": 100.0 * (ggo + consolidation) / lung_ml["total"]
            if lung_ml["total"] else 0.0,
        },
    }
    if not len(z):
        summary["warnings"] = ["no lung found: the study is probably not a chest CT (or the lung "
                               "model failed on it); decision and scores are not meaningful"]
        log.warning("%s: %s", case_id or "study", summary["warnings"][0])
    lap("volumes")
    return StudyReport(case_id or case_id_for(study), lung_labels, fine_map, infection, slices,
                       summary, timings)


def _first(*values):
    return next(v for v in values if v is not None)


# =============================================================================================
# Outputs
# =============================================================================================


def report_document(report: StudyReport, study: io.Study, models: AnalysisModels,
                    settings: AnalysisSettings) -> dict:
    """The report.json content (schema ``radlogics_repro.study_report`` version 1)."""
    meta = study.metadata
    return {
        "schema": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION,
        "notice": RESEARCH_USE_NOTICE, "case_id": report.case_id,
        "analysed_at": provenance.environment()["date"],
        **report.summary,
        "timings_s": report.timings_s,
        "input": {"kind": meta.get("source_kind"), "n_slices": int(study.hu.shape[0]),
                  "shape_zyx": list(study.hu.shape), "spacing_mm": [float(s) for s in study.spacing],
                  "warnings": [_without_input_path(w, study.source) for w in meta.get("warnings", [])]},
        "settings": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in settings.__dict__.items()},
        "provenance": {
            "radlogics_repro": __version__, "commit": provenance.git_commit(),
            "lung_model": {"file": Path(models.lung_path).name,
                           "init": models.lung_card.get("init"),
                           "commit": models.lung_card.get("commit")},
            "classifier_model": {"file": Path(models.classifier_path).name,
                                 "init": models.classifier_card.get("init"),
                                 "commit": models.classifier_card.get("commit"),
                                 "data": models.classifier_card.get("data"),
                                 "gradcam_scales": models.classifier_card.get("gradcam_scales")},
            "precision": models.precision,
        },
    }


def _without_input_path(message: str, source: str | None) -> str:
    """A reader warning with the input's path replaced by ``<input>``: hospital folder and file
    names often carry patient names, and report.json must not."""
    if source:
        for path in sorted({str(source), str(Path(source).parent), Path(source).name}, key=len,
                           reverse=True):
            if len(path) > 1:
                message = message.replace(path, "<input>")
    return message


def write_study_outputs(report: StudyReport, study: io.Study, models: AnalysisModels,
                        settings: AnalysisSettings, out_dir: str | os.PathLike,
                        overwrite: bool = False) -> Path:
    """Write every output of one study into ``out_dir`` (created whole, atomically)."""
    from radlogics_repro import report as figures

    with atomic.output_folder(out_dir, overwrite) as tmp:
        clock = time.perf_counter()
        io.save_mask(study, report.lung_labels, tmp / "lung_mask.nii.gz")
        io.save_unit_map(study, report.fine_map, tmp / "infection_map.nii.gz")
        io.save_mask(study, report.infection_labels, tmp / "infection_mask.nii.gz")
        report.slices.to_csv(tmp / "slices.csv", index=False, float_format="%.6g")
        images = {}
        # The overview is drawn at ~target_mm blocks anyway: give it every other pixel in-plane of
        # large slices, which keeps its bool masks at a quarter of the study's size. The lung is
        # passed as its labels (the overview draws nonzero voxels) and the infection as its two
        # kinds only (labels are 0..2, so ``> 0`` is their union): two bool volumes, not four.
        step = 2 if min(study.hu.shape[1:]) > 256 else 1
        lung_view = report.lung_labels[:, ::step, ::step]
        infection_view = report.infection_labels[:, ::step, ::step]
        spacing_view = (study.spacing[0], study.spacing[1] * step, study.spacing[2] * step)
        overview = figures.render_3d_overview(
            lung_view, None, spacing_view, tmp / "overview_3d.png",
            ggo_mask=infection_view == 1, consolidation_mask=infection_view == 2,
            title=report.case_id)
        images["3D overview: lungs and infection (GGO / consolidation)"] = overview
        for z in figures.most_involved_slices(report.slices["map_sum"].to_numpy(), settings.n_overlays):
            if report.slices["map_sum"].iloc[z] <= 0:
                continue
            path = figures.slice_overlay_png(
                study.hu[z], tmp / f"overlay_z{z:04d}.png", lung_mask=report.lung_labels[z] > 0,
                fine_map=report.fine_map[z].astype(np.float32), infection_mask=report.infection_labels[z] > 0,
                title=f"{report.case_id} slice {z}, p={report.slices['probability'].iloc[z]:.2f}")
            images[f"Slice {z}: fine localization map"] = path
        report.timings_s["outputs"] = round(time.perf_counter() - clock, 3)
        document = report_document(report, study, models, settings)
        (tmp / "report.json").write_text(json.dumps(document, indent=2, default=_json_default))
        figures.write_html_report(document, images, tmp / "report.html")
    return Path(out_dir)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


# =============================================================================================
# Many studies: discovery, batch run, longitudinal curves
# =============================================================================================


def discover_inputs(path: str | os.PathLike) -> pd.DataFrame:
    """The studies behind an ``input=`` path, as a frame with ``case_id, image`` (and the manifest's
    ``patient_id, day`` when given).

    A ``.csv`` is a manifest; a NIfTI or DICOM file is one study; a folder holding files is one
    DICOM study; a folder holding only sub-folders and/or NIfTI files is a batch, one study each.
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: input does not exist")
    if path.suffix.lower() == ".csv":
        frame = _read_analysis_manifest(path)
    elif path.is_file():
        frame = pd.DataFrame({"case_id": [None], "image": [str(path)]})
    else:
        entries = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")]
        niftis = [p for p in entries if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))]
        other_files = [p for p in entries if p.is_file() and p not in niftis]
        folders = [p for p in entries if p.is_dir()]
        if other_files or not (niftis or folders):
            frame = pd.DataFrame({"case_id": [None], "image": [str(path)]})
        else:
            frame = pd.DataFrame({"case_id": None, "image": [str(p) for p in folders + niftis]})
    return frame


def _read_analysis_manifest(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"case_id": str, "patient_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path}: not a readable CSV manifest ({err})") from None
    if frame.empty:
        raise AnalysisError(f"{path}: manifest has no rows")
    if "image" not in frame.columns:
        raise AnalysisError(f"{path}: manifest lacks the column 'image'")
    frame["image"] = [str((path.parent / str(p)).resolve()) for p in frame["image"]]
    if "case_id" not in frame.columns:
        frame["case_id"] = None
    return frame


def run_batch(inputs: pd.DataFrame, models: AnalysisModels, settings: AnalysisSettings,
              output_dir: str | os.PathLike, overwrite: bool = False, progress: bool = True,
              summary_name: str = "summary.csv") -> pd.DataFrame:
    """Analyse every study; a bad study is reported and skipped, a finished one is not redone.

    Returns:
        the summary table (one row per study: case id, status, decision, scores, volumes, error),
        also written as ``<output_dir>/<summary_name>``. A shard's summary (``summary_name`` other
        than ``summary.csv``) leaves the longitudinal curves to :func:`merge_shard_summaries`.
    """
    from tqdm import tqdm

    output_dir = Path(output_dir)
    rows = []
    for _, entry in tqdm(list(inputs.iterrows()), disable=not progress or len(inputs) < 2,
                         desc="studies", unit="study"):
        rows.append(_analyze_one(entry, models, settings, output_dir, overwrite))
    summary = pd.DataFrame(rows)
    sharded = summary_name != "summary.csv"
    if len(inputs) > 1 or "patient_id" in inputs.columns or sharded:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_csv_atomic(summary, output_dir / summary_name)
    if {"patient_id", "day"} <= set(inputs.columns) and not sharded:
        write_longitudinal_curves(summary, output_dir / "longitudinal")
    return summary


def _analyze_one(entry: pd.Series, models, settings, output_dir: Path, overwrite: bool) -> dict:
    row = {k: entry[k] for k in ("patient_id", "day") if k in entry.index}
    given_id = entry.get("case_id")
    try:
        study = io.load_study(entry["image"])
        case_id = given_id if isinstance(given_id, str) and given_id else case_id_for(study)
        row["case_id"] = case_id
        out = atomic.child_path(output_dir, case_id, "case_id")
        if (out / "report.json").exists() and not overwrite:
            document = json.loads((out / "report.json").read_text())
            row.update(_summary_row(document), status="done earlier")
            return row
        report = analyze_study(study, models, settings, case_id=case_id)
        write_study_outputs(report, study, models, settings, out, overwrite=overwrite)
        row.update(_summary_row(json.loads((out / "report.json").read_text())), status="ok")
    except (io.StudyReadError, AnalysisError, atomic.UnsafeNameError) as err:
        row.setdefault("case_id", given_id if isinstance(given_id, str) else "")
        row.update(status="error", error=" ".join(str(err).split()))
        log.error("skipped: %s", row["error"])
    except Exception as err:  # noqa: BLE001 -- one study's failure must not end the batch
        row.setdefault("case_id", given_id if isinstance(given_id, str) else "")
        row.update(status="error", error=f"{entry['image']}: {type(err).__name__}: "
                                         + " ".join(str(err).split()))
        log.exception("skipped after an unexpected error: %s", entry["image"])
    return row


def _summary_row(document: dict) -> dict:
    decision, volumes = document["decision"], document["volumes"]
    return {
        "suspected_covid": decision["suspected_covid"],
        "positive_slice_ratio": decision["positive_slice_ratio"],
        "corona_score_cm3": document["corona_score_cm3"],
        "lung_ml": volumes["lung_ml"]["total"],
        "infection_cm3": volumes["infection_cm3"]["total"],
        "lung_involvement_percent": volumes["lung_involvement_percent"],
        "seconds": sum(document["timings_s"].values()),
    }


def write_longitudinal_curves(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Corona Score over scan day per patient (CSV + PNG) for patients with >= 2 analysed scans."""
    from radlogics_repro import report as figures

    done = summary[summary["status"].isin(["ok", "done earlier"])]
    written = []
    for patient, scans in done.groupby("patient_id"):
        if len(scans) < 2:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        scans = scans.sort_values("day")
        table = scans[["day", "case_id", "corona_score_cm3", "infection_cm3", "lung_ml"]]
        name = atomic.check_plain_name(str(patient), "patient_id")
        _write_csv_atomic(table, folder / f"{name}.csv")
        written.append(figures.corona_curve_png(
            scans["day"].to_numpy(), scans["corona_score_cm3"].to_numpy(), folder / f"{name}.png",
            case_ids=list(scans["case_id"]), title=f"patient {patient}: Corona Score over time"))
    return written


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    atomic.write_text(path, frame.to_csv(index=False, float_format="%.6g"))


# =============================================================================================
# Command line
# =============================================================================================


def settings_from_config(cfg) -> AnalysisSettings:
    """The ``analysis`` config group (conf/analysis/) -> plain :class:`AnalysisSettings`."""
    return AnalysisSettings(
        slice_threshold=cfg.slice_threshold, case_threshold=cfg.case_threshold,
        map_threshold=float(cfg.map_threshold), blur_sigma_mm=float(cfg.blur_sigma_mm),
        ggo_hu=tuple(float(v) for v in cfg.ggo_hu),
        consolidation_hu=tuple(float(v) for v in cfg.consolidation_hu),
        engine=str(cfg.engine), batch_size=int(cfg.batch_size), n_overlays=int(cfg.n_overlays),
        precision=str(cfg.precision), skip_lung_free_slices=bool(cfg.skip_lung_free_slices),
        lung_slice_step_mm=None if cfg.lung_slice_step_mm is None else float(cfg.lung_slice_step_mm),
        gradcam_layers=tuple(str(v) for v in cfg.gradcam_layers),
        map_within_lung=bool(cfg.get("map_within_lung", False)),
        map_scale=str(cfg.get("map_scale", "fixed")))


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n: this machine's part of a batch split n ways."""
    try:
        index, count = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise AnalysisError(f"shard={shard!r}: expected i/n with integers, e.g. shard=0/4") from None
    if count < 1 or not 0 <= index < count:
        raise AnalysisError(f"shard={shard!r}: need 0 <= i < n, e.g. shard=0/4 ... shard=3/4")
    return index, count


def select_shard(inputs: pd.DataFrame, index: int, count: int) -> pd.DataFrame:
    """Every ``count``-th study starting at ``index`` (round robin over the sorted inputs), so the n
    shards of the same input are disjoint and together cover it."""
    return inputs.iloc[index::count].reset_index(drop=True)


def shard_summary_name(index: int, count: int) -> str:
    return f"summary.shard-{index}-of-{count}.csv"


def merge_shard_summaries(output_dir: str | os.PathLike) -> pd.DataFrame:
    """Join the shard summaries in ``output_dir`` into ``summary.csv`` (and the longitudinal curves
    when the inputs name patients and days). Refuses when a shard is missing or counts disagree."""
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob("summary.shard-*-of-*.csv"))
    if not parts:
        raise AnalysisError(f"{output_dir}: no shard summaries (summary.shard-<i>-of-<n>.csv) to merge")
    found = {}
    for part in parts:
        index, count = (int(v) for v in part.name[len("summary.shard-"):-len(".csv")].split("-of-"))
        found[(index, count)] = part
    counts = {count for _, count in found}
    if len(counts) != 1:
        raise AnalysisError(f"{output_dir}: shard summaries from different splits {sorted(counts)}; "
                            "remove the stale ones")
    count = counts.pop()
    missing = sorted(set(range(count)) - {index for index, _ in found})
    if missing:
        raise AnalysisError(f"{output_dir}: shard(s) {missing} of {count} have not finished; rerun "
                            f"them with shard=<i>/{count} before merging")
    summary = pd.concat([pd.read_csv(found[(i, count)], dtype={"case_id": str, "patient_id": str})
                         for i in range(count)], ignore_index=True)
    _write_csv_atomic(summary, output_dir / "summary.csv")
    if {"patient_id", "day"} <= set(summary.columns):
        write_longitudinal_curves(summary, output_dir / "longitudinal")
    return summary


def run(cfg) -> pd.DataFrame:
    """Analyse ``cfg.input`` (one study or many) into ``cfg.output_dir``; returns the summary."""
    from omegaconf import OmegaConf

    if cfg.merge:
        summary = merge_shard_summaries(cfg.output_dir)
        print(f"merged {len(summary)} studies into {Path(cfg.output_dir) / 'summary.csv'}")
        return summary
    if OmegaConf.is_missing(cfg, "input") or not cfg.input:
        raise AnalysisError("input: missing; usage: python -m radlogics_repro.analyze input=PATH "
                            "(a DICOM folder or file, a NIfTI file, a folder of studies or a manifest CSV)")
    inputs = discover_inputs(cfg.input)
    summary_name = "summary.csv"
    if cfg.shard is not None:
        index, count = parse_shard(cfg.shard)
        inputs = select_shard(inputs, index, count)
        summary_name = shard_summary_name(index, count)
        log.info("shard %d of %d: %d studies", index, count, len(inputs))
    settings = settings_from_config(cfg.analysis)
    models = load_analysis_models(cfg.lung_model, cfg.classifier_model, cfg.paths.runs_dir,
                                  precision=settings.precision)
    log.info("%s | %d stud%s | lung model %s | classifier %s", RESEARCH_USE_NOTICE, len(inputs),
             "y" if len(inputs) == 1 else "ies", models.lung_path, models.classifier_path)
    summary = run_batch(inputs, models, settings, cfg.output_dir, overwrite=bool(cfg.overwrite),
                        summary_name=summary_name)
    for _, row in summary.iterrows():
        if row["status"] == "error":
            print(f"error: {row['error']}")
        else:
            verdict = "suspected COVID-19" if row["suspected_covid"] else "not suspected"
            print(f"{row['case_id']}: {verdict} (positive slice ratio {row['positive_slice_ratio']:.2f}, "
                  f"Corona Score {row['corona_score_cm3']:.1f} cm^3) -> "
                  f"{Path(cfg.output_dir) / row['case_id']}")
    print(RESEARCH_USE_NOTICE)
    if len(inputs) == 1 and summary["status"].iloc[0] == "error":
        raise AnalysisError(summary["error"].iloc[0])
    return summary


def main() -> None:
    import hydra

    from radlogics_repro.cli import exit_on_user_error

    @hydra.main(version_base="1.3", config_path="../conf", config_name="analyze")
    def _main(cfg) -> None:
        from radlogics_repro.cli import ANALYZE_CONFIG_RULES, check_config

        with exit_on_user_error():
            check_config(cfg, ANALYZE_CONFIG_RULES)
            run(cfg)

    _main()


if __name__ == "__main__":
    from radlogics_repro.cli import check_overrides

    check_overrides("analyze")
    main()
