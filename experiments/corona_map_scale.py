"""The Corona Score from Grad-CAM maps on one fixed scale per model instead of each slice's own
min-max: agreement with the reference lesion volume.

    python experiments/corona_map_scale.py --lung-run runs/lung_unet/<run> \
        --classifier-run runs/classifier/<run> \
        --data val=~/.cache/radlogics_repro/synthetic/large192/manifest.csv:val \
        --data holdout=~/.cache/radlogics_repro/synthetic/holdout/manifest.csv:test \
        --choose-on val --out results/corona_map_scale.md

Why: the analysis scales each positive slice's raw Grad-CAM map to [0, 1] by its own min and max
(METHOD.md section 4), so every positive slice brings a map that peaks at 1 whatever the size of its
lesion: a 15 cm^3 lesion scored 290 cm^3 and the largest ones saturate (Pearson r 0.841, Spearman
0.951 on the held-out scans, results/paper_tables.md). On one scale for all slices a weak finding
keeps a weak map.

Every scan goes once through the analysis's own steps (:func:`radlogics_repro.analyze.study_lungs`,
the lung slices, the classifier's probabilities and its stored operating point); the positive slices
get the Grad-CAM of the classifier's *logit* (``localize`` ``score="logit"``: the probability's
gradient is the logit's times p (1 - p), which shrinks the maps of confident slices and zeroes them
once p rounds to 1). Then, per map variant:

* ``per-slice min-max``: the analysis now. Its probability maps are the logit maps times p (1 - p),
  min-max scaled per slice (so the factor cancels unless p (1 - p) is 0 in float32).
* ``fixed q``: each layer's raw logit map divided by that layer's scale and clipped to [0, 1]; the
  scale is the ``q`` quantile of the layer's per-slice maxima over the positive slices of the
  ``--choose-on`` dataset (the same scales serve every dataset).

The layers' maps are then fused as always (resized to S x S and multiplied), mapped into the slice
(:func:`radlogics_repro.localize.fine_map_in_slice`) and summed over the positive slices in cm^3,
exactly :func:`radlogics_repro.analyze.corona_score_cm3`. Per dataset and variant: Pearson r,
Spearman rho and Bland-Altman bias against the phantom's lesion volume, and the Pearson r over the
positive slices of the slice's map area (mm^2) against its lesion area (mm^2). The quantile is
chosen on ``--choose-on`` by scan-level Pearson r; the other datasets report. Per-scan values go to
a CSV beside the table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lung_dice import (  # noqa: E402
    dataset_rows,
    named_path,
    produced_by,
    refuse_existing,
    script_start,
    write_result,
)
from paper_tables import model_file, model_runs  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, analyze, io, localize  # noqa: E402
from radlogics_repro.evaluate import metrics as M  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402

PER_SLICE = "per-slice min-max"
QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class ScanMaps:
    """One scan's positive slices: raw logit Grad-CAM maps per layer ``(n, h, w)``, probabilities
    ``(n,)``, crop boxes, lesion area per slice (mm^2), and the scan's geometry."""

    case_id: str
    patient_id: str
    reference_cm3: float
    raw: dict[str, np.ndarray]
    probabilities: np.ndarray
    boxes: list
    lesion_mm2: np.ndarray
    shape: tuple[int, int]
    spacing: tuple[float, float, float]


def scan_maps(row: pd.Series, models: analyze.AnalysisModels, settings: analyze.AnalysisSettings
              ) -> ScanMaps:
    """The analysis's positive slices of one manifest row and their raw logit Grad-CAM maps."""
    study = io.load_study(row["image"])
    lesion = io.load_mask(row["lesion_mask"], study) > 0
    lungs = analyze.study_lungs(study, models, settings)
    z = analyze.lung_slice_indices(study, lungs, models.classifier_card)
    slice_threshold, _ = analyze.thresholds(settings, models.classifier_card)
    size = int(models.classifier.input_shape[1])
    layers = settings.gradcam_layers
    raw, probabilities, boxes, kept = {name: [] for name in layers}, [], [], []
    for start in range(0, len(z), settings.batch_size):
        chunk = z[start:start + settings.batch_size]
        crops, chunk_boxes = analyze.classifier_crops(study, lungs, chunk, models.classifier,
                                                      models.classifier_card)
        p, cut = localize.classify_keeping_cut(models.classifier, crops, layers)
        positive = p >= slice_threshold
        if not positive.any():
            continue
        result = localize.gradcam_maps_from_cut(models.classifier, cut, (size, size), layers,
                                                rows=positive, score="logit")
        for name in layers:
            raw[name].append(result.raw[name])
        probabilities.append(p[positive])
        boxes += [box for box, pos in zip(chunk_boxes, positive, strict=True) if pos]
        kept.append(chunk[positive])
    kept = np.concatenate(kept) if kept else np.zeros(0, int)
    lesion_mm2 = np.count_nonzero(lesion[kept], axis=(1, 2)) * study.pixel_area_mm2
    return ScanMaps(
        case_id=str(row["case_id"]), patient_id=str(row["patient_id"]),
        reference_cm3=float(lesion.sum()) * study.voxel_volume_mm3 / 1000.0,
        raw={name: np.concatenate(m) if m else np.zeros((0, 1, 1), np.float32) for name, m in raw.items()},
        probabilities=np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32),
        boxes=boxes, lesion_mm2=lesion_mm2, shape=tuple(study.hu.shape[1:]),
        spacing=tuple(float(s) for s in study.spacing))


def layer_scales(scans: list[ScanMaps], q: float) -> dict[str, float]:
    """Each layer's ``q`` quantile of the per-slice maxima of its raw logit maps (positive slices)."""
    return localize.scales_from_maxima(
        {name: np.concatenate([s.raw[name].max(axis=(1, 2), initial=0.0) for s in scans])
         for name in scans[0].raw}, q)


def scaled_maps(scan: ScanMaps, scales: dict[str, float] | None) -> dict[str, np.ndarray]:
    """Each layer's maps in [0, 1]: fixed ``scales`` (:func:`radlogics_repro.localize.scale_maps`)
    or, for None, the analysis's per-slice min-max of the probability maps (logit maps times
    p (1 - p) in float32)."""
    if scales is None:
        p = scan.probabilities.astype(np.float32)
        slope = (p * (np.float32(1) - p))[:, None, None]
        return {name: localize.normalize_maps(m * slope) for name, m in scan.raw.items()}
    return {name: localize.scale_maps(m, scales[name]) for name, m in scan.raw.items()}


def slice_map_mm2(scan: ScanMaps, scales: dict[str, float] | None, size: int) -> np.ndarray:
    """Each positive slice's fine map summed over its own pixels, times the pixel area (mm^2)."""
    maps = scaled_maps(scan, scales)
    fine = localize.fuse_maps([maps[name] for name in scan.raw], (size, size))
    pixel_mm2 = scan.spacing[1] * scan.spacing[2]
    return np.array([localize.fine_map_in_slice(m, box, *scan.shape).sum(dtype=np.float64) * pixel_mm2
                     for m, box in zip(fine, scan.boxes, strict=True)], dtype=np.float64)


def variant_cases(scans: list[ScanMaps], variant: str, scales: dict[str, float] | None, size: int
                  ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Per scan: the Corona Score (cm^3) of one variant against the reference; and the positive
    slices' map areas and lesion areas (mm^2), pooled."""
    rows, areas = [], []
    for scan in scans:
        area = slice_map_mm2(scan, scales, size)
        areas.append(area)
        rows.append({"case_id": scan.case_id, "patient_id": scan.patient_id, "map": variant,
                     "reference_lesion_cm3": scan.reference_cm3,
                     "corona_score_cm3": float(area.sum()) * scan.spacing[0] / 1000.0,
                     "positive_slices": len(area)})
    lesion = np.concatenate([s.lesion_mm2 for s in scans])
    return pd.DataFrame(rows), np.concatenate(areas), lesion


def agreement_row(dataset: str, variant: str, cases: pd.DataFrame, area: np.ndarray,
                  lesion: np.ndarray) -> dict:
    """One table row: scan-level Pearson, Spearman, Bland-Altman (cm^3); slice-level Pearson."""
    a = M.agreement(cases["corona_score_cm3"].to_numpy(float),
                    cases["reference_lesion_cm3"].to_numpy(float))
    slice_r = float(np.corrcoef(area, lesion)[0, 1]) if len(area) > 1 and area.std() and lesion.std() \
        else float("nan")
    return {"data": dataset, "map": variant, "Pearson r": a["pearson_r"],
            "Spearman rho": a["spearman_rho"], "bias cm^3": a["bias"],
            "95% limits cm^3": f"[{a['loa_low']:.1f}, {a['loa_high']:.1f}]",
            "slice r (map vs lesion mm^2)": slice_r, "scans": len(cases),
            "positive slices": len(area)}


def variants(chosen_on: list[ScanMaps], quantiles) -> dict[str, dict[str, float] | None]:
    """Variant name -> its layer scales (None: per-slice min-max)."""
    return {PER_SLICE: None, **{f"fixed q={q:g}": layer_scales(chosen_on, q) for q in quantiles}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lung-run", type=Path, help="lung U-Net run folder (default: newest)")
    parser.add_argument("--classifier-run", type=Path, help="classifier run folder (default: newest)")
    parser.add_argument("--data", action="append", required=True,
                        type=lambda t: named_path(t, "--data"), help="NAME=MANIFEST[:SPLIT]")
    parser.add_argument("--choose-on", required=True, help="the --data NAME whose scans set the "
                        "scales and choose the quantile (a validation split)")
    parser.add_argument("--quantiles", type=float, nargs="+", default=list(QUANTILES))
    parser.add_argument("--max-scans", type=int, help="at most this many scans per dataset")
    parser.add_argument("--out", type=Path, default=Path("results/corona_map_scale.md"))
    args = parser.parse_args(argv)
    names = [name for name, _ in args.data]
    if args.choose_on not in names:
        parser.error(f"--choose-on {args.choose_on!r} is not a --data name ({', '.join(names)})")
    if refuse_existing(args.out):
        return 2
    started = script_start()
    lung_dir, classifier_dir = model_runs(args.lung_run, args.classifier_run)
    settings = analyze.AnalysisSettings()
    models = analyze.load_analysis_models(str(lung_dir / "model.keras"),
                                          str(classifier_dir / "model.keras"),
                                          precision=settings.precision)
    size = int(models.classifier.input_shape[1])
    scans = {}
    for name, spec in args.data:
        rows, manifest, split = dataset_rows(spec, args.max_scans)
        scans[name] = [scan_maps(row, models, settings) for _, row in rows.iterrows()]
        print(f"{name}: {len(scans[name])} scans from {manifest}:{split}", flush=True)
    scales = variants(scans[args.choose_on], args.quantiles)
    table, per_case = [], []
    for name in names:
        for variant, variant_scales in scales.items():
            cases, area, lesion = variant_cases(scans[name], variant, variant_scales, size)
            table.append(agreement_row(name, variant, cases, area, lesion))
            per_case.append(cases.assign(data=name))
    table = pd.DataFrame(table)
    fixed = table[(table["data"] == args.choose_on) & (table["map"] != PER_SLICE)]["Pearson r"].dropna()
    best = table.loc[fixed.idxmax(), "map"] if len(fixed) else "none (Pearson r undefined)"
    saturated = sum(int((s.probabilities.astype(np.float32) * (1 - s.probabilities.astype(np.float32))
                         == 0).sum()) for group in scans.values() for s in group)
    scale_lines = [f"- {variant}: " + ", ".join(f"{layer} {value:.4g}" for layer, value in v.items())
                   for variant, v in scales.items() if v is not None]
    text = "\n\n".join([
        "# The Corona Score with Grad-CAM maps on a fixed scale",
        f"_{RESEARCH_USE_NOTICE}_",
        produced_by("corona_map_scale.py", argv, started),
        f"Models: lung `{model_file(lung_dir)}`, classifier `{model_file(classifier_dir)}`. Every "
        "variant comes from the same analysis of each scan (same lungs, same positive slices); only "
        "the scaling of the Grad-CAM maps differs. Reference: the phantom's lesion mask volume. "
        f"Scales (raw logit Grad-CAM units) from the positive slices of `{args.choose_on}`:",
        "\n".join(scale_lines),
        frame_markdown(table),
        f"Chosen on `{args.choose_on}` by scan-level Pearson r: **{best}**. Positive slices whose "
        f"probability rounds to 1 in float32 (their per-slice min-max map is all zero): {saturated}.",
    ]) + "\n"
    write_result(args.out, text, per_case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
