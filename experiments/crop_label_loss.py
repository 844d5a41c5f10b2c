"""How often does the classifier's training augmentation cut the lesion out of an 'abnormal' slice?
results/<name>.md.

    python experiments/crop_label_loss.py \
        [--manifest ~/.cache/radlogics_repro/synthetic/large/manifest.csv] [--split train] \
        [--draws 20] [--min-scale 0.85 --min-scale 0.95] [--out results/crop_label_loss.md]

A slice is labelled abnormal from its whole lesion area (>= ``min_lesion_area_mm2``, 25 mm^2 in the
preset). The classifier pipeline then rotates (up to 15 degrees, zeros brought in), flips, and
crops a random window of ``min_scale..1`` of each side of the lung crop (``augment.random_crop``),
with the label unchanged. COVID-like lesions sit at the lung's periphery, next to the crop's edge, so
a window can leave less lesion in view than the label threshold: the network is then taught
"abnormal" on an image whose visible lesion is below the threshold, or absent.

For every abnormal slice of one split (the slices the classifier preset trains on: one every
``--step-mm``, lung crops with ``--margin-mm``), this script draws ``--draws`` augmentations: the
rotation with :func:`radlogics_repro.augment.random_rotation` on the lesion mask, then the crop window
drawn as ``random_crop`` draws it (side ``round(s * 224)`` px, ``s ~ U(min_scale, 1)``, offset
uniform). It counts the lesion area left inside the window (mm^2, in the slice's own pixel size) and
reports the share of draws left below the label threshold, and with no lesion at all, by the slice's
lesion area. The label threshold comes from the data config; nothing is trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402
from lung_dice import produced_by, refuse_existing, script_start  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE, atomic, augment, data, io, preprocess  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402

DEFAULT_MANIFEST = "~/.cache/radlogics_repro/synthetic/large/manifest.csv"
AREA_BINS_MM2 = (25.0, 100.0, 200.0, 1000.0, np.inf)


def abnormal_crops(row: pd.Series, *, size: int, step_mm: float, margin_mm: float,
                   min_lesion_area_mm2: float, min_lung_area_mm2: float):
    """The abnormal training slices of one case as the classifier sees them.

    Returns:
        lesion masks float32 ``(n, size, size)`` in lung-crop coordinates (nearest neighbour),
        the area of one crop pixel in mm^2 ``(n,)`` and the slice's whole lesion area in mm^2 ``(n,)``.
    """
    study = io.load_study(row["image"])
    lung = io.load_mask(row["lung_mask"], study)
    lesion = io.load_mask(row["lesion_mask"], study) > 0
    area = study.pixel_area_mm2
    z = data.slice_indices(preprocess.slices_with_lung(lung, area, min_lung_area_mm2),
                           study.spacing[0], step_mm)
    z = z[preprocess.abnormal_slice_labels(lesion[z], area, min_lesion_area_mm2)]
    spacing = tuple(study.spacing[1:])
    boxes = [preprocess.lung_bounding_box(lung[i], spacing, margin_mm) for i in z]
    if not boxes:
        return np.zeros((0, size, size), np.float32), np.zeros(0), np.zeros(0)
    crops = preprocess.crop_and_resize(lesion[z].astype(np.float32), boxes, size, nearest=True)
    pixel_mm2 = np.array([b.height * spacing[0] * b.width * spacing[1] / size**2 for b in boxes])
    whole_mm2 = lesion[z].reshape(len(z), -1).sum(axis=1) * area
    return crops.numpy(), pixel_mm2, whole_mm2


def visible_areas(mask: np.ndarray, pixel_mm2: float, *, draws: int, min_scale: float,
                  max_degrees: float, rng: np.random.Generator, seed: int) -> np.ndarray:
    """Lesion area (mm^2) left in view by ``draws`` augmentations of one ``(S, S)`` crop mask."""
    size = mask.shape[0]
    out = np.empty(draws)
    for d in range(draws):
        rotated = mask
        if max_degrees > 0:
            _, rotated = augment.random_rotation(
                tf.zeros((size, size, 1)), tf.constant(mask[..., None]),
                seed=tf.constant([seed, d]), max_degrees=max_degrees)
            rotated = rotated.numpy()[..., 0]
        scale = rng.uniform(min_scale, 1.0)
        side = int(round(scale * size))
        y0, x0 = rng.integers(0, size - side + 1, size=2)
        out[d] = rotated[y0 : y0 + side, x0 : x0 + side].sum() * pixel_mm2
    return out


def loss_table(rows: pd.DataFrame, min_lesion_area_mm2: float) -> pd.DataFrame:
    """Share of draws below the label threshold and with no lesion, by whole lesion area, then over
    all abnormal slices, per augmentation setting."""

    def row(setting, area_label, group):
        return {"augmentation": setting, "slice lesion area mm^2": area_label,
                "abnormal slices": group["slice"].nunique(),
                "draws below threshold": float((group["visible_mm2"] < min_lesion_area_mm2).mean()),
                "draws with no lesion": float((group["visible_mm2"] <= 0).mean())}

    bins = pd.cut(rows["whole_mm2"], AREA_BINS_MM2, right=False)
    table = [row(setting, f"[{interval.left:g}, {interval.right:g})", group)
             for (setting, interval), group in rows.groupby(["setting", bins], observed=True, sort=True)]
    table += [row(setting, "all", group) for setting, group in rows.groupby("setting", sort=True)]
    return pd.DataFrame(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=DEFAULT_MANIFEST)
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--min-scale", type=float, action="append",
                        help="crop_min_scale to try (repeat; default 0.85, the preset's)")
    parser.add_argument("--max-degrees", type=float, default=15.0)
    parser.add_argument("--step-mm", type=float, default=10.0)
    parser.add_argument("--margin-mm", type=float, default=preprocess.DEFAULT_CROP_MARGIN_MM)
    parser.add_argument("--min-lesion-area-mm2", type=float,
                        default=preprocess.DEFAULT_MIN_LESION_AREA_MM2)
    parser.add_argument("--size", type=int, default=preprocess.MODEL_INPUT_SIZE)
    parser.add_argument("--out", default="results/crop_label_loss.md")
    args = parser.parse_args(argv)
    started = script_start()
    out = Path(args.out)
    if refuse_existing(out):
        return 2
    scales = args.min_scale or [0.85]
    manifest_path = Path(args.manifest).expanduser()
    try:
        manifest = data.read_manifest(manifest_path, required=("image", "lung_mask", "lesion_mask"))
        cases = data.split_rows(manifest, args.split, args.max_cases)
    except (data.DatasetError, OSError) as err:
        print(f"error: {manifest_path}: {err}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    records = []
    n_slice = 0
    for case_index, (_, row) in enumerate(cases.iterrows()):
        masks, pixel_mm2, whole_mm2 = abnormal_crops(
            row, size=args.size, step_mm=args.step_mm, margin_mm=args.margin_mm,
            min_lesion_area_mm2=args.min_lesion_area_mm2,
            min_lung_area_mm2=preprocess.DEFAULT_MIN_LUNG_AREA_MM2)
        for mask, px, whole in zip(masks, pixel_mm2, whole_mm2, strict=True):
            settings = [(f"crop {s:g}, rotation {args.max_degrees:g} deg", s, args.max_degrees)
                        for s in scales]
            settings += [(f"rotation {args.max_degrees:g} deg only", 1.0, args.max_degrees)]
            for name, scale, degrees in settings:
                areas = visible_areas(mask, px, draws=args.draws, min_scale=scale,
                                      max_degrees=degrees, rng=rng, seed=n_slice)
                records += [{"setting": name, "slice": n_slice, "case": row["case_id"],
                             "whole_mm2": whole, "visible_mm2": a} for a in areas]
            n_slice += 1
        print(f"{case_index + 1}/{len(cases)} {row['case_id']}: {len(masks)} abnormal slices",
              file=sys.stderr)
    if not records:
        print(f"error: {manifest_path}: split '{args.split}' has no abnormal slice", file=sys.stderr)
        return 2
    table = loss_table(pd.DataFrame(records), args.min_lesion_area_mm2)
    text = "\n".join([
        "# Lesion cut out of abnormal slices by the classifier's training augmentation", "",
        f"_{RESEARCH_USE_NOTICE}_", "",
        produced_by("crop_label_loss.py", argv, started), "",
        f"Data: `{manifest_path}` split `{args.split}` ({len(cases)} scans, {n_slice} abnormal "
        f"slices at one every {args.step_mm:g} mm, lung crops with a {args.margin_mm:g} mm margin, "
        f"{args.size} px). Label threshold: {args.min_lesion_area_mm2:g} mm^2 of lesion in the "
        f"slice. {args.draws} augmentation draws per slice and setting (rotation by "
        "`augment.random_rotation` on the lesion mask, crop window drawn as `augment.random_crop` "
        "draws it). A draw 'below threshold' keeps less lesion in view than the label needs; the "
        "label stays abnormal.", "",
        frame_markdown(table), "",
    ])
    atomic.write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
