"""One synthetic chest-CT scan with its ground truth: :func:`generate_case` -> :class:`PhantomCase`.

A *patient* is fixed by ``seed``: anatomy, vessel trees, disease course and confounders. A *scan*
of that patient is fixed by ``(seed, day, scan_index)``: breathing phase, scanner profile, slice
spacing, positioning and noise. Scanning the same seed on several days gives a longitudinal
series of one anatomy whose lesion burden follows the patient's course.

Rendering (no Python loop over voxels; slabs of a few slices run on ``threads`` threads):

1. tube layers (great vessels, airways, pulmonary trees, clavicles, cables) as partial-volume
   occupancy on the scan grid;
2. anatomy slab by slab (HU and lung labels);
3. confounders and lesions, each in its own bounding box (lesion labels);
4. pulmonary vessels and airways inside the lungs, table, streaks, kernel blur and noise, slab by
   slab.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from radlogics_repro.synth import anatomy as anat
from radlogics_repro.synth import lesions as les
from radlogics_repro.synth import scanner as scn
from radlogics_repro.synth import vessels as ves
from radlogics_repro.synth.geometry import Breath, Grid
from radlogics_repro.synth.tubes import Tubes, render_tubes, smooth_envelope

log = logging.getLogger(__name__)

F32 = np.float32
SLAB = 4
"""Slices per rendering slab (fixed, so the noise does not depend on the thread count)."""

BREATH_PHASES = ("inhale", "exhale")


class SynthError(ValueError):
    """Bad arguments to the phantom generator or the dataset writer (one-line message)."""


@dataclass
class PhantomCase:
    """A synthetic CT scan with ground truth.

    Attributes:
        case_id: '<patient_id>_d<day>' (e.g. 'P0007_d009').
        patient_id: pseudonymous patient id (e.g. 'P0007').
        day: days since the patient's first scan.
        label: 1 COVID-19-like findings, 0 none.
        breath_phase: 'inhale' or 'exhale'.
        hu: float32 (z, y, x) HU, canonical LPS orientation, integer-valued.
        lung_mask: uint8 (z, y, x), 0 outside, 1 right lung (low x), 2 left lung.
        lesion_mask: uint8 (z, y, x), 0 none, 1 ground-glass opacity, 2 consolidation.
        spacing: (z, y, x) mm.
        origin_lps: LPS position (x, y, z) mm of voxel (0, 0, 0).
        lesion_volume_cm3, ggo_volume_cm3, consolidation_volume_cm3: lesion voxels x voxel
            volume / 1000.
        lung_volume_ml, lung_volume_right_ml, lung_volume_left_ml: lung voxels x voxel volume /
            1000.
        info: generator details (scanner profile, disease stage, confounders, breathing warp).
        tissue: optional uint8 (z, y, x) tissue codes
            (:data:`radlogics_repro.synth.anatomy.TISSUE`), when requested.
    """

    case_id: str
    patient_id: str
    day: int
    label: int
    breath_phase: str
    hu: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    lesion_volume_cm3: float
    ggo_volume_cm3: float
    consolidation_volume_cm3: float
    lung_volume_ml: float
    lung_volume_right_ml: float
    lung_volume_left_ml: float
    info: dict = field(default_factory=dict)
    tissue: np.ndarray | None = None

    @property
    def pixel_area_mm2(self) -> float:
        """In-plane pixel area, mm^2."""
        return float(self.spacing[1] * self.spacing[2])

    @property
    def voxel_volume_mm3(self) -> float:
        """Voxel volume, mm^3."""
        return float(np.prod(self.spacing))

    @property
    def volumes(self) -> dict[str, float]:
        """Lesion volumes (cm^3) and lung volumes (mL) by name."""
        return {k: getattr(self, k) for k in (
            "lesion_volume_cm3", "ggo_volume_cm3", "consolidation_volume_cm3", "lung_volume_ml",
            "lung_volume_right_ml", "lung_volume_left_ml")}

    def abnormal_slices(self, min_lesion_area_mm2: float | None = None) -> np.ndarray:
        """bool (z,): lesion area in the slice >= ``min_lesion_area_mm2`` (default: the
        package's :data:`radlogics_repro.preprocess.DEFAULT_MIN_LESION_AREA_MM2`)."""
        from radlogics_repro import preprocess

        if min_lesion_area_mm2 is None:
            min_lesion_area_mm2 = preprocess.DEFAULT_MIN_LESION_AREA_MM2
        return np.asarray(preprocess.abnormal_slice_labels(
            self.lesion_mask, self.pixel_area_mm2, min_lesion_area_mm2), dtype=bool)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent deterministic stream ``key`` of ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def _draw(rng: np.random.Generator, spec, name: str) -> float:
    """A value from a fixed number or a (low, high) range."""
    if np.isscalar(spec):
        value = float(spec)
    else:
        lo, hi = (float(v) for v in spec)
        if hi < lo:
            raise SynthError(f"{name}: range ({lo}, {hi}) has low > high")
        value = float(rng.uniform(lo, hi))
    if value <= 0:
        raise SynthError(f"{name} must be > 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Patient (cached: the scans of one patient share it)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Patient:
    anatomy: anat.Anatomy
    coarse: les.CoarseLung
    lung_volume_ref_mm3: float
    lowest_lung_z: float
    body_offset: tuple[float, float]
    med_tubes: dict
    trees: dict
    disease: les.Disease
    confounders: les.Confounders


@functools.lru_cache(maxsize=8)
def _patient(seed: int, pixel_spec, covid: bool, longitudinal: bool) -> _Patient:
    rng = _rng(seed, 1)
    fov = 512 * _draw(rng, pixel_spec, "pixel_mm")
    an = anat.sample_anatomy(rng, fov)
    inhale = Breath.inhale(an.apex_z)
    coarse = les.make_coarse_lung(an, lambda X, Y, Z: anat.lung_labels(an, inhale, X, Y, Z, Z))
    vol = float(np.count_nonzero(coarse.labels)) * float(np.prod(coarse.grid.spacing))
    zlow = float(coarse.grid.zs()[np.nonzero(coarse.labels.any(axis=(1, 2)))[0][0]])
    offset = (float(rng.normal(0, 0.012 * fov)), float(rng.uniform(0.0, 0.05) * fov))
    trees = ves.lung_trees(an, _rng(seed, 5), {s: coarse.points(s) for s in (anat.RIGHT, anat.LEFT)})
    med = ves.mediastinal_tubes(an, _rng(seed, 6))
    disease = les.sample_disease(_rng(seed, 3), an, coarse, covid, longitudinal=longitudinal)
    conf = les.sample_confounders(_rng(seed, 4), an, coarse, covid)
    return _Patient(an, coarse, vol, zlow, offset, med, trees, disease, conf)


def _solve_exhale(an: anat.Anatomy, patient: _Patient, ratio: float, sxy: float) -> Breath:
    """The expiration warp whose lung volume is ``ratio`` times the inspiration volume."""
    step = 5.0
    x = np.arange(-an.cav_w - 8, an.cav_w + 8, step, dtype=F32)[None, None, :]
    y = np.arange(-an.cav_ant - 8, an.cav_post + 8, step, dtype=F32)[None, :, None]
    z = np.arange(patient.lowest_lung_z - 10, an.apex_z + 5, step, dtype=F32)[:, None, None]

    def volume(sz: float, s_xy: float = sxy) -> float:
        b = Breath("exhale", s_xy, sz, an.apex_z)
        lab = anat.lung_labels(an, b, b.ref_xy(x), b.ref_xy(y), b.ref_z(z), z)
        return float(np.count_nonzero(lab)) * step ** 3

    target = ratio * volume(1.0, 1.0)  # inspiration volume on the same grid
    lo, hi = 0.35, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if volume(mid) > target:
            hi = mid
        else:
            lo = mid
    return Breath("exhale", sxy, (lo + hi) / 2, an.apex_z)


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------


def generate_case(
    seed: int,
    *,
    day: int = 0,
    label: int | None = None,
    breath_phase: str | None = None,
    scan_index: int = 0,
    patient_id: str = "P0000",
    in_plane: int = 512,
    n_slices: int | None = None,
    slices: tuple[int, int] = (64, 300),
    pixel_mm: float | tuple[float, float] = (0.6, 0.9),
    slice_mm: float | tuple[float, float] = (1.0, 5.0),
    covid_probability: float = 0.5,
    exhale_probability: float = 0.15,
    longitudinal: bool = False,
    scanner: dict | None = None,
    noise: bool = True,
    tissue: bool = False,
    threads: int = 2,
) -> PhantomCase:
    """Generate one synthetic chest CT with ground truth, in memory.

    Args:
        seed: patient seed (anatomy, disease course, confounders).
        day: days since the patient's first scan (sets the disease stage).
        label: 1 COVID-like, 0 not; None draws it from the seed with ``covid_probability``.
        breath_phase: 'inhale', 'exhale' or None (drawn with ``exhale_probability``).
        scan_index: distinguishes repeated scans of the same patient and day (noise, position).
        patient_id: pseudonym written into the case (never a real identifier).
        in_plane: matrix size (square), pixels.
        n_slices: fixed number of slices (the slice spacing follows from the thorax length), or
            None: spacing drawn from ``slice_mm`` and the count clipped to ``slices``.
        slices: (min, max) number of slices when ``n_slices`` is None.
        pixel_mm: pixel size for a 512 matrix, mm, fixed or (low, high); the field of view
            (512 x pixel) is kept for other matrix sizes, whose pixels scale accordingly.
        slice_mm: slice spacing, mm, fixed or (low, high).
        longitudinal: the patient is followed over time (first scan early in the course).
        scanner: a site's scanner (kernel, blur and noise ranges) for every scan, see
            :func:`radlogics_repro.synth.scanner.sample_profile`; None: the usual mix.
        noise: False skips noise and blur (clean HU, for tests and figures).
        tissue: also return the tissue map (``PhantomCase.tissue``, codes in
            :data:`radlogics_repro.synth.anatomy.TISSUE`).
        threads: worker threads for the slab passes.

    Returns:
        The case; arrays are (z, y, x) in canonical orientation.

    Raises:
        SynthError: on an argument out of range.
    """
    _check_args(in_plane, n_slices, slices, breath_phase, label, threads)
    covid = bool(label) if label is not None else bool(_rng(seed, 2).random() < covid_probability)
    pixel_spec = pixel_mm if np.isscalar(pixel_mm) else tuple(float(v) for v in pixel_mm)
    pat = _patient(int(seed), pixel_spec, covid, bool(longitudinal))
    an = pat.anatomy
    rng = _rng(seed, 100, day, scan_index)

    # breathing
    exhale = breath_phase == "exhale" or (breath_phase is None
                                          and rng.random() < exhale_probability)
    # expiration: 35-45 % less lung than at inspiration (solved on a coarse grid)
    ratio, sxy = rng.uniform(0.55, 0.65), rng.uniform(0.95, 0.98)
    breath = _solve_exhale(an, pat, ratio, sxy) if exhale else Breath.inhale(an.apex_z)

    # geometry
    grid, origin_lps = _scan_grid(an, pat, breath, rng, in_plane=in_plane, n_slices=n_slices,
                                  slices=slices, slice_mm=slice_mm)
    profile = scn.sample_profile(rng, streaks=pat.confounders.streaks, site=scanner)
    sc_arrays = scn.prepare_scanner(profile, an, grid, an.body_post * breath.sxy,
                                    _rng(seed, 102, day, scan_index))

    # 1. tube layers
    to_scan = functools.partial(breath.scan_points, move_z=True)
    fixed_z = functools.partial(breath.scan_points, move_z=False)
    zr = (float(grid.zs()[0]), float(grid.zs()[-1]))
    cables = ves.ecg_cables(an, _rng(seed, 103, day, scan_index), (zr[0] + 0.3 * (zr[1] - zr[0]),
                                                                    zr[1] - 20))
    trees = pat.trees
    layers = {
        "med_fat": smooth_envelope(render_tubes(pat.med_tubes["med_fat"].mapped(to_scan), grid),
                                   grid, sigma_mm=6.0),
        "med_soft": render_tubes(pat.med_tubes["med_soft"].mapped(to_scan), grid),
        "med_air": render_tubes(pat.med_tubes["med_air"].mapped(to_scan), grid),
        "bone": render_tubes(pat.med_tubes["bone"].mapped(fixed_z), grid),
        "cable": render_tubes(cables.mapped(fixed_z), grid),
    }
    airways = trees["airways"].mapped(to_scan)
    pulm = {
        "wall": render_tubes(airways, grid),
        "vessel": render_tubes(trees["vessels"].mapped(to_scan), grid),
        "lumen": render_tubes(_lumen(airways), grid),
    }

    # 2. anatomy
    exhale_hu = -1000.0 + (1000.0 + an.lung_hu) / ratio if exhale else an.lung_hu
    grad = an.lung_grad * (1.8 if exhale else 1.0)
    ctx = anat.make_context(an, breath, grid, min(exhale_hu, -700.0), grad)
    hu = np.empty(grid.shape, F32)
    lung = np.empty(grid.shape, np.uint8)
    tis = np.empty(grid.shape, np.uint8) if tissue else None
    starts = list(range(0, grid.shape[0], SLAB))

    def anatomy_slab(z0: int) -> None:
        z1 = min(z0 + SLAB, grid.shape[0])
        h, lu, t = anat.render_slab(ctx, z0, z1, layers, tissue=tissue)
        hu[z0:z1], lung[z0:z1] = h, lu
        if tis is not None:
            tis[z0:z1] = t

    _run(anatomy_slab, starts, threads)

    # 3. confounders and lesions
    les.render_confounders(hu, lung, pat.confounders, breath, grid)
    lesion = np.zeros(grid.shape, np.uint8)
    les.render_lesions(hu, lung, lesion, pat.disease.blobs_at(day), breath, grid)

    # 4. pulmonary vessels and airways, scanner
    def scanner_slab(z0: int) -> None:
        z1 = min(z0 + SLAB, grid.shape[0])
        h = hu[z0:z1]
        inside = lung[z0:z1] > 0
        for name, value in (("wall", an.muscle_hu - 20), ("vessel", an.blood_hu),
                            ("lumen", -1000.0)):
            _overlay(h, inside, pulm[name], z0, z1, value)
        scn.apply_scanner(h, sc_arrays, z0, _rng(seed, 101, day, scan_index, z0 // SLAB),
                          noise=noise, tissue=None if tis is None else tis[z0:z1])

    _run(scanner_slab, starts, threads)

    if covid and not lesion.any():
        log.warning("seed %d day %d: COVID-like patient but no lesion voxel at this resolution",
                    seed, day)
    vox = grid.voxel_volume_mm3 / 1000.0
    n_ggo = int(np.count_nonzero(lesion == les.GGO))
    n_con = int(np.count_nonzero(lesion == les.CONSOLIDATION))
    n_r = int(np.count_nonzero(lung == anat.RIGHT))
    n_l = int(np.count_nonzero(lung == anat.LEFT))
    info = {
        "seed": int(seed), "scan_index": int(scan_index),
        "breath": {"phase": breath.phase, "sxy": round(breath.sxy, 4), "sz": round(breath.sz, 4),
                   "target_volume_ratio": round(ratio, 4) if exhale else 1.0},
        "scanner": profile.as_dict(),
        "disease": pat.disease.summary(day),
        "confounders": list(pat.confounders.names),
        "fov_mm": round(an.fov_mm, 2),
    }
    return PhantomCase(
        case_id=f"{patient_id}_d{int(day):03d}", patient_id=patient_id, day=int(day),
        label=int(covid), breath_phase=breath.phase, hu=hu, lung_mask=lung, lesion_mask=lesion,
        spacing=tuple(float(s) for s in grid.spacing), origin_lps=origin_lps,
        lesion_volume_cm3=(n_ggo + n_con) * vox, ggo_volume_cm3=n_ggo * vox,
        consolidation_volume_cm3=n_con * vox, lung_volume_ml=(n_r + n_l) * vox,
        lung_volume_right_ml=n_r * vox, lung_volume_left_ml=n_l * vox, info=info, tissue=tis)


def _check_args(in_plane, n_slices, slices, breath_phase, label, threads) -> None:
    if int(in_plane) < 16:
        raise SynthError(f"in_plane must be >= 16 pixels, got {in_plane}")
    if n_slices is not None and int(n_slices) < 2:
        raise SynthError(f"n_slices must be >= 2, got {n_slices}")
    lo, hi = (int(v) for v in slices)
    if lo < 2 or hi < lo:
        raise SynthError(f"slices must be a (min, max) range with 2 <= min <= max, got {slices}")
    if breath_phase is not None and breath_phase not in BREATH_PHASES:
        raise SynthError(f"breath_phase must be one of {BREATH_PHASES} or None, got {breath_phase!r}")
    if label is not None and label not in (0, 1):
        raise SynthError(f"label must be 0, 1 or None, got {label!r}")
    if int(threads) < 1:
        raise SynthError(f"threads must be >= 1, got {threads}")


def _scan_grid(an, pat: _Patient, breath: Breath, rng, *, in_plane, n_slices, slices, slice_mm):
    """The scan's voxel grid (patient frame) and the LPS origin of voxel (0, 0, 0)."""
    px = an.fov_mm / int(in_plane)
    cx = -pat.body_offset[0] + rng.normal(0, 3.0)
    cy = -pat.body_offset[1] + rng.normal(0, 3.0)
    top = an.apex_z + rng.uniform(15, 35)
    low = breath.apex_z - (breath.apex_z - pat.lowest_lung_z) * breath.sz
    bottom = low - rng.uniform(15, 35)
    extent = top - bottom
    dz = _draw(rng, slice_mm, "slice_mm")
    if n_slices is not None:
        n = int(n_slices)
        dz = extent / (n - 1)
    else:
        n = int(np.ceil(extent / dz)) + 1
        lo, hi = (int(v) for v in slices)
        if n < lo or n > hi:
            n = int(np.clip(n, lo, hi))
            dz = extent / (n - 1)
    dz = round(dz, 4)
    half = (int(in_plane) - 1) / 2 * px
    x0, y0 = round(cx - half, 4), round(cy - half, 4)
    grid = Grid((n, int(in_plane), int(in_plane)), (dz, px, px), (float(bottom), y0, x0))
    # the patient frame is LPS-aligned; only z is shifted to scanner-like table coordinates
    table_z = round(float(rng.uniform(-450, -150)), 1)
    return grid, (x0, y0, round(bottom + table_z, 4))


def _lumen(airways: Tubes) -> Tubes:
    """Airway lumens: the inner 70 % of the wall radius, minus a constant wall."""
    return Tubes(airways.p0, airways.p1, np.maximum(airways.r0 * 0.72 - 0.25, 0.2),
                 np.maximum(airways.r1 * 0.72 - 0.25, 0.2))


def _overlay(h, inside, layer, z0, z1, value) -> None:
    """Blend a tube layer into the lung voxels of slab ``h``."""
    win = layer.window(z0, z1, h.shape[1:])
    if win is None:
        return
    sub, where = win
    target = h[where]
    occ = sub.astype(F32) * F32(1 / 255)
    occ *= inside[where]
    target += occ * (F32(value) - target)


def _run(fn, items, threads: int) -> None:
    if threads <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fn, items))
