"""Tubular anatomy: great vessels, trachea and bronchi, oesophagus, clavicles, ECG leads, and the
branching pulmonary vessel and airway trees.

Trees are grown by recursive territory splitting: a branch owns a cloud of points sampled inside
its lung; at each branch point the cloud is halved across its principal axis, each child heads for
its half's centroid, and its radius follows Murray's law (r^3 proportional to the territory), so
vessels taper from the hilum toward the pleura and fill the lung evenly.

All geometry is in the reference (inspiration) frame, mm, (X, Y, Z) order.
"""

from __future__ import annotations

import numpy as np

from radlogics_repro.synth.anatomy import LEFT, RIGHT, Anatomy, body_axes
from radlogics_repro.synth.tubes import Tubes


def _smooth_path(points, radii, per_segment: int = 6) -> Tubes:
    """Catmull-Rom curve through ``points`` (k, 3) with linearly interpolated ``radii``."""
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out, rad = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        for t in np.linspace(0, 1, per_segment, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
            rad.append(r[i] + (r[i + 1] - r[i]) * t)
    out.append(p[-1])
    rad.append(r[-1])
    return Tubes.polyline(np.array(out), np.array(rad))


def landmarks(an: Anatomy) -> dict:
    """Key points (reference frame, mm) shared by the tubes and the trees."""
    k = an.frame
    esoph_y = an.vb_y - an.vb_r - 9.0
    trachea_y = esoph_y - 7.0 - 2.0 - 9.0 * np.sqrt(k)
    c = an.carina_z
    return {
        "trachea_y": trachea_y,
        "esoph_y": esoph_y,
        "carina": np.array([an.mid_x, trachea_y + 3.0, c]),
        "bronchus_r": np.array([an.mid_x - 0.26 * an.cav_w, trachea_y + 7.0, c - 22.0]),
        "bronchus_l": np.array([an.mid_x + 0.31 * an.cav_w, trachea_y + 13.0, c - 34.0]),
        "pa_split": np.array([an.mid_x + 14.0, trachea_y - 16.0, c - 8.0]),
        "hilum_r": np.array([an.mid_x - 0.36 * an.cav_w, trachea_y + 2.0, c - 24.0]),
        "hilum_l": np.array([an.mid_x + 0.36 * an.cav_w, trachea_y + 12.0, c - 16.0]),
        "la": np.array([an.heart_x - 0.15 * an.heart_a, an.heart_y + 0.80 * an.heart_b,
                        an.heart_z + 0.45 * an.heart_c]),
        "vein_r": np.array([an.mid_x - 0.33 * an.cav_w, trachea_y + 20.0, c - 50.0]),
        "vein_l": np.array([an.mid_x + 0.32 * an.cav_w, trachea_y + 24.0, c - 46.0]),
    }


def mediastinal_tubes(an: Anatomy, rng: np.random.Generator) -> dict[str, Tubes]:
    """Great vessels, trachea and main bronchi, oesophagus and clavicles.

    Returns:
        {'med_fat': fat envelope of the mediastinal tubes, 'med_soft': blood-filled vessels and
        airway/oesophageal walls, 'med_air': lumens, 'bone': clavicles (do not move with
        breathing)}.
    """
    k = an.frame
    lm = landmarks(an)
    c, top, bottom = an.carina_z, an.apex_z + 90.0, -an.recess_mm - 120.0
    mx, ty, ey = an.mid_x, lm["trachea_y"], lm["esoph_y"]
    ra = rng.uniform(13, 16) * k
    aorta = _smooth_path(
        [[an.heart_x - 0.30 * an.heart_a, an.heart_y + 0.15 * an.heart_b, an.heart_z + 0.45 * an.heart_c],
         [mx - 16 * k, -0.30 * an.cav_ant, c - 10],
         [mx - 6, ty - 14, c + 26],
         [mx + 14, ty + 8, c + 26],
         [mx + an.vb_r + 0.55 * ra, an.vb_y - 0.55 * an.vb_r, c - 10],
         [mx + an.vb_r * 0.9, an.vb_y - 0.6 * an.vb_r, -an.left_dome_drop - 10],
         [mx + 6, an.vb_y - an.vb_r - 8, bottom]],
        [ra * 1.05, ra, ra * 0.9, ra * 0.85, ra * 0.8, ra * 0.75, ra * 0.7])
    trunk = _smooth_path(
        [[an.heart_x + 0.05 * an.heart_a, an.heart_y - 0.55 * an.heart_b, an.heart_z + 0.5 * an.heart_c],
         [mx + 18, -0.30 * an.cav_ant, c - 20], lm["pa_split"]], [14 * k, 14 * k, 13 * k])
    rpa = _smooth_path([lm["pa_split"], [mx - 10, ty - 12, c - 12], lm["hilum_r"]],
                       [10 * k, 10 * k, 9 * k])
    lpa = _smooth_path([lm["pa_split"], [mx + 26, ty - 2, c - 4], lm["hilum_l"]],
                       [9.5 * k, 9 * k, 8.5 * k])
    svc = _smooth_path([[mx - 30 * k, -0.22 * an.cav_ant, top],
                        [mx - 30 * k, -0.28 * an.cav_ant, c],
                        [mx - 26 * k, -0.28 * an.cav_ant, an.heart_z + 0.8 * an.heart_c]],
                       [9 * k, 9.5 * k, 10 * k])
    ivc = _smooth_path([[mx - 22 * k, 0.05 * an.cav_post, bottom],
                        [mx - 20 * k, 0.0, -12.0],
                        [an.heart_x - 0.5 * an.heart_a, an.heart_y + 0.3 * an.heart_b, an.heart_z]],
                       [11 * k, 11 * k, 11 * k])
    arch_top = np.array([mx - 2, ty - 8, c + 30])
    branches = [
        _smooth_path([arch_top + [-4, -2, 0], [mx - 14, ty - 12, c + 55], [mx - 22, ty - 6, top]],
                     [6.5 * k, 6 * k, 5.5 * k]),
        _smooth_path([arch_top + [6, 0, 0], [mx + 6, ty - 10, c + 60], [mx + 12, ty - 6, top]],
                     [4.5 * k, 4.2 * k, 4 * k]),
        _smooth_path([arch_top + [14, 6, -2], [mx + 18, ty + 2, c + 55], [mx + 34, ty + 4, top]],
                     [5.5 * k, 5 * k, 5 * k]),
        _smooth_path([[mx + 48 * k, -0.40 * an.cav_ant, c + 55], [mx + 5, -0.35 * an.cav_ant, c + 44],
                      [mx - 28 * k, -0.24 * an.cav_ant, c + 36]], [6 * k, 6 * k, 7 * k]),
    ]
    veins = [_smooth_path([lm["la"], (lm["la"] + lm[v]) / 2 + [0, 4, 6], lm[v]],
                          [8 * k, 7 * k, 6.5 * k]) for v in ("vein_r", "vein_l")]
    rt = rng.uniform(8.0, 10.0) * np.sqrt(k)
    trachea = _smooth_path([[mx, ty - 6, top], [mx - 2, ty, c + 20], lm["carina"]], [rt, rt, rt])
    bronchi = [_smooth_path([lm["carina"], (lm["carina"] + lm[b]) / 2 + [0, 0, 2], lm[b]],
                            [rb, rb, rb * 0.95])
               for b, rb in (("bronchus_r", 0.75 * rt), ("bronchus_l", 0.68 * rt))]
    esoph = _smooth_path([[mx + 2, ey, top], [mx + 4, ey + 1, c - 40],
                          [mx + 16, ey - 6, -an.left_dome_drop - 5],
                          [0.25 * an.cav_w, -0.15 * an.cav_ant, -an.left_dome_drop - 35]],
                         [7.5 * k] * 4)
    esoph_air = rng.uniform(0, 3.0) if rng.random() < 0.5 else 0.0
    airways = Tubes.concat([trachea, *bronchi])
    med_soft = Tubes.concat([aorta, trunk, rpa, lpa, svc, ivc, *branches, *veins,
                             airways.scaled_radii(1.0, 0.0), esoph])
    med_air = Tubes.concat([airways.scaled_radii(0.78, -0.4),
                            esoph.scaled_radii(0.0, esoph_air) if esoph_air > 0.5 else Tubes.empty()])
    w_top, ant_top, _ = body_axes(an, np.array([an.apex_z]))
    clav = []
    for side in (-1, 1):
        clav.append(_smooth_path(
            [[mx + side * 16, -an.cav_ant * 0.62 - 16, an.apex_z - 22],
             [side * 0.45 * w_top[0], -0.80 * ant_top[0], an.apex_z - 2],
             [side * 0.80 * w_top[0], -0.45 * ant_top[0], an.apex_z + 12]],
            [7 * k, 6 * k, 6.5 * k]))
    envelope = Tubes.concat([aorta, trunk, rpa, lpa, svc, *branches, *veins, airways, esoph])
    med_fat = envelope.scaled_radii(1.0, rng.uniform(3.0, 6.0))
    return {"med_fat": med_fat, "med_soft": med_soft, "med_air": med_air,
            "bone": Tubes.concat(clav)}


def ecg_cables(an: Anatomy, rng: np.random.Generator, z_range: tuple[float, float]) -> Tubes:
    """0-3 thin wires lying on the anterior skin (scan frame, not moved by breathing)."""
    n = int(rng.choice([0, 0, 1, 2, 3]))
    parts = []
    for _ in range(n):
        m = 40
        z = rng.uniform(*z_range) + np.cumsum(rng.normal(0, 4, m))
        phi = rng.uniform(-2.4, -0.7) + np.cumsum(rng.normal(0, 0.03, m))  # anterior arc
        w, ant, _ = body_axes(an, z)
        gap = rng.uniform(2, 8)
        x = (w + gap) * np.cos(phi)
        y = (ant + gap) * np.sin(phi)
        parts.append(Tubes.polyline(np.stack([x, y, z], axis=1), rng.uniform(0.9, 1.6)))
    return Tubes.concat(parts)


def grow_tree(root: np.ndarray, r_root: float, points: np.ndarray, rng: np.random.Generator,
              *, r_min: float, reach: tuple[float, float] = (0.35, 0.55),
              murray: float = 3.0) -> Tubes:
    """Grow a branching tree from ``root`` that covers ``points`` (n, 3).

    Args:
        root: (3,) start of the tree (hilum), mm.
        r_root: radius of the first branch, mm.
        points: territory samples inside the lung, mm.
        r_min: branches thinner than this end (connect to their territory centre), mm.
        reach: range of the fraction of the way to its territory centroid a branch grows.
        murray: radius exponent: r_parent^m = sum r_child^m (3 = Murray's law).
    """
    p0, p1, r0, r1 = [], [], [], []
    stack = [(np.asarray(root, float), float(r_root), points)]
    while stack:
        p, r, pts = stack.pop()
        n = len(pts)
        if n == 0:
            continue
        if n <= 2 or r < r_min:
            for q in pts[:2]:
                p0.append(p)
                p1.append(q)
                rr = r * (1 / min(n, 2)) ** (1 / 3)
                r0.append(rr)
                r1.append(rr * 0.8)
            continue
        direction = pts.mean(axis=0) - p
        norm = np.linalg.norm(direction)
        dn = direction / norm if norm > 1e-6 else np.array([0.0, 0.0, -1.0])
        rel = pts - p
        perp = rel - np.outer(rel @ dn, dn)
        sub = perp if n <= 48 else perp[rng.choice(n, 48, replace=False)]
        _, _, vt = np.linalg.svd(sub - sub.mean(axis=0), full_matrices=False)
        order = np.argsort(perp @ vt[0])
        m = int(np.clip(round(n * rng.uniform(0.35, 0.65)), 1, n - 1))
        for group in (pts[order[:m]], pts[order[m:]]):
            rg = r * (len(group) / n) ** (1 / murray)
            v = group.mean(axis=0) - p
            dist = np.linalg.norm(v)
            if dist < 1e-6:
                continue
            q = p + v * rng.uniform(*reach)
            p0.append(p)
            p1.append(q)
            r0.append(rg)
            r1.append(rg * 0.93)
            stack.append((q, rg * 0.93, group))
    if not p0:
        return Tubes.empty()
    return Tubes(np.array(p0), np.array(p1), np.array(r0), np.array(r1))


def lung_trees(an: Anatomy, rng: np.random.Generator, lung_points: dict[int, np.ndarray],
               *, n_vessel_points: int = 2000, n_airway_points: int = 40) -> dict[str, Tubes]:
    """Pulmonary arteries and veins (one tree each per lung) and intrapulmonary airways.

    Args:
        lung_points: {RIGHT: (n, 3), LEFT: (m, 3)} points inside each lung (reference frame).

    Returns:
        {'vessels': Tubes, 'airways': Tubes (outer wall radius; lumen = 0.7 x)}.
    """
    lm = landmarks(an)
    k = an.frame
    vessels, airways = [], []
    for side, hil, vein, bron in ((RIGHT, "hilum_r", "vein_r", "bronchus_r"),
                                  (LEFT, "hilum_l", "vein_l", "bronchus_l")):
        pts = lung_points[side]
        if len(pts) < 8:
            continue
        for root, r_root in ((lm[hil], 7.0 * k), (lm[vein], 5.5 * k)):
            sel = pts[rng.choice(len(pts), min(n_vessel_points, len(pts)), replace=False)]
            sel = sel + rng.normal(0, 2.0, sel.shape)
            vessels.append(grow_tree(root, r_root, sel, rng, r_min=0.4, murray=2.8,
                                     reach=(0.5, 0.75)))
        sel = pts[rng.choice(len(pts), min(n_airway_points, len(pts)), replace=False)]
        sel = _toward(sel, lm[bron], 0.35)  # airways stop well before the pleura
        airways.append(grow_tree(lm[bron], 5.2 * np.sqrt(k), sel, rng, r_min=1.6,
                                 reach=(0.45, 0.6)))
    return {"vessels": Tubes.concat(vessels), "airways": Tubes.concat(airways)}


def _toward(points: np.ndarray, centre: np.ndarray, fraction: float) -> np.ndarray:
    """Move ``points`` a ``fraction`` of the way toward ``centre``."""
    return points + (centre - points) * fraction
