"""Lung segmentation of whole scans, model by model and dataset by dataset: results/<name>.md.

    python experiments/lung_dice.py \
        --model base=runs/lung_unet/<run>/model.keras [--model finetuned=runs/lung_unet/<ft>/model.keras] \
        --data site=~/.cache/radlogics_repro/synthetic/site_b/manifest.csv:test \
        [--data holdout=~/.cache/radlogics_repro/synthetic/holdout/manifest.csv:test] \
        [--max-scans 10] [--max-slice-mm 2.5] [--slice-step-mm 0 2.5] [--out results/local_site.md]

Every scan of the chosen split goes through the analysis's own lung segmentation
(:func:`radlogics_repro.lung_segmentation.segment_lungs`: the network on every slice that may hold
lung, resized back, largest components kept, holes filled), at the precision ``analyze`` uses here
(``auto``: bfloat16 on CPUs with native bfloat16), and its 3D Dice against the reference lung mask
is reported per scan, with the mean, the minimum and the mean over the *severe* scans (reference
lesions >= 5 % of the lung volume, as in :mod:`radlogics_repro.evaluate.runner`).

This is the before/after table of the "local site" recipe in data/README.md (a model trained on
the synthetic default, then fine-tuned on a site with another scanner) and the held-out lung Dice
benchmark of the lung U-Net. ``--max-scans`` keeps that many scans per dataset, evenly spaced in the
manifest's order (None: all).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlogics_repro import (  # noqa: E402
    RESEARCH_USE_NOTICE,
    atomic,
    data,
    io,
    lung_segmentation,
    models,
    provenance,
)
from radlogics_repro.evaluate import metrics as M  # noqa: E402
from radlogics_repro.evaluate.plots import format_value as _fmt  # noqa: E402
from radlogics_repro.evaluate.plots import frame_markdown  # noqa: E402
from radlogics_repro.evaluate.runner import SEVERE_INVOLVEMENT, is_severe  # noqa: E402


def named_path(text: str, what: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (name, value)."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{what} must be NAME=VALUE, got {text!r}")
    return name, value


def refuse_existing(out: Path) -> bool:
    """True (after a one-line error) when ``out`` exists: results are never overwritten."""
    if out.exists():
        print(f"error: {out} exists; choose another --out or remove it", file=sys.stderr)
        return True
    return False


@dataclass(frozen=True)
class Start:
    """When a script started and the checkout it started from (a long script must not record the
    commit of whatever is checked out when it ends)."""

    time: float
    environment: dict


def script_start() -> Start:
    return Start(time.time(), provenance.environment())


def produced_by(script: str, argv: list[str] | None, started: Start) -> str:
    """The provenance sentence of a results file: the command as typed, the commit and date at the
    start (``started``: :func:`script_start` at the start), the machine and how long the script took."""
    env = started.environment
    given = " ".join(sys.argv[1:] if argv is None else argv)
    return (f"Produced by `python experiments/{script} {given}` at commit `{env['commit']}` on "
            f"{env['date']} ({env['machine']}, TensorFlow {env['tensorflow']}); the script took "
            f"{(time.time() - started.time) / 60:.1f} min.")


def write_result(out: Path, text: str, per_case: list[pd.DataFrame]) -> None:
    """A results file ``out`` and its per-case rows as a CSV beside it (same stem), each written
    atomically; prints the text."""
    atomic.write_text(out.with_suffix(".csv"), pd.concat(per_case).to_csv(index=False, float_format="%.6g"))
    atomic.write_text(out, text)
    print(text)


def load_at_precision(path: str, policy: str):
    """A saved model, rebuilt at the Keras dtype ``policy`` unless that is ``model``."""
    model = models.load_model(path)
    return model if policy == "model" else models.with_compute_precision(model, policy)


def dataset_rows(spec: str, max_scans: int | None, max_slice_mm: float | None = None
                 ) -> tuple[pd.DataFrame, str, str]:
    """``MANIFEST[:SPLIT]`` -> (the split's rows, those with slices at most ``max_slice_mm`` apart
    when given (the manifest's ``spacing_z_mm``), capped; manifest path; split)."""
    path, split = spec, "test"
    head, sep, tail = spec.rpartition(":")
    if sep and tail in data.SPLITS:
        path, split = head, tail
    path = str(Path(path).expanduser())
    manifest = data.read_manifest(path, required=("image", "lung_mask", "lesion_mask"))
    rows = data.split_rows(manifest, split)
    if max_slice_mm is not None:
        if "spacing_z_mm" not in rows:
            raise SystemExit(f"error: {path}: no spacing_z_mm column for --max-slice-mm")
        rows = rows[rows["spacing_z_mm"] <= max_slice_mm]
    if max_scans is not None and len(rows) > max_scans:
        rows = rows.iloc[np.linspace(0, len(rows) - 1, max_scans).round().astype(int)]
    return rows, path, split


def scan_dice(row: pd.Series, model, slice_step_mm: float | None = None) -> dict:
    """3D lung Dice of one scan (the analysis's segmentation against the reference), and whether the
    scan is severe. ``slice_step_mm``: as ``analysis.lung_slice_step_mm`` (None: every slice)."""
    study = io.load_study(row["image"])
    reference = io.load_mask(row["lung_mask"], study) > 0
    lesion = io.load_mask(row["lesion_mask"], study) > 0
    started = time.perf_counter()
    predicted = lung_segmentation.segment_lungs(study, model, input_size=int(model.input_shape[1]),
                                                slice_step_mm=slice_step_mm) > 0
    seconds = time.perf_counter() - started
    lung_voxels = int(reference.sum())
    return {"case_id": row["case_id"], "patient_id": row["patient_id"], "slices": study.hu.shape[0],
            "slice_mm": round(float(study.spacing[0]), 2), "lung_dice": M.dice(predicted, reference),
            "severe": is_severe(int(lesion.sum()), lung_voxels),
            "seconds": seconds}


def summary_row(dataset: str, model_name: str, step_mm: float | None, scans: pd.DataFrame) -> dict:
    severe = scans.loc[scans["severe"], "lung_dice"]
    return {"data": dataset, "model": model_name,
            "network on slices (mm apart)": f"<= {step_mm:g}" if step_mm else "every",
            "scans": len(scans),
            "mean Dice": _fmt(scans["lung_dice"].mean()), "min Dice": _fmt(scans["lung_dice"].min()),
            "severe mean Dice (n)": f"{_fmt(severe.mean()) if len(severe) else '-'} ({len(severe)})",
            "s/slice": f"{scans['seconds'].sum() / scans['slices'].sum():.3f}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=lambda t: named_path(t, "--model"),
                        help="NAME=path/to/model.keras (repeat)")
    parser.add_argument("--data", action="append", required=True, type=lambda t: named_path(t, "--data"),
                        help="NAME=manifest.csv[:split] (default split: test; repeat)")
    parser.add_argument("--max-scans", type=int, default=None, help="scans per dataset (default: all)")
    parser.add_argument("--max-slice-mm", type=float, default=None,
                        help="only scans whose slices are at most this far apart (mm)")
    parser.add_argument("--precision", default="auto", choices=models.PRECISION_CHOICES)
    parser.add_argument("--slice-step-mm", type=float, nargs="+", default=[0.0],
                        help="analysis.lung_slice_step_mm values to compare (0: every slice)")
    parser.add_argument("--title", default="Lung segmentation of whole scans")
    parser.add_argument("--out", default="results/lung_dice.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if refuse_existing(out):
        return 2
    started = script_start()
    datasets = [(name, *dataset_rows(spec, args.max_scans, args.max_slice_mm)) for name, spec in args.data]
    policy = models.resolve_precision(args.precision)
    per_scan, summary = [], []
    for model_name, path in args.model:
        model = load_at_precision(path, policy)
        for (dataset, rows, _, _), step_mm in itertools.product(datasets, args.slice_step_mm):
            scans = pd.DataFrame([scan_dice(row, model, step_mm or None) for _, row in rows.iterrows()])
            scans.insert(0, "slice_step_mm", step_mm)
            scans.insert(0, "model", model_name)
            scans.insert(0, "data", dataset)
            per_scan.append(scans)
            summary.append(summary_row(dataset, model_name, step_mm, scans))
            print(summary[-1], flush=True)
    per_scan = pd.concat(per_scan, ignore_index=True)
    thin = f" with slices <= {args.max_slice_mm:g} mm apart" if args.max_slice_mm is not None else ""
    lines = [
        f"# {args.title}", "", f"_{RESEARCH_USE_NOTICE}_", "",
        f"{produced_by('lung_dice.py', argv, started)} Precision: {policy}.", "",
        "Models: " + "; ".join(f"**{name}** `{path}`" for name, path in args.model) + ".", "",
        "Data: " + "; ".join(f"**{name}** `{path}` split {split} ({len(rows)} scans{thin})"
                             for name, rows, path, split in datasets) + ".", "",
        "3D Dice of each scan's lung mask (the analysis's own segmentation: network, largest components, "
        f"holes filled) against the reference; network on slices at most X mm apart: "
        "`analysis.lung_slice_step_mm=X`, the probabilities of the slices in between interpolated; "
        f"severe: reference lesions >= {SEVERE_INVOLVEMENT:.0%} of "
        "the lung volume. s/slice: segmentation seconds per slice of the scan (slices with no lung are "
        "skipped before the network).", "",
        frame_markdown(pd.DataFrame(summary)), "",
        f"Per scan: `{out.with_suffix('.csv').name}`.", ""]
    atomic.write_text(out.with_suffix(".csv"), per_scan.to_csv(index=False, float_format="%.4f"))
    atomic.write_text(out, "\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
