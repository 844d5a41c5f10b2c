"""COVID-19-like findings, their course over time, and the confounders of negative cases.

Findings (typical CT pattern of COVID-19 pneumonia): ground-glass opacities (GGO, -750..-350 HU),
bilateral, peripheral and subpleural, posterior and lower-zone predominant, with soft edges;
consolidation cores (-150..+50 HU) at the advanced stage; crazy paving (GGO crossed by a polygonal
net of thickened septa). Each lesion is an irregular soft-edged ellipsoid ("blob") flattened
against the pleura. Over time (days since symptom onset) lesions appear, grow to a peak at about
day 7-13, consolidate, then shrink and fade, leaving faint residual GGO.

Confounders (no lesion label): dependent atelectasis (a thin posterior subpleural band),
small solid nodules, emphysema (clusters of -950..-1000 HU holes), plate-like scars; streak
artefacts are added by :mod:`radlogics_repro.synth.scanner`.

Lesion ground truth: a voxel is GGO (1) when its lesion weight is >= 0.5 and the lesion raises
it to at least -750 HU before noise, consolidation (2) where the core weight is >= 0.5; both are
clipped to the lung mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from radlogics_repro.synth.anatomy import F32, LEFT, RIGHT, Anatomy, cavity_norm, dome_z
from radlogics_repro.synth.geometry import Breath, Grid, smoothstep

GGO, CONSOLIDATION = 1, 2
"""Lesion mask labels."""

GGO_HU = (-750.0, -350.0)
CONSOLIDATION_HU = (-150.0, 50.0)
GGO_MIN_VISIBLE_HU = -750.0


@dataclass
class Blob:
    """An irregular soft-edged ellipsoid in the reference frame.

    Attributes:
        kind: 'lesion', 'nodule', 'hole' (emphysema) or 'scar'.
        center: (3,) X, Y, Z mm.
        radii: (3,) half-axes along the columns of ``rot``, mm.
        rot: (3, 3) orthonormal axes (columns).
        waves: (m, 3) wave vectors in normalised units, with ``amps`` (m,) and ``phases`` (m,):
            the normalised radius is multiplied by 1 + sum(amps * cos(waves . u + phases)).
        edge: half-width of the soft edge in normalised radius units.
        hu: target HU at the centre.
        core: consolidation core size as a fraction of the lesion (0 = none).
        core_hu: HU of the consolidation core.
        paving: HU added on the crazy-paving septa (0 = none); ``paving_mm`` is the net size.
    """

    kind: str
    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    waves: np.ndarray
    amps: np.ndarray
    phases: np.ndarray
    edge: float
    hu: float
    core: float = 0.0
    core_hu: float = 0.0
    paving: float = 0.0
    paving_mm: float = 6.0
    paving_dirs: np.ndarray = field(default_factory=lambda: np.eye(3))


@dataclass
class LesionSeed:
    """A lesion's fixed shape and its own timing."""

    blob: Blob
    onset: float  # day (since symptom onset) the lesion appears
    peak: float  # day of its maximum size
    tau: float  # resolution time constant, days
    residual: float  # size fraction left after resolution
    cons_max: float  # largest consolidation core fraction
    paving: float  # crazy-paving strength at the peak, HU


@dataclass
class Disease:
    """A patient's COVID-19-like course (empty for negative patients)."""

    covid: bool
    severity: str
    onset_offset: float  # days since symptom onset at dataset day 0
    peak_day: float
    seeds: list[LesionSeed]

    def summary(self, day: float) -> dict:
        """Plain description at ``day`` (for dataset.json)."""
        return {"covid": self.covid, "severity": self.severity,
                "days_since_onset": round(self.onset_offset + day, 1),
                "n_lesions": len(self.blobs_at(day)) if self.covid else 0}

    def blobs_at(self, day: float) -> list[Blob]:
        """The lesions present ``day`` days after the first scan, sized for that day."""
        if not self.covid:
            return []
        t = self.onset_offset + day
        out = []
        for s in self.seeds:
            f = size_factor(t, s)
            if f <= 0:
                continue
            b = s.blob
            scale = f ** (1 / 3)
            fade = 1.0 if t <= s.peak else 0.55 + 0.45 * f
            hu = -870.0 + (b.hu + 870.0) * fade
            cons = s.cons_max * _bump(t, s.peak + 1.5, 5.0)
            pav = s.paving * _bump(t, s.peak, 4.5)
            out.append(Blob("lesion", b.center, b.radii * scale, b.rot, b.waves, b.amps,
                            b.phases, b.edge, max(hu, -740.0), core=cons, core_hu=b.core_hu,
                            paving=pav, paving_mm=b.paving_mm, paving_dirs=b.paving_dirs))
        return out


def size_factor(t: float, s: LesionSeed) -> float:
    """Relative lesion volume (0..1) at day ``t`` since symptom onset."""
    if t < s.onset:
        return 0.0
    if t <= s.peak:
        return float(0.15 + 0.85 * smoothstep(np.array((t - s.onset) / (s.peak - s.onset))))
    return float(s.residual + (1 - s.residual) * np.exp(-(t - s.peak) / s.tau))


def _bump(t: float, centre: float, width: float) -> float:
    return float(np.exp(-0.5 * ((t - centre) / width) ** 2))


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


@dataclass
class CoarseLung:
    """Reference-frame lung labels on a coarse isotropic grid, with placement helpers."""

    grid: Grid
    labels: np.ndarray  # (z, y, x) uint8
    wall_dist: np.ndarray  # (z, y, x) float32 mm to the chest wall or diaphragm
    wall_grad: np.ndarray  # (3, z, y, x) gradient of wall_dist (X, Y, Z order)

    def points(self, side: int) -> np.ndarray:
        """Centres (n, 3) of the coarse voxels of lung ``side`` as (X, Y, Z) mm."""
        z, y, x = np.nonzero(self.labels == side)
        g = self.grid
        return np.stack([g.origin[2] + x * g.spacing[2], g.origin[1] + y * g.spacing[1],
                         g.origin[0] + z * g.spacing[0]], axis=1)


def make_coarse_lung(an: Anatomy, labels_fn, step_mm: float = 4.0) -> CoarseLung:
    """Evaluate ``labels_fn(X, Y, Z)`` (reference frame) on a coarse grid around the lungs."""
    x = np.arange(-an.cav_w - 8, an.cav_w + 8, step_mm, dtype=F32)
    y = np.arange(-an.cav_ant - 8, an.cav_post + 8, step_mm, dtype=F32)
    z = np.arange(-an.recess_mm - 2 * an.left_dome_drop - 40, an.apex_z + 8, step_mm, dtype=F32)
    grid = Grid((len(z), len(y), len(x)), (step_mm,) * 3, (float(z[0]), float(y[0]), float(x[0])))
    Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]
    labels = labels_fn(X, Y, Z)
    space = (cavity_norm(an, X, Y, Z) < 1) & (Z > dome_z(an, X, Y))
    dist = ndi.distance_transform_edt(space, sampling=step_mm).astype(F32)
    gz, gy, gx = np.gradient(dist, step_mm)
    return CoarseLung(grid, labels, dist, np.stack([gx, gy, gz]).astype(F32))


def _random_rotation(rng: np.random.Generator, first_axis: np.ndarray | None = None) -> np.ndarray:
    """Orthonormal axes (columns); the first one is ``first_axis`` when given."""
    a = rng.normal(size=(3, 3))
    if first_axis is not None:
        a[:, 0] = first_axis
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    if first_axis is not None and q[:, 0] @ first_axis < 0:
        q[:, 0] *= -1
    return q


def _waves(rng: np.random.Generator, n: int, freq: tuple[float, float], amp: float):
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * rng.uniform(*freq, size=(n, 1))
    amps = rng.uniform(0.3, 1.0, n)
    amps *= amp / amps.sum()
    return k, amps, rng.uniform(0, 2 * np.pi, n)


def _sample_site(rng, coarse: CoarseLung, an: Anatomy, side: int, weight_fn) -> tuple:
    """A coarse lung voxel of ``side`` drawn with probability ``weight_fn``; returns the point,
    its distance to the wall and the unit normal toward the wall."""
    pts = coarse.points(side)
    if len(pts) == 0:
        return None
    z, y, x = np.nonzero(coarse.labels == side)
    d = coarse.wall_dist[z, y, x]
    w = weight_fn(pts, d)
    w = w / w.sum()
    i = rng.choice(len(pts), p=w)
    g = -coarse.wall_grad[:, z[i], y[i], x[i]].astype(float)
    n = np.linalg.norm(g)
    normal = g / n if n > 1e-6 else np.array([0.0, 1.0, 0.0])
    jitter = rng.uniform(-0.5, 0.5, 3) * coarse.grid.spacing[0]
    return pts[i] + jitter, float(d[i]), normal


def covid_weight(an: Anatomy):
    """Placement weight of COVID lesions: peripheral, posterior, lower zones."""
    def fn(pts, d):
        post = np.clip((pts[:, 1] + an.cav_ant) / (an.cav_ant + an.cav_post), 0, 1)
        low = np.clip((an.apex_z - pts[:, 2]) / (an.apex_z + an.recess_mm), 0, 1)
        return np.exp(-d / 9.0) * (0.2 + post) ** 1.5 * (0.2 + low) ** 1.6 + 1e-9
    return fn


def sample_disease(rng: np.random.Generator, an: Anatomy, coarse: CoarseLung, covid: bool,
                   *, longitudinal: bool) -> Disease:
    """Draw a COVID-like course (or an empty one for negative patients)."""
    if not covid:
        return Disease(False, "none", 0.0, 0.0, [])
    severity = rng.choice(["mild", "moderate", "severe"], p=[0.35, 0.4, 0.25])
    n_lesions = {"mild": rng.integers(1, 5), "moderate": rng.integers(3, 11),
                 "severe": rng.integers(8, 21)}[severity]
    r_lo, r_hi = {"mild": (8.0, 25.0), "moderate": (10.0, 40.0), "severe": (15.0, 60.0)}[severity]
    k = an.frame
    peak_day = rng.uniform(7, 13)
    onset_offset = rng.uniform(1, 4) if longitudinal else rng.uniform(1, 21)
    bilateral = n_lesions >= 2 and rng.random() < 0.85
    first_side = int(rng.choice([RIGHT, LEFT]))
    weight = covid_weight(an)
    seeds = []
    for i in range(int(n_lesions)):
        side = (first_side if i % 2 == 0 else 3 - first_side) if bilateral else first_side
        if bilateral and i >= 2 and rng.random() < 0.3:
            side = int(rng.choice([RIGHT, LEFT]))
        site = _sample_site(rng, coarse, an, side, weight)
        if site is None:
            continue
        p, d, normal = site
        r = np.exp(rng.uniform(np.log(max(r_lo, 12.0)), np.log(r_hi))) * k
        radii = np.array([r * rng.uniform(0.45, 0.7), r * rng.uniform(0.85, 1.25),
                          r * rng.uniform(0.8, 1.3)])
        centre = p + normal * max(d - 0.45 * radii[0], 0.0)  # abut the pleura
        waves, amps, phases = _waves(rng, 8, (1.5, 6.0), rng.uniform(0.25, 0.4))
        onset = rng.uniform(-3.0, 0.0) if i == 0 else rng.uniform(-3.0, peak_day - 3.0)
        peak = peak_day + rng.uniform(-1.5, 1.5)
        advanced = severity != "mild" and rng.random() < 0.6
        blob = Blob("lesion", centre, radii, _random_rotation(rng, normal), waves, amps, phases,
                    edge=rng.uniform(0.25, 0.4), hu=rng.uniform(-700, -380),
                    core_hu=rng.uniform(*CONSOLIDATION_HU) * 0.8 + 5,
                    paving_mm=rng.uniform(5, 9), paving_dirs=_random_rotation(rng))
        main = LesionSeed(blob, onset=min(onset, peak - 2.0), peak=peak,
                          tau=rng.uniform(5, 9), residual=rng.uniform(0.15, 0.35),
                          cons_max=rng.uniform(0.35, 0.7) if advanced else 0.0,
                          paving=rng.uniform(120, 260) if rng.random() < 0.35 else 0.0)
        seeds.append(main)
        seeds.extend(_satellites(rng, main, int(rng.integers(1, 4))))
    return Disease(True, str(severity), float(onset_offset), float(peak_day), seeds)


def _satellites(rng: np.random.Generator, main: LesionSeed, n: int) -> list[LesionSeed]:
    """Smaller blobs spread along the pleura around a lesion, with its timing: together they
    make one patchy, multi-lobed opacity instead of a single ellipsoid."""
    b = main.blob
    out = []
    for _ in range(n):
        offset = b.rot[:, 1] * rng.uniform(-1, 1) * b.radii[1] + b.rot[:, 2] * rng.uniform(-1, 1) \
            * b.radii[2] + b.rot[:, 0] * rng.uniform(-0.2, 0.5) * b.radii[0]
        waves, amps, phases = _waves(rng, 8, (1.5, 6.0), rng.uniform(0.25, 0.4))
        blob = Blob("lesion", b.center + offset, b.radii * rng.uniform(0.4, 0.8, 3),
                    _random_rotation(rng, b.rot[:, 0]), waves, amps, phases, edge=b.edge,
                    hu=float(np.clip(b.hu + rng.normal(0, 50), -700, -380)), core_hu=b.core_hu,
                    paving_mm=b.paving_mm, paving_dirs=_random_rotation(rng))
        out.append(LesionSeed(blob, onset=main.onset + rng.uniform(0, 2), peak=main.peak,
                              tau=main.tau, residual=main.residual,
                              cons_max=main.cons_max * rng.uniform(0.5, 1.0),
                              paving=main.paving))
    return out


@dataclass
class Confounders:
    """Non-COVID findings of one patient (stable over time)."""

    blobs: list[Blob]
    atelectasis: dict | None  # {'thickness': mm, 'hu': HU, 'phase': rad, 'extent': 0..1}
    streaks: bool
    names: list[str]


def sample_confounders(rng: np.random.Generator, an: Anatomy, coarse: CoarseLung,
                       covid: bool) -> Confounders:
    """Draw confounders: at least one for negative patients, fewer for positive ones."""
    p = {"atelectasis": 0.55, "nodules": 0.45, "emphysema": 0.35, "scar": 0.3, "streaks": 0.3}
    if covid:
        p = {k: v * 0.5 for k, v in p.items()}
    chosen = [name for name, prob in p.items() if rng.random() < prob]
    if not covid and not chosen:
        chosen = [str(rng.choice(list(p)))]
    k = an.frame
    blobs: list[Blob] = []
    anywhere = (lambda pts, d: np.ones(len(pts)))  # noqa: E731
    upper = (lambda pts, d: np.exp(-d / 15.0)  # noqa: E731
             * (0.1 + np.clip((pts[:, 2] + an.recess_mm) / (an.apex_z + an.recess_mm), 0, 1)) ** 2)
    lower = (lambda pts, d: 0.1 + np.clip(-pts[:, 2] / an.apex_z + 0.6, 0, 1))  # noqa: E731
    if "nodules" in chosen:
        for _ in range(int(rng.integers(1, 5))):
            site = _sample_site(rng, coarse, an, int(rng.choice([RIGHT, LEFT])), anywhere)
            if site is None:
                continue
            r = rng.uniform(2.0, 6.0)
            w, a, ph = _waves(rng, 4, (1.0, 3.0), 0.12)
            blobs.append(Blob("nodule", site[0], np.array([r, r, r]) * rng.uniform(0.85, 1.15, 3),
                              _random_rotation(rng), w, a, ph, edge=0.12,
                              hu=rng.uniform(10, 70)))
    if "emphysema" in chosen:
        for _ in range(int(rng.integers(1, 4))):
            site = _sample_site(rng, coarse, an, int(rng.choice([RIGHT, LEFT])), upper)
            if site is None:
                continue
            centre = site[0]
            spread = rng.uniform(12, 30) * k
            for _ in range(int(rng.integers(6, 25))):
                c = centre + rng.normal(0, spread / 2, 3)
                r = rng.uniform(1.5, 5.5)
                w, a, ph = _waves(rng, 3, (1.0, 2.5), 0.2)
                blobs.append(Blob("hole", c, np.array([r, r, r]) * rng.uniform(0.8, 1.2, 3),
                                  _random_rotation(rng), w, a, ph, edge=0.3,
                                  hu=rng.uniform(-1000, -960)))
    if "scar" in chosen:
        for _ in range(int(rng.integers(1, 3))):
            site = _sample_site(rng, coarse, an, int(rng.choice([RIGHT, LEFT])), lower)
            if site is None:
                continue
            tilt = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0])
            radii = np.array([rng.uniform(0.8, 1.6), rng.uniform(15, 30) * k,
                              rng.uniform(8, 18) * k])
            w, a, ph = _waves(rng, 4, (1.0, 3.0), 0.15)
            blobs.append(Blob("scar", site[0], radii, _random_rotation(rng, tilt / np.linalg.norm(tilt)),
                              w, a, ph, edge=0.35, hu=rng.uniform(-250, 0)))
    atel = None
    if "atelectasis" in chosen:
        atel = {"thickness": float(rng.uniform(3, 9)), "hu": float(rng.uniform(-450, -150)),
                "phase": float(rng.uniform(0, 2 * np.pi)), "extent": float(rng.uniform(0.3, 0.6))}
    return Confounders(blobs, atel, "streaks" in chosen, chosen)


# ---------------------------------------------------------------------------------------------
# Rendering into a scan
# ---------------------------------------------------------------------------------------------


def _blob_box(blob: Blob, breath: Breath, grid: Grid):
    """Voxel index box (z0, z1, y0, y1, x0, x1) of a blob in the scan, or None when outside."""
    reach = float(blob.radii.max()) * (1 + blob.edge + float(blob.amps.sum())) + 1.0
    c = breath.scan_points(blob.center)
    half = np.array([reach * breath.sxy, reach * breath.sxy, reach * breath.sz])
    lo_mm, hi_mm = c - half, c + half
    sp = np.array([grid.spacing[2], grid.spacing[1], grid.spacing[0]])
    org = np.array([grid.origin[2], grid.origin[1], grid.origin[0]])
    lo = np.maximum(np.floor((lo_mm - org) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((hi_mm - org) / sp).astype(int) + 1,
                    [grid.shape[2], grid.shape[1], grid.shape[0]])
    if np.any(hi <= lo):
        return None
    return lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]


def _blob_fields(blob: Blob, breath: Breath, grid: Grid, box):
    """Normalised deformed radius (and the local coordinates) of a blob over its box."""
    z0, z1, y0, y1, x0, x1 = box
    zs = breath.ref_z(grid.zs()[z0:z1]) - F32(blob.center[2])
    ys = breath.ref_xy(grid.ys()[y0:y1]) - F32(blob.center[1])
    xs = breath.ref_xy(grid.xs()[x0:x1]) - F32(blob.center[0])
    q = (xs[None, None, :], ys[None, :, None], zs[:, None, None])
    u = []
    for j in range(3):
        col = blob.rot[:, j] / blob.radii[j]
        u.append((q[2] * F32(col[2]) + q[1] * F32(col[1])) + q[0] * F32(col[0]))
    rho = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
    deform = np.ones_like(rho)
    for kv, a, ph in zip(blob.waves, blob.amps, blob.phases, strict=True):
        arg = (u[0] * F32(kv[0]) + u[1] * F32(kv[1])) + u[2] * F32(kv[2])
        deform += F32(a) * np.cos(arg + F32(ph))
    return rho * deform, q


def _blobs_in_lung(blobs: list[Blob], lung: np.ndarray, breath: Breath, grid: Grid):
    """For every blob that touches the lung: ``(blob, box slice, in_lung, rho, q, w)``, where ``w``
    is its soft-edged blend weight (0..1) restricted to the lung, ``rho`` its normalised radius
    field and ``q`` its local coordinates. Blobs with no weight inside the lung are skipped."""
    for blob in blobs:
        box = _blob_box(blob, breath, grid)
        if box is None:
            continue
        sl = np.s_[box[0]:box[1], box[2]:box[3], box[4]:box[5]]
        in_lung = lung[sl] > 0
        if not in_lung.any():
            continue
        rho, q = _blob_fields(blob, breath, grid, box)
        e = F32(blob.edge)
        w = smoothstep((F32(1) + e - rho) / (2 * e)) * in_lung
        if w.any():
            yield blob, sl, in_lung, rho, q, w


def render_lesions(hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray, blobs: list[Blob],
                   breath: Breath, grid: Grid) -> None:
    """Blend COVID lesions into ``hu`` (in place) and write their labels into ``lesion``."""
    for blob, sl, in_lung, rho, q, w in _blobs_in_lung(blobs, lung, breath, grid):
        base = hu[sl]
        target = F32(blob.hu) + F32(30.0) * _patchy(q, blob)
        if blob.paving > 0:
            target += F32(blob.paving) * _septal_lines(q, blob)
        new = base + w * (target - base)
        label = np.where((w >= 0.5) & (new >= GGO_MIN_VISIBLE_HU), np.uint8(GGO), np.uint8(0))
        if blob.core > 0.05:
            ec = F32(0.18)
            rho_c = rho * (F32(1.0) + _core_bumps(q, blob))  # irregular core outline
            wc = smoothstep((F32(blob.core) * (1 + ec) - rho_c) / (2 * ec * F32(blob.core)))
            wc *= in_lung
            new += wc * (F32(blob.core_hu) - new)
            label[wc >= 0.5] = CONSOLIDATION
        np.maximum(base, new, out=base)
        np.maximum(lesion[sl], label, out=lesion[sl])


def _patchy(q, blob: Blob) -> np.ndarray:
    """About -1..1 smooth heterogeneity inside a lesion: three waves of 5-13 mm period in
    different directions, added."""
    out = None
    for j, period in ((0, 5.0), (1, 8.0), (2, 13.0)):
        d = blob.paving_dirs[:, j] * (2 * np.pi / period)
        s = (q[2] * F32(d[2]) + q[1] * F32(d[1])) + q[0] * F32(d[0])
        ph = float(blob.phases[j % len(blob.phases)]) if len(blob.phases) else 0.0
        w = np.cos(s + F32(ph)) * F32(0.45)
        out = w if out is None else out + w
    return out


def _core_bumps(q, blob: Blob) -> np.ndarray:
    """Smooth relative deformation (about +-0.2) of the consolidation core's outline, with
    bumps about half the lesion size."""
    period = F32(0.9 * float(np.mean(blob.radii)) + 1.0)
    out = None
    for j, amp in ((0, 0.12), (1, 0.08), (2, 0.06)):
        d = blob.paving_dirs[:, j] * (2 * np.pi) / period * (1 + 0.4 * j)
        s = (q[2] * F32(d[2]) + q[1] * F32(d[1])) + q[0] * F32(d[0])
        term = F32(amp) * np.cos(s + F32(1.7 * j + 0.3))
        out = term if out is None else out + term
    return out


def _septal_lines(q, blob: Blob) -> np.ndarray:
    """0..1 pattern of a polygonal net of thin lines: the borders of 3-D Voronoi cells around
    jittered points of a ``paving_mm`` grid (secondary lobules with thickened septa).

    Distances to the two nearest cell points (F1 < F2) are found among the 27 neighbouring grid
    cells of every voxel; a septum is where F2 - F1 is small. The jitter comes from a hash of
    the cell index, so the net is fixed in the lesion (it moves with breathing)."""
    period = F32(blob.paving_mm)
    rot = blob.paving_dirs.astype(F32)
    # voxel positions in the lesion's paving frame, in cell units
    p = [(q[2] * rot[2, j] + q[1] * rot[1, j]) + q[0] * rot[0, j] for j in range(3)]
    p = [v / period for v in p]
    cell = [np.floor(v).astype(np.int32) for v in p]
    frac = [v - c for v, c in zip(p, cell, strict=True)]
    salt = int(abs(float(blob.phases[0])) * 1e6) if len(blob.phases) else 0
    f1 = f2 = None
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ci = (cell[0] + dx, cell[1] + dy, cell[2] + dz)
                h = (ci[0] * 73856093) ^ (ci[1] * 19349663) ^ (ci[2] * 83492791) ^ salt
                jit = [((h >> sh) & 1023).astype(F32) * F32(0.8 / 1023) + F32(0.1)
                       for sh in (0, 10, 20)]
                d2 = (frac[0] - (dx + jit[0])) ** 2
                d2 += (frac[1] - (dy + jit[1])) ** 2
                d2 += (frac[2] - (dz + jit[2])) ** 2
                if f1 is None:
                    f1, f2 = d2, np.full_like(d2, np.inf)
                else:
                    f2 = np.minimum(f2, np.maximum(f1, d2))
                    f1 = np.minimum(f1, d2)
    gap = (np.sqrt(f2) - np.sqrt(f1)) * period  # ~ twice the distance to the border, mm
    return np.clip(F32(1.0) - gap / F32(1.4), 0, 1)


def render_confounders(hu: np.ndarray, lung: np.ndarray, conf: Confounders, breath: Breath,
                       grid: Grid) -> None:
    """Blend nodules, emphysema holes, scars and dependent atelectasis into ``hu`` (lung only)."""
    for blob, sl, _, _, _, w in _blobs_in_lung(conf.blobs, lung, breath, grid):
        base = hu[sl]
        new = base + w * (F32(blob.hu) - base)
        if blob.kind == "hole":
            np.minimum(base, new, out=base)
        else:
            np.maximum(base, new, out=base)
    if conf.atelectasis:
        _dependent_band(hu, lung, conf.atelectasis, breath, grid)


def _dependent_band(hu, lung, atel: dict, breath: Breath, grid: Grid) -> None:
    """A thin band of denser lung along the posterior pleura of the lower lungs.

    Works on the few rows above the posterior-most lung row of every (z, x) column only.
    """
    has = np.nonzero(lung.any(axis=(1, 2)))[0]
    if len(has) == 0:
        return
    zlo, zhi = has[0], has[-1] + 1
    ztop = zlo + max(1, int(round((zhi - zlo) * atel["extent"])))
    sub = lung[zlo:ztop] > 0
    ny = sub.shape[1]
    last = ny - 1 - np.argmax(sub[:, ::-1, :], axis=1)  # (z, x) posterior-most lung row
    has_col = sub.any(axis=1)
    dy = float(grid.spacing[1])
    n_rows = int(np.ceil((atel["thickness"] + 3.0) / dy)) + 1
    k = np.arange(n_rows)[None, :, None]
    rows = np.clip(last[:, None, :] - k, 0, ny - 1)  # (z, k, x)
    depth_mm = (k * dy).astype(F32)
    zz = np.linspace(0, 1, ztop - zlo, dtype=F32)[:, None, None]
    xx = np.linspace(0, 2 * np.pi, sub.shape[2], dtype=F32)[None, None, :]
    thick = F32(atel["thickness"]) * (0.6 + 0.4 * np.cos(3 * xx + F32(atel["phase"]))) \
        * (1 - zz) ** 0.5
    w = smoothstep((thick - depth_mm) / F32(2.5))
    w *= np.take_along_axis(sub, rows, axis=1) & has_col[:, None, :]
    base = np.take_along_axis(hu[zlo:ztop], rows, axis=1)
    new = np.maximum(base, base + w * (F32(atel["hu"]) - base))
    np.put_along_axis(hu[zlo:ztop], rows, new, axis=1)
