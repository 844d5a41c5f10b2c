"""Analytic thorax: body wall, bones, mediastinum, heart, abdomen and the two lungs, in HU.

Every structure is an analytic function of the patient-frame coordinates (see
:mod:`radlogics_repro.synth.geometry`). Shapes are generalised superellipses whose axes vary with
Z, so an in-plane shape costs one broadcast sum of a (z, 1, x) and a (z, y, 1) term per slab;
ellipsoids (heart, spleen, stomach) add one cross term. Rendering runs slab by slab (a few slices
at a time, cache friendly) and never loops over voxels.

HU used (non-contrast chest CT, calibrated on LIDC-IDRI slices read with pydicom: lung parenchyma
median about -880 with a 20-40 HU anterior-posterior gradient, subcutaneous fat about -95, muscle
about 45): air -1000, fat -100..-85, muscle 40..55, blood and heart 35..50, liver 50..65, bone
cortex 750..1100 and marrow 300..400 (the 300..1200 bone range), costal cartilage 130.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radlogics_repro.synth.geometry import Breath, Grid, ramp, smoothstep

F32 = np.float32

RIGHT, LEFT = 1, 2
"""Lung labels: patient's right lung (low x in canonical arrays) and left lung."""

TISSUE = {"air": 0, "fat": 1, "soft": 2, "bone": 3, "cartilage": 4, "lung": 5, "blood": 6,
          "organ": 7, "gas": 8, "table": 9, "cable": 10}
"""Codes of the optional tissue map (what each voxel was painted as, before lesions and noise):
soft = muscle, skin, diaphragm, vessel and airway walls, discs, spinal canal; organ = liver,
spleen, stomach; gas = air inside the body (airways, stomach, oesophagus)."""
_T = TISSUE


class Canvas:
    """HU array being painted, with an optional tissue-code array painted alongside."""

    def __init__(self, hu: np.ndarray, tissue: np.ndarray | None):
        self.hu = hu
        self.tissue = tissue

    def paint(self, value, code: str, where) -> None:
        """Set ``hu`` to ``value`` (scalar or broadcastable) and the tissue to ``code``."""
        np.copyto(self.hu, np.asarray(value, dtype=F32), where=where)
        if self.tissue is not None:
            np.copyto(self.tissue, np.uint8(_T[code]), where=where)

    def label(self, code: str, where, box=None) -> None:
        """Set only the tissue code (e.g. where a blended tube is at least half present)."""
        if self.tissue is not None:
            target = self.tissue if box is None else self.tissue[box]
            np.copyto(target, np.uint8(_T[code]), where=where)

N_RIBS = 12
_RIB_END = np.array([0.55, 0.93, 0.95, 0.96, 0.96, 0.95, 0.93, 0.86, 0.80, 0.72, 0.45, 0.32])
_RIB_CARTILAGE = np.array([0.50, 0.82, 0.84, 0.84, 0.83, 0.82, 0.80, 0.74, 0.70, 0.64, 1.0, 1.0])


@dataclass(frozen=True)
class Anatomy:
    """Patient-specific shape and density parameters (reference frame: full inspiration).

    All lengths in mm, densities in HU. ``*_w`` are lateral half-widths, ``*_ant`` / ``*_post``
    anterior / posterior half-depths from the body centre; ``p*`` are superellipse exponents.
    """

    fov_mm: float
    frame: float  # skeletal size relative to a medium adult (scales lungs, heart, vessels)
    # body outline and wall
    body_w: float
    body_ant: float
    body_post: float
    body_px: float
    body_pya: float
    body_pyp: float
    shoulder: float
    skin_mm: float
    fat_lat: float
    fat_ant: float
    fat_post: float
    # thoracic cavity (inner chest wall / parietal pleura)
    cav_w: float
    cav_ant: float
    cav_post: float
    cav_px: float
    cav_pya: float
    cav_pyp: float
    cav_top: float  # relative cavity size at the thoracic inlet
    # cranio-caudal landmarks (Z = 0 at the top of the right dome)
    apex_z: float
    recess_mm: float  # depth of the costophrenic recess below the dome top
    left_dome_drop: float
    carina_z: float
    # lung apices
    apex_x: float
    apex_y: float
    apex_cap: float  # height of the rounded apical dome
    # mediastinum
    mid_x: float
    med_ant: float
    med_mid_top: float
    med_mid_low: float
    # heart (ellipsoid, long axis rotated toward left-anterior)
    heart_x: float
    heart_y: float
    heart_z: float
    heart_a: float
    heart_b: float
    heart_c: float
    heart_angle: float
    # spine
    vb_y: float
    vb_r: float
    vert_len: float
    vert_phase: float
    disc_mm: float
    # ribs and sternum
    rib_top: float
    rib_step: float
    rib_drop: float
    rib_h: float
    rib_t: float
    sternum_w: float
    # abdomen
    liver_x: float
    stomach_gas: float  # fraction of the stomach height filled with gas (0 = none)
    # densities
    lung_hu: float
    lung_grad: float
    fat_hu: float
    muscle_hu: float
    blood_hu: float
    liver_hu: float
    cortex_hu: float
    marrow_hu: float


def sample_anatomy(rng: np.random.Generator, fov_mm: float) -> Anatomy:
    """Draw one patient's anatomy that fits a ``fov_mm`` reconstruction circle."""
    u = rng.uniform
    body_w = fov_mm / 2 * u(0.82, 0.92)
    # skeletal frame relative to a medium adult: grows slowly with the body (fat takes the rest)
    k = float(np.clip((body_w / 165.0) ** 0.45 * rng.normal(1.0, 0.05), 0.82, 1.2))
    skin = u(1.6, 2.4)
    mus_lat, mus_ant, mus_post = u(10, 16) * k, u(12, 20) * k, u(24, 34) * k
    cav_w = min(u(118, 132) * k, body_w - skin - mus_lat - 4.0)
    fat_lat = body_w - skin - mus_lat - cav_w
    cav_ant = cav_w * u(0.70, 0.80)
    cav_post = cav_w * u(0.60, 0.70)
    fat_ant, fat_post = fat_lat * u(0.6, 0.9), fat_lat * u(0.4, 0.6)
    body_ant = cav_ant + mus_ant + skin + fat_ant
    body_post = cav_post + mus_post + skin + fat_post
    apex_z = u(165, 205) * np.sqrt(k)
    vb_r = u(15, 19) * np.sqrt(k)
    vb_y = cav_post - vb_r - u(2, 8)
    heart_a = u(56, 66) * k
    heart_b = u(42, 48) * k
    heart_angle = np.deg2rad(u(25, 45))
    heart_ext_y = np.sqrt((heart_a * np.sin(heart_angle)) ** 2 + (heart_b * np.cos(heart_angle)) ** 2)
    room = (vb_y - vb_r - 21.0) - (-cav_ant + 4.0)  # sternum to oesophagus
    if 2 * heart_ext_y > room:  # keep the heart in front of the oesophagus
        shrink = room / (2 * heart_ext_y)
        heart_a, heart_b, heart_ext_y = heart_a * shrink, heart_b * shrink, heart_ext_y * shrink
    heart_c = u(48, 60) * np.sqrt(k)
    left_drop = u(8, 22)
    return Anatomy(
        fov_mm=fov_mm, frame=k,
        body_w=body_w, body_ant=body_ant, body_post=body_post,
        body_px=u(2.0, 2.3), body_pya=u(1.9, 2.2), body_pyp=u(2.5, 3.0),
        shoulder=u(0.03, 0.08), skin_mm=skin,
        fat_lat=fat_lat, fat_ant=fat_ant, fat_post=fat_post,
        cav_w=cav_w, cav_ant=cav_ant, cav_post=cav_post,
        cav_px=u(2.0, 2.3), cav_pya=u(1.9, 2.2), cav_pyp=u(2.3, 2.8), cav_top=u(0.5, 0.6),
        apex_z=apex_z, recess_mm=u(45, 70) * np.sqrt(k), left_dome_drop=left_drop,
        carina_z=apex_z - u(80, 100) * np.sqrt(k),
        apex_x=0.42 * cav_w, apex_y=0.25 * cav_post, apex_cap=u(0.40, 0.50) * apex_z,
        mid_x=u(-4, 4), med_ant=u(1.0, 4.0), med_mid_top=u(22, 30) * k,
        med_mid_low=u(14, 20) * k,
        heart_x=u(0.22, 0.30) * cav_w, heart_y=-cav_ant + u(3, 6) + heart_ext_y,
        heart_z=-left_drop + 0.62 * heart_c,
        heart_a=heart_a, heart_b=heart_b, heart_c=heart_c, heart_angle=heart_angle,
        vb_y=vb_y, vb_r=vb_r, vert_len=u(22, 27) * np.sqrt(k), vert_phase=u(0, 30),
        disc_mm=u(4, 6),
        rib_top=apex_z + u(0, 10), rib_step=u(0.115, 0.135) * (apex_z + 60),
        rib_drop=u(80, 110) * np.sqrt(k), rib_h=u(10, 13), rib_t=u(6, 8),
        sternum_w=u(9, 12),
        liver_x=u(20, 45), stomach_gas=u(0.0, 0.5) if rng.random() < 0.7 else 0.0,
        lung_hu=u(-900, -850), lung_grad=u(20, 50), fat_hu=u(-105, -85),
        muscle_hu=u(38, 55), blood_hu=u(35, 50), liver_hu=u(50, 65),
        cortex_hu=u(750, 1100), marrow_hu=u(300, 400),
    )


# ---------------------------------------------------------------------------------------------
# Shape helpers (all take broadcastable arrays)
# ---------------------------------------------------------------------------------------------


def _sepow(v: np.ndarray, half: np.ndarray | float, p: float) -> np.ndarray:
    """|v / half|^p as float32."""
    return np.power(np.abs(v / half).astype(F32), F32(p))


def cavity_axes(an: Anatomy, zr: np.ndarray):
    """Cavity half-axes (lateral, anterior, posterior) in mm at reference heights ``zr``."""
    depth = (an.apex_z + 12.0 - zr) / (0.80 * an.apex_z)
    g = an.cav_top + (1 - an.cav_top) * np.power(smoothstep(depth), F32(0.7))
    low = 1 - 0.06 * smoothstep((-an.recess_mm - zr) / 60.0)
    gp = 0.45 + 0.55 * g
    return (an.cav_w * g * low).astype(F32), (an.cav_ant * g).astype(F32), \
        (an.cav_post * gp).astype(F32)


def cavity_norm(an: Anatomy, X, Y, zr) -> np.ndarray:
    """Superellipse norm of the thoracic cavity (< 1 inside)."""
    a, ba, bp = cavity_axes(an, zr)
    tx = _sepow(X, a, an.cav_px)
    ty = np.where(Y < 0, _sepow(Y, ba, an.cav_pya), _sepow(Y, bp, an.cav_pyp))
    return tx + ty


def body_axes(an: Anatomy, zb: np.ndarray):
    """Body outline half-axes (lateral, anterior, posterior) in mm at scan heights ``zb``."""
    top = smoothstep((zb - (an.apex_z - 100.0)) / 120.0)
    low = smoothstep((-an.recess_mm - zb) / 70.0)
    w = an.body_w * (1 + an.shoulder * top - 0.04 * low)
    ant = an.body_ant * (1 - 0.10 * top + 0.05 * low)
    return w.astype(F32), ant.astype(F32), np.full_like(w, an.body_post, dtype=F32)


def superellipse(X, Y, w, ant, post, px, pya, pyp) -> np.ndarray:
    """|X/w|^px + |Y/ant|^pya (Y < 0) or |Y/post|^pyp (Y >= 0)."""
    tx = _sepow(X, w, px)
    ty = np.where(Y < 0, _sepow(Y, ant, pya), _sepow(Y, post, pyp))
    return tx + ty


def dome_z(an: Anatomy, X, Y) -> np.ndarray:
    """Reference Z (mm) of the diaphragm surface above (X, Y): dome tops at 0 (right) and
    ``-left_dome_drop`` (left), falling steeply toward the costophrenic recesses."""
    xd = 0.45 * an.cav_w
    bq = np.where(Y < 0, 0.95 * an.cav_ant, 0.80 * an.cav_post).astype(F32)
    qy = ((Y + 0.05 * an.cav_ant) / bq) ** 2
    qr = ((X + xd) / (0.62 * an.cav_w)) ** 2 + qy
    ql = ((X - xd) / (0.62 * an.cav_w)) ** 2 + qy
    zr = -an.recess_mm * np.minimum(qr, F32(1.25))
    zl = -an.left_dome_drop - an.recess_mm * np.minimum(ql, F32(1.25))
    s = 1 / (1 + np.exp(-(X - an.mid_x) / F32(10.0)))
    return ((1 - s) * zr + s * zl).astype(F32)


def mediastinum_halfwidth(an: Anatomy, Y, zr) -> np.ndarray:
    """Half-width (mm) of the mediastinum between the lungs, as a smooth function of Y and
    reference Z: a retrosternal wedge, the thin anterior junction, the widest part at the level
    of the trachea and great vessels, then the paravertebral part at the spine. Tubes (vessels,
    airways, oesophagus) in their fat envelope bulge the lung borders further."""
    upper = smoothstep((zr - (an.carina_z - 35.0)) / 55.0)
    w_mid = an.med_mid_low + (an.med_mid_top - an.med_mid_low) * upper
    w_ant = an.med_ant + 4.0 * (1 - upper)
    y_mid = an.vb_y - an.vb_r - 26.0
    knots_y = (-an.cav_ant, -0.55 * an.cav_ant, y_mid, an.vb_y - an.vb_r, an.vb_y)
    knots_w = (w_ant + 12.0, w_ant, w_mid, an.vb_r + 9.0, an.vb_r + 5.0)
    w = knots_w[0]
    for i in range(len(knots_y) - 1):
        w = w + (knots_w[i + 1] - knots_w[i]) * smoothstep(
            (Y - knots_y[i]) / (knots_y[i + 1] - knots_y[i]))
    return np.asarray(w, dtype=F32)


def heart_q(an: Anatomy, breath: Breath, X, Y, zs) -> np.ndarray:
    """Normalised ellipsoid distance of the heart (< 1 inside); ``zs`` is the scan Z."""
    zc = breath.apex_z - (breath.apex_z - an.heart_z) * breath.sz
    c, s = np.cos(an.heart_angle), np.sin(an.heart_angle)
    ia, ib = 1 / an.heart_a ** 2, 1 / an.heart_b ** 2
    dx = (X - an.heart_x).astype(F32)
    dy = (Y - an.heart_y).astype(F32)
    qx = F32(c * c * ia + s * s * ib) * dx * dx
    qy = F32(s * s * ia + c * c * ib) * dy * dy
    qxy = F32(2 * c * s * (ib - ia)) * dx * dy
    qz = ((zs - zc) / F32(an.heart_c)) ** 2
    return (qz + qy) + (qx + qxy)


def apex_shrink(an: Anatomy, zr) -> np.ndarray:
    """In-plane shrink factor of the lungs near their apices (1 below the apical dome, -> 0 at
    the apex)."""
    zc = an.apex_z - an.apex_cap
    t = np.clip((zr - zc) / an.apex_cap, 0, 1)
    return np.sqrt(np.clip(1 - t * t, 0, 1)).astype(F32)


def lung_labels(an: Anatomy, breath: Breath, X, Y, zr, zs) -> np.ndarray:
    """Lung labels (0 outside, 1 right, 2 left) at broadcastable reference X, Y (mm), reference
    heights ``zr`` and scan heights ``zs``. Vessels and airways of the mediastinum are cut out
    later (they are tubes, see :mod:`radlogics_repro.synth.vessels`)."""
    X = np.asarray(X, F32)
    Y = np.asarray(Y, F32)
    right = X < an.mid_x
    g = apex_shrink(an, zr)
    gs = np.maximum(g, F32(1e-3))
    cx = np.where(right, F32(-an.apex_x), F32(an.apex_x))
    Xp = cx + (X - cx) / gs
    Yp = F32(an.apex_y) + (Y - F32(an.apex_y)) / gs
    inside = cavity_norm(an, Xp, Yp, zr) < 1
    inside &= np.abs(Xp - F32(an.mid_x)) > mediastinum_halfwidth(an, Yp, zr)
    inside &= g > 1e-3
    inside &= heart_q(an, breath, X, Y, zs) > F32(1.10 ** 2)
    r = an.vb_r + 4.0
    inside &= (X / F32(r)) ** 2 + ((Y - F32(an.vb_y)) / F32(0.9 * r)) ** 2 > 1
    inside &= zr > dome_z(an, X, Y)
    return np.where(inside, np.where(right, np.uint8(RIGHT), np.uint8(LEFT)), np.uint8(0))


# ---------------------------------------------------------------------------------------------
# Slab renderer
# ---------------------------------------------------------------------------------------------


@dataclass
class ScanContext:
    """Per-scan arrays shared by all slabs (all float32, patient frame)."""

    an: Anatomy
    breath: Breath
    grid: Grid
    xr: np.ndarray  # (nx,) reference X of the columns
    yr: np.ndarray  # (ny,) reference Y of the rows
    dome: np.ndarray  # (ny, nx) reference Z of the diaphragm
    liver2d: np.ndarray  # (ny, nx) bool, liver side of the upper abdomen
    spine: dict  # 2-D bool masks of spinal structures
    lung_hu_y: np.ndarray  # (ny,) lung HU by row (gravity gradient)


def make_context(an: Anatomy, breath: Breath, grid: Grid, lung_hu: float,
                 lung_grad: float) -> ScanContext:
    """Precompute the z-independent 2-D arrays of one scan."""
    xr = breath.ref_xy(grid.xs())
    yr = breath.ref_xy(grid.ys())
    X2, Y2 = xr[None, :], yr[:, None]
    dome = dome_z(an, X2, Y2)
    liver_edge = an.liver_x - (an.liver_x + 0.6 * an.vb_r) * ramp(Y2, -0.2 * an.cav_ant,
                                                                      0.6 * an.cav_post)
    liver2d = X2 < liver_edge
    vb, cy = an.vb_r, an.vb_y
    canal_y = cy + vb + 8.0
    rr_vb = (X2 / vb) ** 2 + ((Y2 - cy) / (0.88 * vb)) ** 2
    rr_canal = (X2 / 7.5) ** 2 + ((Y2 - canal_y) / 7.0) ** 2
    rr_arch = (X2 / 13.5) ** 2 + ((Y2 - canal_y - 1.0) / 12.0) ** 2
    spine = {
        "body": rr_vb <= 1,
        "body_core": rr_vb <= 0.78,
        "canal": rr_canal <= 1,
        "arch": (rr_arch <= 1) & (Y2 > canal_y - 4.0),
        "spinous": (np.abs(X2) < 3.5) & (Y2 > canal_y + 8)
        & (Y2 < min(canal_y + 38, an.body_post - an.fat_post - 8)),
        "transverse": (np.abs(X2) < 34) & (np.abs(Y2 - canal_y + 2) < 5.0) & (np.abs(X2) > 8),
    }
    grad = ramp(yr, -0.9 * an.cav_ant, 0.9 * an.cav_post)
    lung_hu_y = (lung_hu - lung_grad / 2 + lung_grad * grad).astype(F32)
    return ScanContext(an, breath, grid, xr.astype(F32), yr.astype(F32), dome.astype(F32),
                       liver2d, spine, lung_hu_y)


def render_slab(ctx: ScanContext, z0: int, z1: int, layers: dict, *, tissue: bool = False):
    """HU (float32), lung labels (uint8) and tissue codes (uint8 or None) of slices ``z0:z1``,
    without pulmonary vessels, lesions, blur or noise.

    ``layers`` maps names to :class:`~radlogics_repro.synth.tubes.Layer` occupancies:
    'med_fat' (the fat envelope of the mediastinal tubes), 'med_soft' (great vessels, tracheal
    and oesophageal walls), 'med_air' (their lumens), 'bone' (clavicles), 'cable' (ECG leads).
    """
    an, br = ctx.an, ctx.breath
    zs_all = ctx.grid.zs()[z0:z1]
    zb = zs_all[:, None, None]  # scan Z (bones, body outline)
    zr = br.ref_z(zb)  # reference Z (lungs, organs)
    X = ctx.xr[None, None, :]
    Y = ctx.yr[None, :, None]
    shape = (z1 - z0, len(ctx.yr), len(ctx.xr))
    hu = np.full(shape, -1000.0, F32)
    cv = Canvas(hu, np.zeros(shape, np.uint8) if tissue else None)

    # body wall: skin, subcutaneous fat, muscle
    w, ant, post = body_axes(an, zb)
    s_body = superellipse(X, Y, w, ant, post, an.body_px, an.body_pya, an.body_pyp)
    cv.paint(an.fat_hu, "fat", s_body <= 1)
    sk = an.skin_mm
    s_skin = superellipse(X, Y, w - sk, ant - sk, post - sk, an.body_px, an.body_pya,
                          an.body_pyp)
    cv.paint(an.muscle_hu - 15, "soft", (s_body <= 1) & (s_skin > 1))
    del s_body, s_skin
    mw, ma, mp = w - sk - an.fat_lat, ant - sk - an.fat_ant, post - sk - an.fat_post
    s_mus = superellipse(X, Y, mw, ma, mp, an.body_px, an.body_pya, an.body_pyp)
    cv.paint(an.muscle_hu, "soft", s_mus <= 1)
    # a fat plane between pectoral and intercostal muscles (anterior and lateral wall)
    plane = (s_mus > 0.80) & (s_mus < 0.84) & (Y < 0.2 * an.cav_post)
    cv.paint(an.fat_hu + 25, "fat", plane)
    del s_mus, plane

    # thoracic cavity content (mediastinal fat, soft tissue of the thoracic inlet)
    s_cav = cavity_norm(an, X, Y, zr)
    in_cav = s_cav <= 1
    cv.paint(an.fat_hu + 10, "fat", in_cav)
    cv.paint(an.muscle_hu - 20, "soft", in_cav & (zr > an.apex_z - 15))  # thoracic inlet
    _ribs(ctx, cv, s_cav, X, Y, zb, zr)
    _scapulae(ctx, cv, s_cav, X, Y, zb, zr)
    _sternum(ctx, cv, X, Y, zb, zr)

    # abdomen below the diaphragm
    below = zr < ctx.dome[None]
    abd = in_cav & below
    if abd.any():
        _abdomen(ctx, cv, abd, X, Y, zr, zb)
    del below, abd, s_cav

    # heart with epicardial fat
    q = heart_q(an, br, X, Y, zb)
    above = zr > ctx.dome[None] - 2.0
    cv.paint(an.fat_hu, "fat", (q <= 1.14) & above)
    cv.paint(an.blood_hu, "blood", (q <= 1.0) & above)
    del q, above

    _spine(ctx, cv, zb)

    # lungs, with their oblique fissures
    lung = lung_labels(an, br, X, Y, zr, zb)
    cv.paint(ctx.lung_hu_y[None, :, None], "lung", lung > 0)
    _fissures(ctx, hu, lung, X, Y, zr)

    # tubes of the mediastinum (in their fat envelope), clavicles and cables
    fat = _composite(cv, layers.get("med_fat"), z0, z1, an.fat_hu + 10, "fat",
                     where=hu < an.fat_hu)
    soft = _composite(cv, layers.get("med_soft"), z0, z1, an.blood_hu, "blood")
    air = _composite(cv, layers.get("med_air"), z0, z1, -1000.0, "gas")
    for mask in (fat, soft, air):
        if mask is not None:
            sub, where = mask
            lung[where][sub] = 0
    _composite(cv, layers.get("bone"), z0, z1, an.cortex_hu * 0.8, "bone")
    _composite(cv, layers.get("cable"), z0, z1, 900.0, "cable")
    return hu, lung, cv.tissue


def _fissures(ctx: ScanContext, hu, lung, X, Y, zr) -> None:
    """Oblique (major) fissures: a thin pleural sheet per lung running from high posterior to low
    anterior, seen in axial slices as a faint line or, where it is nearly parallel to the slice,
    a hazy band (its ~1 mm thickness spread over the slice thickness)."""
    an = ctx.an
    dz = ctx.grid.spacing[0] / ctx.breath.sz  # slice thickness in the reference frame
    for side in (RIGHT, LEFT):
        z_post = an.carina_z + (10.0 if side == RIGHT else 25.0)
        y_post, y_ant = 0.85 * an.cav_post, -0.55 * an.cav_ant
        z_ant = -an.left_dome_drop * (side == LEFT) + 5.0
        slope = (z_post - z_ant) / (y_post - y_ant)
        # the sheet faces antero-laterally: at a given height its lateral edge is more anterior
        lateral = np.abs(X - an.mid_x) - 0.5 * an.cav_w
        y_shift = -0.55 * lateral + 0.004 * lateral ** 2  # curved
        dist = np.abs(zr - (z_ant + slope * (Y - y_ant - y_shift)))  # vertical distance, mm
        half = F32(dz / 2 + 0.6)
        amp = F32(min(1.0, 1.0 / dz) * 0.5)
        w = np.clip(F32(1.0) - dist / half, 0, 1) * amp
        w *= lung == side
        hu += w * (F32(-80.0) - hu)


def _composite(cv: Canvas, layer, z0, z1, value, code: str, where=None):
    """Blend a tube layer into the canvas (only where ``where``, if given); voxels at least half
    covered get tissue ``code``. Returns (that half-covered mask, its slices) or None."""
    if layer is None:
        return None
    win = layer.window(z0, z1, cv.hu.shape[1:])
    if win is None:
        return None
    sub, box = win
    target = cv.hu[box]
    occ = sub.astype(F32) * F32(1 / 255)
    half = sub >= 128
    if where is not None:
        occ *= where[box]
        half = half & where[box]
    target += occ * (F32(value) - target)
    cv.label(code, half, box)
    return half, box


def _ribs(ctx: ScanContext, cv: Canvas, s_cav, X, Y, zb, zr) -> None:
    """Ribs as a band just outside the cavity whose height falls from posterior to anterior."""
    an = ctx.an
    _, ba, bp = cavity_axes(an, zr)
    yn = np.clip(np.where(Y < 0, Y / ba, Y / bp), -1, 1)  # (z, y, 1)
    t = (1 - yn) / 2  # 0 posterior midline -> 1 anterior midline
    v = (an.rib_top - an.rib_drop * np.power(t, F32(1.4)) - zb) / F32(an.rib_step)
    k = np.rint(v)
    dist = np.abs(v - k) * F32(an.rib_step)
    ki = np.clip(k, 0, N_RIBS - 1).astype(np.int64)
    rib_zy = (k >= 0) & (k < N_RIBS) & (dist < an.rib_h / 2) & (t < _RIB_END[ki])
    if not rib_zy.any():
        return
    cart = rib_zy & (t > _RIB_CARTILAGE[ki])
    l1 = F32(1.035)
    l2 = F32((1 + an.rib_t / an.cav_w + 0.035) ** 2.3)
    # oval cross-section in (radial, cranio-caudal) coordinates: cortex shell around marrow
    dz2 = np.where(rib_zy, (dist / F32(an.rib_h / 2)) ** 2, F32(2.0))  # (z, y, 1)
    r2 = ((s_cav - (l1 + l2) / 2) / ((l2 - l1) / 2)) ** 2 + dz2
    near = (r2 < 1) & (np.abs(X) > F32(an.vb_r + 10))
    cv.paint(an.cortex_hu, "bone", near & ~cart)
    cv.paint(an.marrow_hu, "bone", near & (r2 < 0.45) & ~cart)
    cv.paint(130.0, "cartilage", near & cart)


def _scapulae(ctx: ScanContext, cv: Canvas, s_cav, X, Y, zb, zr) -> None:
    """Thin curved plates over the posterolateral ribs of the upper chest."""
    an = ctx.an
    zmask = (zb < an.apex_z + 5) & (zb > an.apex_z - 125)
    if not zmask.any():
        return
    _, _, bp = cavity_axes(an, zr)
    post = (Y > 0.05 * bp) & zmask
    lo = F32((1 + 14.0 / an.cav_w) ** 2.3)
    hi = F32((1 + 17.5 / an.cav_w) ** 2.3)
    plate = (s_cav > lo) & (s_cav < hi) & post & (np.abs(X) > 0.35 * an.cav_w)
    cv.paint(an.cortex_hu * 0.75, "bone", plate)


def _sternum(ctx: ScanContext, cv: Canvas, X, Y, zb, zr) -> None:
    """Manubrium and sternal body in front of the cavity."""
    an = ctx.an
    top, bottom = an.apex_z - 25.0, an.heart_z - 0.2 * an.heart_c
    zsel = (zb[:, 0, 0] < top) & (zb[:, 0, 0] > bottom)
    if not zsel.any():
        return
    _, ba, _ = cavity_axes(an, zr)
    manub = smoothstep((zb - (an.carina_z + 5)) / 20.0)
    half_w = an.sternum_w * (1 + 0.6 * manub)
    front = -ba - 3.0
    q = ((X - an.mid_x) / half_w) ** 2 + ((Y - front + 6.0) / 6.0) ** 2
    inner = (q <= 1) & zsel[:, None, None]
    core = q <= 0.55
    cv.paint(an.cortex_hu * 0.8, "bone", inner)
    cv.paint(an.marrow_hu, "bone", inner & core)


def _spine(ctx: ScanContext, cv: Canvas, zb) -> None:
    """Vertebral bodies with discs, canal, arches, spinous and transverse processes."""
    an, sp = ctx.an, ctx.spine
    phase = np.mod(zb[:, 0, 0] - an.vert_phase, an.vert_len)
    disc = phase < an.disc_mm
    proc = (phase > 0.45 * an.vert_len) & (phase < 0.80 * an.vert_len)
    d3, b3 = disc[:, None, None], ~disc[:, None, None]
    cv.paint(85.0, "soft", sp["body"][None] & d3)
    cv.paint(an.cortex_hu * 0.85, "bone", sp["body"][None] & b3)
    cv.paint(an.marrow_hu, "bone", sp["body_core"][None] & b3)
    cv.paint(an.cortex_hu * 0.85, "bone", sp["arch"][None])
    cv.paint(25.0, "soft", sp["canal"][None])
    cv.paint(an.cortex_hu * 0.8, "bone", (sp["spinous"] | sp["transverse"])[None]
             & proc[:, None, None])


def _abdomen(ctx: ScanContext, cv: Canvas, abd, X, Y, zr, zb) -> None:
    """Upper abdomen under the domes: diaphragm, liver, spleen, stomach (with gas)."""
    an, br = ctx.an, ctx.breath
    cv.paint(an.fat_hu + 15, "fat", abd)
    dia = abd & (zr > ctx.dome[None] - 4.0)
    cv.paint(an.muscle_hu, "soft", dia)
    cv.paint(an.liver_hu, "organ", abd & ~dia & ctx.liver2d[None])
    # spleen and stomach: ellipsoids that move up with the left dome
    lift = (br.apex_z - (-an.left_dome_drop)) * (1 - br.sz)
    zsp = -an.left_dome_drop - 45.0 + lift
    q = ((X - 0.62 * an.cav_w) / 32.0) ** 2 + ((Y - 0.45 * an.cav_post) / 45.0) ** 2 \
        + ((zb - zsp) / 55.0) ** 2
    cv.paint(an.liver_hu - 8, "organ", abd & ~dia & (q <= 1))
    zst = -an.left_dome_drop - 38.0 + lift
    q = ((X - 0.30 * an.cav_w) / 48.0) ** 2 + ((Y + 0.25 * an.cav_ant) / 38.0) ** 2 \
        + ((zb - zst) / 42.0) ** 2
    stomach = abd & ~dia & (q <= 1)
    cv.paint(an.muscle_hu, "organ", stomach)
    lumen = stomach & (q <= 0.80)
    cv.paint(12.0, "organ", lumen)
    if an.stomach_gas > 0:
        level = -0.25 * an.cav_ant - 38.0 + 2 * 38.0 * an.stomach_gas
        cv.paint(-1000.0, "gas", lumen & (Y < level))
