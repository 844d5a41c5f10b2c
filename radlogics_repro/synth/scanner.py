"""Scanner appearance: reconstruction-kernel blur, correlated noise, streaks, table, FOV circle.

A scan's *profile* fixes the reconstruction kernel (soft / standard / sharp: more blur goes with
less noise), the noise level (10-40 HU standard deviation in uniform areas, higher through the
shoulders), whether the table is in the image and what the scanner writes outside its circular
reconstruction field (nothing, -1024, -2048 or -3024 HU, all seen in LIDC-IDRI).

Noise is white noise blurred together with the image by the kernel, scaled so that its standard
deviation after the blur equals the profile's level: real CT noise is correlated in the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from radlogics_repro.synth.anatomy import F32, TISSUE, Anatomy
from radlogics_repro.synth.geometry import Grid, smoothstep

HU_MIN, HU_MAX = -1024.0, 3071.0
"""Range of reconstructed CT numbers (12-bit scanners) before the FOV padding value."""

_KERNELS = {  # name: (blur sigma mm range, noise HU range, probability)
    "soft": ((0.65, 0.9), (10.0, 22.0), 0.3),
    "standard": ((0.45, 0.65), (15.0, 30.0), 0.5),
    "sharp": ((0.3, 0.45), (24.0, 40.0), 0.2),
}


@dataclass(frozen=True)
class ScannerProfile:
    """Appearance parameters of one scan.

    Attributes:
        kernel: 'soft', 'standard' or 'sharp'.
        blur_mm: in-plane Gaussian sigma of the kernel, mm.
        noise_hu: noise standard deviation after the blur, HU.
        shoulder_noise: extra relative noise at the level of the shoulders.
        pad_hu: value outside the reconstruction circle (None: the circle is not marked).
        table: whether the patient table is in the image.
        streaks: streak artefacts across the upper chest.
    """

    kernel: str
    blur_mm: float
    noise_hu: float
    shoulder_noise: float
    pad_hu: float | None
    table: bool
    streaks: bool

    def as_dict(self) -> dict:
        """Plain dict (for dataset.json)."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


SITE_KEYS = ("kernel", "blur_mm", "noise_hu")
"""What a site profile may fix (see :func:`sample_profile`)."""


def sample_profile(rng: np.random.Generator, *, streaks: bool, site: dict | None = None) -> ScannerProfile:
    """Draw a scanner profile.

    Args:
        rng: the scan's generator.
        streaks: whether the scan has streak artefacts.
        site: a site's scanner, every scan alike: ``kernel`` ('soft' / 'standard' / 'sharp'),
            ``blur_mm`` and ``noise_hu`` as (low, high) ranges (mm, HU) to draw from; a missing or
            None entry keeps the usual draw (the blur and noise ranges then follow the site's
            kernel). None or empty: the usual mix of scanners. The draws without a site are the
            same as before sites existed, so existing datasets do not change.
    """
    names = list(_KERNELS)
    kernel = str(rng.choice(names, p=[_KERNELS[n][2] for n in names]))
    blur, noise, _ = _KERNELS[kernel]
    pad = rng.choice([None, -1024.0, -2048.0, -3024.0], p=[0.4, 0.15, 0.3, 0.15])
    profile = ScannerProfile(kernel, float(rng.uniform(*blur)), float(rng.uniform(*noise)),
                             float(rng.uniform(0.2, 0.6)), None if pad is None else float(pad),
                             bool(rng.random() < 0.85), bool(streaks))
    site = check_site(site)
    if not site:
        return profile
    kernel = str(site.get("kernel", kernel))
    blur_range = tuple(site.get("blur_mm", _KERNELS[kernel][0]))
    noise_range = tuple(site.get("noise_hu", _KERNELS[kernel][1]))
    return replace(profile, kernel=kernel, blur_mm=float(rng.uniform(*blur_range)),
                   noise_hu=float(rng.uniform(*noise_range)))


def check_site(site: dict | None) -> dict:
    """A site profile (see :func:`sample_profile`) with None entries dropped; ValueError names the
    bad entry."""
    site = {k: v for k, v in (site or {}).items() if v is not None}
    unknown = sorted(set(site) - set(SITE_KEYS))
    if unknown:
        raise ValueError(f"scanner: unknown key(s) {unknown}; expected {list(SITE_KEYS)}")
    if "kernel" in site and site["kernel"] not in _KERNELS:
        raise ValueError(f"scanner.kernel must be one of {list(_KERNELS)}, got {site['kernel']!r}")
    for key in ("blur_mm", "noise_hu"):
        if key not in site:
            continue
        try:
            low, high = (float(v) for v in site[key])
        except (TypeError, ValueError):
            raise ValueError(f"scanner.{key} must be [low, high], got {site[key]!r}") from None
        if not 0.0 <= low <= high:
            raise ValueError(f"scanner.{key} must satisfy 0 <= low <= high, got {site[key]!r}")
        site[key] = (low, high)
    return site


@dataclass
class ScannerArrays:
    """Per-scan 2-D arrays and constants for :func:`apply_scanner`."""

    profile: ScannerProfile
    blur_px: tuple[float, float]
    noise_amp: float  # amplitude of the uniform white noise before the blur
    table_hu: np.ndarray | None  # (ny, nx) float32, NaN where no table
    outside_fov: np.ndarray | None  # (ny, nx) bool
    streak: np.ndarray | None  # (ny, nx) float32 HU pattern
    streak_z: np.ndarray | None  # (nz,) float32 weights
    noise_z: np.ndarray  # (nz,) relative noise level per slice


def prepare_scanner(profile: ScannerProfile, an: Anatomy, grid: Grid, body_bottom_y: float,
                    rng: np.random.Generator) -> ScannerArrays:
    """Precompute the 2-D table, FOV circle and streak arrays of one scan.

    Args:
        body_bottom_y: largest Y (mm, scan frame) reached by the body surface.
    """
    dz, dy, dx = grid.spacing
    blur_px = (profile.blur_mm / dy, profile.blur_mm / dx)
    delta = np.zeros((15, 15), np.float64)
    delta[7, 7] = 1.0
    kern = ndi.gaussian_filter(delta, blur_px, truncate=3.0) if max(blur_px) > 0.05 else delta
    gain = float(np.sqrt((kern ** 2).sum()) * np.sqrt(1 / 12))
    noise_amp = profile.noise_hu / gain
    X = grid.xs()[None, :]
    Y = grid.ys()[:, None]
    table = None
    if profile.table:
        table = _table(X, Y, body_bottom_y + rng.uniform(0.5, 6.0), rng)
    outside = None
    if profile.pad_hu is not None:
        cx = grid.origin[2] + (grid.shape[2] - 1) * dx / 2
        cy = grid.origin[1] + (grid.shape[1] - 1) * dy / 2
        radius = min(grid.shape[2] * dx, grid.shape[1] * dy) / 2
        outside = (X - cx) ** 2 + (Y - cy) ** 2 > radius ** 2
    zs = grid.zs()
    shoulder = smoothstep((zs - (an.apex_z - 40.0)) / 80.0)
    noise_z = (1 + profile.shoulder_noise * shoulder).astype(F32)
    streak = streak_z = None
    if profile.streaks:
        streak = _streak_pattern(X, Y, an, rng)
        centre = an.apex_z - rng.uniform(10, 60)
        streak_z = np.exp(-0.5 * ((zs - centre) / rng.uniform(10, 25)) ** 2).astype(F32)
    return ScannerArrays(profile, blur_px, float(noise_amp), table, outside, streak, streak_z,
                         noise_z)


def _table(X, Y, top_y: float, rng) -> np.ndarray:
    """Carbon-fibre table top (two thin shells around a foam core) and a lower support line."""
    half = rng.uniform(200, 260)
    surf = top_y - rng.uniform(25, 50) * (X / half) ** 2  # concave, edges higher
    depth = Y - surf
    core = rng.uniform(12, 30)
    hu = np.full(np.broadcast_shapes(X.shape, Y.shape), np.nan, F32)
    inside = np.abs(X) < half
    shell = rng.uniform(150, 400)
    hu[inside & (depth >= 0) & (depth < core)] = rng.uniform(-930, -820)
    hu[inside & (depth >= 0) & (depth < 2.5)] = shell
    hu[inside & (depth >= core - 2.5) & (depth < core)] = shell
    if rng.random() < 0.4:  # support frame further down
        low = rng.uniform(40, 70)
        hu[(np.abs(X) < 0.8 * half) & (depth >= low) & (depth < low + 3.0)] = rng.uniform(100, 300)
    return hu


def _streak_pattern(X, Y, an: Anatomy, rng) -> np.ndarray:
    """Bright and dark thin streaks through the upper chest (photon starvation, shoulders)."""
    out = np.zeros(np.broadcast_shapes(X.shape, Y.shape), F32)
    for j in range(int(rng.integers(3, 8))):
        theta = rng.normal(0, 0.25) + (0 if j % 2 else np.pi / 2 * rng.uniform(-0.3, 0.3))
        px, py = rng.normal(0, 0.25 * an.cav_w), rng.normal(0, 0.2 * an.cav_ant)
        dist = np.abs((X - px) * np.sin(theta) - (Y - py) * np.cos(theta))
        width = rng.uniform(0.6, 2.0)
        amp = rng.uniform(40, 160) * (1 if j % 2 else -1)
        out += (amp * np.exp(-0.5 * (dist / width) ** 2)).astype(F32)
    return out


def apply_scanner(hu: np.ndarray, arrays: ScannerArrays, z0: int, rng: np.random.Generator,
                  *, noise: bool = True, tissue: np.ndarray | None = None) -> None:
    """Table, streaks, kernel blur, noise, CT-number range and FOV padding, in place, on the
    slab of slices ``z0:z0 + len(hu)`` (``tissue``: optional codes to mark the table in)."""
    z1 = z0 + hu.shape[0]
    if arrays.table_hu is not None:
        has = ~np.isnan(arrays.table_hu)
        where = has[None] & (hu < -900)
        np.copyto(hu, np.nan_to_num(arrays.table_hu)[None], where=where)
        if tissue is not None:
            np.copyto(tissue, np.uint8(TISSUE["table"]), where=where)
    if arrays.streak is not None:
        hu += arrays.streak[None] * arrays.streak_z[z0:z1, None, None]
    if noise:
        white = rng.random(hu.shape, dtype=F32)
        white -= F32(0.5)
        white *= (F32(arrays.noise_amp) * arrays.noise_z[z0:z1])[:, None, None]
        hu += white
        del white
        if max(arrays.blur_px) > 0.05:
            ndi.gaussian_filter(hu, (0, *arrays.blur_px), output=hu, truncate=3.0)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    np.rint(hu, out=hu)
    if arrays.outside_fov is not None:
        np.copyto(hu, F32(arrays.profile.pad_hu), where=arrays.outside_fov[None])
