"""Write a synthetic dataset to disk: images, masks, optional DICOM, manifest, per-slice labels.

Layout under ``out_dir``::

    images/<case_id>.nii.gz            int16 HU (canonical LPS grid)
    masks/<case_id>_lung.nii.gz        uint8, 1 right lung, 2 left lung
    masks/<case_id>_lesion.nii.gz      uint8, 1 ground-glass opacity, 2 consolidation
    dicom/<case_id>/IM0001.dcm ...     when "dicom" is in ``formats``
    slices.csv                         case_id, z, lung_pixels, lesion_pixels, lesion_area_mm2,
                                       abnormal
    manifest.csv                       one row per case (see MANIFEST_COLUMNS)
    dataset.json                       generator version, seed, every parameter, per-case details

Patients are split into train/val/test by patient, stratified by case label, deterministically
from the seed. Everything is written into a temporary sibling folder that is renamed into place
at the end, so an interrupted run leaves no half dataset. DICOM files carry planted synthetic
identifiers (name, ID, birth date) that appear nowhere else: the manifest only has the pseudonym.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from radlogics_repro import RESEARCH_USE_NOTICE, __version__
from radlogics_repro.synth.phantom import PhantomCase, SynthError, generate_case
from radlogics_repro.synth.scanner import check_site

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
"""Bump when the same arguments would produce different data."""

MANIFEST_COLUMNS = (
    "case_id", "patient_id", "day", "split", "label", "breath_phase", "lesion_volume_cm3",
    "ggo_volume_cm3", "consolidation_volume_cm3", "lung_volume_ml", "lung_volume_right_ml",
    "lung_volume_left_ml", "n_slices", "spacing_z_mm", "spacing_y_mm", "spacing_x_mm", "image",
    "lung_mask", "lesion_mask", "dicom",
)
SLICE_COLUMNS = ("case_id", "z", "lung_pixels", "lesion_pixels", "lesion_area_mm2", "abnormal")
SPLITS = ("train", "val", "test")
FORMATS = ("nifti", "dicom")


def generate_dataset(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 24,
    seed: int = 0,
    in_plane: int = 512,
    slices: int | Sequence[int] = (64, 300),
    pixel_mm: float | Sequence[float] = (0.6, 0.9),
    slice_mm: float | Sequence[float] = (1.0, 5.0),
    covid_fraction: float = 0.5,
    longitudinal_fraction: float = 0.25,
    timepoints: int | Sequence[int] = (3, 5),
    exhale_fraction: float = 0.15,
    formats: str | Sequence[str] = ("nifti",),
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    min_lesion_area_mm2: float | None = None,
    scanner: dict | None = None,
    overwrite: bool = False,
    threads: int = 2,
    progress: bool = True,
) -> Path:
    """Generate ``n_patients`` synthetic patients and write them under ``out_dir``.

    Args:
        out_dir: dataset folder (must not hold a dataset unless ``overwrite``).
        n_patients: number of patients (>= 1).
        seed: dataset seed; the same arguments give identical files.
        in_plane: matrix size, pixels.
        slices: fixed number of slices, or (min, max) with the spacing drawn from ``slice_mm``.
        pixel_mm: pixel size for a 512 matrix (mm), fixed or (low, high); see
            :func:`~radlogics_repro.synth.phantom.generate_case`.
        slice_mm: slice spacing (mm), fixed or (low, high).
        covid_fraction: share of COVID-like patients (rounded to whole patients).
        longitudinal_fraction: share of patients scanned on several days.
        timepoints: scans per longitudinal patient, fixed or (min, max).
        exhale_fraction: probability that a scan is taken at expiration.
        formats: "nifti" (always written: the manifest points at it) and/or "dicom".
        split_fractions: train/val/test shares of the patients, per label.
        min_lesion_area_mm2: slice "abnormal" threshold for slices.csv (default: the package's
            :data:`radlogics_repro.preprocess.DEFAULT_MIN_LESION_AREA_MM2`).
        scanner: one site's scanner for every scan: ``kernel``, ``blur_mm`` and ``noise_hu``
            ranges (see :func:`radlogics_repro.synth.scanner.sample_profile`; with ``slice_mm``
            this makes a "local site" dataset). None: the usual mix of scanners.
        overwrite: replace an existing dataset in ``out_dir``.
        threads: rendering threads per case.
        progress: show a tqdm bar over cases.

    Returns:
        Path to ``out_dir/manifest.csv``.

    Raises:
        SynthError: bad arguments, or ``out_dir`` already holds data and ``overwrite`` is False.
    """
    out_dir = Path(out_dir).expanduser()
    formats = _check_formats(formats)
    params = _check_params(n_patients=n_patients, seed=seed, in_plane=in_plane, slices=slices,
                           pixel_mm=pixel_mm, slice_mm=slice_mm, covid_fraction=covid_fraction,
                           longitudinal_fraction=longitudinal_fraction, timepoints=timepoints,
                           exhale_fraction=exhale_fraction, formats=formats,
                           split_fractions=split_fractions, scanner=scanner)
    _refuse_existing(out_dir, overwrite)
    from radlogics_repro import io, preprocess  # heavy imports (TensorFlow) only when writing

    if min_lesion_area_mm2 is None:
        min_lesion_area_mm2 = preprocess.DEFAULT_MIN_LESION_AREA_MM2
    params["min_lesion_area_mm2"] = float(min_lesion_area_mm2)

    plan = plan_patients(**{k: params[k] for k in (
        "n_patients", "seed", "covid_fraction", "longitudinal_fraction", "timepoints",
        "split_fractions")})
    n_cases = sum(len(p["days"]) for p in plan)
    log.info("generating %d synthetic patients (%d scans) into %s", len(plan), n_cases, out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for sub in ("images", "masks"):
            (tmp / sub).mkdir()
        rows, slice_rows, details = [], [], {}
        bar = tqdm(total=n_cases, desc="synthetic CT", unit="case", disable=not progress)
        # files are compressed on a writer thread while the next case renders (zlib releases
        # the GIL); at most one case waits to be written
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending = None
            for patient in plan:
                rng = np.random.default_rng(np.random.SeedSequence(patient["seed"],
                                                                   spawn_key=(7,)))
                for scan, day in enumerate(patient["days"]):
                    phase = "exhale" if rng.random() < params["exhale_fraction"] else "inhale"
                    case = generate_case(
                        patient["seed"], day=day, label=patient["label"], breath_phase=phase,
                        scan_index=0, patient_id=patient["patient_id"],
                        in_plane=params["in_plane"],
                        n_slices=params["slices"] if isinstance(params["slices"], int) else None,
                        slices=params["slices"] if isinstance(params["slices"], tuple)
                        else (2, 10000),
                        pixel_mm=params["pixel_mm"], slice_mm=params["slice_mm"],
                        longitudinal=patient["longitudinal"], scanner=params["scanner"] or None,
                        threads=threads)
                    if pending is not None:
                        pending.result()  # propagate write errors, bound memory
                    pending = writer.submit(_write_case, case, tmp, formats, io, patient, scan)
                    rows.append(_manifest_row(case, patient["split"], _case_paths(case, formats)))
                    abnormal = case.abnormal_slices(min_lesion_area_mm2)
                    slice_rows.extend(_slice_rows(case, abnormal))
                    details[case.case_id] = case.info
                    bar.update(1)
                    bar.set_postfix_str(case.case_id)
            if pending is not None:
                pending.result()
        bar.close()
        _write_csv(tmp / "slices.csv", SLICE_COLUMNS, slice_rows)
        meta = {
            "generator": "radlogics_repro.synth", "generator_version": GENERATOR_VERSION,
            "package_version": __version__, "notice": RESEARCH_USE_NOTICE,
            "seed": int(seed), "parameters": _jsonable(params),
            "patients": [{k: p[k] for k in ("patient_id", "label", "split", "days",
                                             "longitudinal")} for p in plan],
            "cases": details,
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        _write_csv(tmp / "manifest.csv", MANIFEST_COLUMNS, rows)
        _move_into_place(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%d cases)", out_dir / "manifest.csv", len(rows))
    return out_dir / "manifest.csv"


# ---------------------------------------------------------------------------------------------
# Planning: labels, longitudinal series, splits
# ---------------------------------------------------------------------------------------------


def plan_patients(*, n_patients: int, seed: int, covid_fraction: float,
                  longitudinal_fraction: float, timepoints, split_fractions) -> list[dict]:
    """Deterministic per-patient plan: pseudonym, seed, label, scan days, split.

    Returns:
        One dict per patient with 'patient_id', 'index', 'seed', 'label', 'longitudinal',
        'days' (list of int, days since the first scan) and 'split'.
    """
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1,)))
    n_covid = int(round(n_patients * covid_fraction))
    labels = np.zeros(n_patients, int)
    labels[rng.permutation(n_patients)[:n_covid]] = 1
    n_long = int(round(n_patients * longitudinal_fraction))
    n_long_covid = min(n_covid, int(round(n_long * covid_fraction)))
    n_long_neg = min(n_patients - n_covid, n_long - n_long_covid)
    longitudinal = np.zeros(n_patients, bool)
    for lab, k in ((1, n_long_covid), (0, n_long_neg)):  # spread over both labels
        idx = np.nonzero(labels == lab)[0]
        longitudinal[rng.permutation(idx)[:k]] = True
    lo, hi = (timepoints, timepoints) if isinstance(timepoints, int) else timepoints
    plan = []
    for i in range(n_patients):
        pseed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        days = [0]
        if longitudinal[i]:
            days = longitudinal_days(int(rng.integers(lo, hi + 1)), rng)
        plan.append({"patient_id": f"P{i:04d}", "index": i, "seed": pseed,
                     "label": int(labels[i]), "longitudinal": bool(longitudinal[i]),
                     "days": days})
    splits = assign_splits([p["patient_id"] for p in plan], [p["label"] for p in plan],
                           split_fractions, seed)
    for p in plan:
        p["split"] = splits[p["patient_id"]]
    return plan


def longitudinal_days(n: int, rng: np.random.Generator) -> list[int]:
    """``n`` >= 2 scan days: 0, then roughly even steps to a last scan at day 20-28."""
    last = float(rng.uniform(20, 28))
    inner = np.linspace(0, last, n)[1:-1] + rng.uniform(-1.0, 1.0, n - 2)
    days = [0, *[int(round(d)) for d in inner], int(round(last))]
    return sorted(set(days))


def assign_splits(patient_ids: Sequence[str], labels: Sequence[int],
                  fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Split patients into train/val/test, stratified by label, deterministically.

    Within each label the patients are shuffled with ``seed`` and cut by largest-remainder
    rounding of ``fractions``; a split with a positive fraction gets at least one patient of a
    label when that label has enough patients.
    """
    fr = np.asarray(fractions, dtype=float)
    fr = fr / fr.sum()
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(2,)))
    out = {}
    ids = np.asarray(patient_ids)
    labs = np.asarray(labels)
    for lab in sorted(set(labs.tolist())):
        group = ids[labs == lab]
        group = group[rng.permutation(len(group))]
        counts = _largest_remainder(len(group), fr)
        start = 0
        for name, c in zip(SPLITS, counts, strict=True):
            for pid in group[start:start + c]:
                out[str(pid)] = name
            start += c
    return out


def _largest_remainder(n: int, fr: np.ndarray) -> list[int]:
    raw = fr * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    # every split with a positive share gets one patient when possible (taken from the largest)
    for i in np.nonzero((fr > 0) & (counts == 0))[0]:
        j = int(np.argmax(counts))
        if counts[j] > 1:
            counts[j] -= 1
            counts[i] += 1
    return counts.tolist()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _case_paths(case: PhantomCase, formats: tuple) -> dict:
    """Paths of a case's files relative to the dataset folder ('' = not written)."""
    return {"image": f"images/{case.case_id}.nii.gz",
            "lung_mask": f"masks/{case.case_id}_lung.nii.gz",
            "lesion_mask": f"masks/{case.case_id}_lesion.nii.gz",
            "dicom": f"dicom/{case.case_id}" if "dicom" in formats else ""}


def _write_case(case: PhantomCase, root: Path, formats: tuple, io, patient: dict,
                scan: int) -> None:
    study = io.study_from_array(case.hu, case.spacing, case.origin_lps)
    rel = _case_paths(case, formats)
    io.save_volume(study, case.hu, root / rel["image"], dtype=np.int16)
    io.save_mask(study, case.lung_mask, root / rel["lung_mask"])
    io.save_mask(study, case.lesion_mask, root / rel["lesion_mask"])
    if "dicom" in formats:
        name, pid, birth = planted_identity(patient["index"], patient["seed"])
        io.write_dicom_series(
            case.hu, case.spacing, root / rel["dicom"], origin_lps=case.origin_lps,
            patient_name=name, patient_id=pid, birth_date=birth,
            series_description="synthetic chest CT (radlogics_repro.synth)",
            seed=int(patient["seed"]) * 100 + scan)


def planted_identity(index: int, patient_seed: int) -> tuple[str, str, str]:
    """Synthetic DICOM patient name, ID and birth date for patient ``index`` (never written
    anywhere but the DICOM headers)."""
    rng = np.random.default_rng(np.random.SeedSequence(int(patient_seed), spawn_key=(9,)))
    letters = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ"), 2))
    year = int(rng.integers(1940, 1995))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return (f"SYNTH^PATIENT{index}", f"SYN-ID-{index:04d}-{letters}",
            f"{year:04d}{month:02d}{day:02d}")


def _manifest_row(case: PhantomCase, split: str, rel: dict) -> dict:
    row = {"case_id": case.case_id, "patient_id": case.patient_id, "day": case.day,
           "split": split, "label": case.label, "breath_phase": case.breath_phase}
    row.update({k: round(v, 4) for k, v in case.volumes.items()})
    row.update({"n_slices": case.hu.shape[0], "spacing_z_mm": round(case.spacing[0], 4),
                "spacing_y_mm": round(case.spacing[1], 6), "spacing_x_mm": round(case.spacing[2], 6)})
    row.update(rel)
    return row


def _slice_rows(case: PhantomCase, abnormal: np.ndarray) -> list[dict]:
    nz = case.hu.shape[0]
    lung_px = np.count_nonzero(case.lung_mask.reshape(nz, -1), axis=1)
    les_px = np.count_nonzero(case.lesion_mask.reshape(nz, -1), axis=1)
    area = case.pixel_area_mm2
    return [{"case_id": case.case_id, "z": z, "lung_pixels": int(lung_px[z]),
             "lesion_pixels": int(les_px[z]), "lesion_area_mm2": round(float(les_px[z] * area), 3),
             "abnormal": int(bool(abnormal[z]))} for z in range(nz)]


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        what = "a dataset" if (out_dir / "manifest.csv").exists() else "files"
        raise SynthError(f"{out_dir}: already holds {what}; pass overwrite=True to replace it")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        _refuse_existing(out_dir, overwrite)  # something appeared while we were generating
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(str(f).lower() for f in formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise SynthError(f"formats: unknown {bad}; use any of {list(FORMATS)}")
    return tuple(dict.fromkeys(("nifti", *formats)))


def _number(value, name: str, cast=float):
    """``cast(value)`` or a SynthError naming the parameter."""
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise SynthError(f"{name} must be a number, got {value!r}") from None


def _range(value, name: str, *, integer: bool = False):
    """A fixed number or a (low, high) pair, validated (> 0, low <= high)."""
    cast = int if integer else float
    if np.isscalar(value):
        v = _number(value, name, cast)
        if v <= 0:
            raise SynthError(f"{name} must be > 0, got {value}")
        return v
    try:
        vals = tuple(_number(v, name, cast) for v in value)
    except TypeError:
        raise SynthError(f"{name} must be a number or a (low, high) pair, got {value!r}") from None
    if len(vals) != 2 or vals[0] <= 0 or vals[1] < vals[0]:
        raise SynthError(f"{name} must be a number or a (low, high) pair with 0 < low <= high, "
                         f"got {value}")
    return vals


def _check_params(**p) -> dict:
    """Validate and normalise the generator arguments (SynthError names the bad one)."""
    p["n_patients"] = _number(p["n_patients"], "n_patients", int)
    if p["n_patients"] < 1:
        raise SynthError(f"n_patients must be >= 1, got {p['n_patients']}")
    p["seed"] = _number(p["seed"], "seed", int)
    p["in_plane"] = _number(p["in_plane"], "in_plane", int)
    if p["in_plane"] < 16:
        raise SynthError(f"in_plane must be >= 16 pixels, got {p['in_plane']}")
    p["slices"] = _range(p["slices"], "slices", integer=True)
    if (p["slices"] if isinstance(p["slices"], int) else p["slices"][0]) < 2:
        raise SynthError(f"slices must be >= 2, got {p['slices']}")
    p["pixel_mm"] = _range(p["pixel_mm"], "pixel_mm")
    p["slice_mm"] = _range(p["slice_mm"], "slice_mm")
    p["timepoints"] = _range(p["timepoints"], "timepoints", integer=True)
    if (p["timepoints"] if isinstance(p["timepoints"], int) else p["timepoints"][0]) < 2:
        raise SynthError(f"timepoints must be >= 2, got {p['timepoints']}")
    for name in ("covid_fraction", "longitudinal_fraction", "exhale_fraction"):
        v = _number(p[name], name)
        if not 0.0 <= v <= 1.0:
            raise SynthError(f"{name} must be within [0, 1], got {p[name]}")
        p[name] = v
    try:
        fr = tuple(_number(v, "split_fractions") for v in p["split_fractions"])
    except TypeError:
        fr = ()
    if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
        raise SynthError(f"split_fractions must be three shares >= 0 (train, val, test), "
                         f"got {p['split_fractions']}")
    p["split_fractions"] = fr
    try:
        p["scanner"] = check_site(p["scanner"])
    except ValueError as err:
        raise SynthError(str(err)) from None
    return p


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def ensure_dataset(manifest: str | os.PathLike, generator: dict) -> Path:
    """Generate the phantom dataset into ``manifest``'s folder unless that manifest exists.

    ``generator`` holds :func:`generate_dataset`'s keyword arguments (a data config's ``generator``).
    Returns the manifest path.

    Raises:
        SynthError: the folder holds a dataset generated with other settings (its ``dataset.json``,
            see :func:`generator_differences`): it is never reused silently.
    """
    manifest = Path(manifest)
    if not manifest.exists():
        log.info("no dataset at %s: generating the synthetic phantoms (%s)", manifest.parent, generator)
        generate_dataset(manifest.parent, **generator)
        return manifest
    differences = generator_differences(manifest.parent / "dataset.json", generator)
    if differences:
        raise SynthError(
            f"{manifest.parent / 'dataset.json'}: the dataset there was generated with "
            f"{'; '.join(differences)}; point data.manifest at another folder, or delete "
            f"{manifest.parent} to generate it anew")
    return manifest


def generator_differences(dataset_json: Path, generator: dict) -> list[str]:
    """The ``generator`` settings that a generated dataset's ``dataset.json`` does not match, as
    ``'key=stored (asked: wanted)'``, both normalised as :func:`generate_dataset` normalises them.
    A None asks for the default and matches anything; a dataset without ``dataset.json`` (not
    written by this package) matches."""
    if not dataset_json.exists():
        return []
    stored = json.loads(dataset_json.read_text()).get("parameters", {})
    asked = _normalised_parameters(generator)
    return [f"{key}={json.dumps(stored.get(key))} (asked: {json.dumps(asked[key])})"
            for key, value in generator.items()
            if value is not None and key in asked and stored.get(key) != asked[key]]


def _normalised_parameters(generator: dict) -> dict:
    """:func:`generate_dataset`'s recorded ``parameters`` for these arguments (defaults filled in)."""
    signature = inspect.signature(generate_dataset).parameters
    merged = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    merged.update({k: v for k, v in generator.items() if v is not None})
    keys = ("n_patients", "seed", "in_plane", "slices", "pixel_mm", "slice_mm", "covid_fraction",
            "longitudinal_fraction", "timepoints", "exhale_fraction", "split_fractions", "scanner")
    params = _check_params(**{k: merged[k] for k in keys}, formats=_check_formats(merged["formats"]))
    if merged["min_lesion_area_mm2"] is not None:
        params["min_lesion_area_mm2"] = float(merged["min_lesion_area_mm2"])
    return _jsonable(params)
