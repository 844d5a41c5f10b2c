"""Tapered tubes (vessels, airways, cables, clavicles) rasterised as partial-volume occupancy.

A tube set is a list of straight segments, each a cone frustum with round ends. Segments are cut
into short pieces; every piece is evaluated on its own small voxel box, the boxes of one size are
evaluated together in one vectorised batch, and the results are merged with a maximum into a
``uint8`` occupancy layer (255 = the voxel is fully inside a tube) that only covers the bounding box
of the tubes. No Python loop runs over voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from radlogics_repro.synth.geometry import Grid

_BOX_SIZES = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80,
                       96, 112, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024])
_BATCH_VOXELS = 1_500_000


@dataclass
class Tubes:
    """Straight tapered segments in patient-frame mm.

    Attributes:
        p0, p1: (n, 3) float64 end points as (X, Y, Z) mm.
        r0, r1: (n,) radii in mm at ``p0`` and ``p1``.
    """

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray

    @staticmethod
    def empty() -> Tubes:
        """No segments."""
        z3 = np.zeros((0, 3))
        return Tubes(z3, z3.copy(), np.zeros(0), np.zeros(0))

    @staticmethod
    def polyline(points, radii) -> Tubes:
        """Consecutive segments through ``points`` (k, 3) with radii (k,) at the points."""
        pts = np.asarray(points, dtype=np.float64)
        rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
        return Tubes(pts[:-1].copy(), pts[1:].copy(), rad[:-1].copy(), rad[1:].copy())

    @staticmethod
    def concat(parts: list[Tubes]) -> Tubes:
        """All segments of ``parts`` in one set."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Tubes.empty()
        return Tubes(np.concatenate([p.p0 for p in parts]), np.concatenate([p.p1 for p in parts]),
                     np.concatenate([p.r0 for p in parts]), np.concatenate([p.r1 for p in parts]))

    def __len__(self) -> int:
        return len(self.r0)

    def scaled_radii(self, factor: float, add_mm: float = 0.0) -> Tubes:
        """Same axes, radii ``r * factor + add_mm``."""
        return Tubes(self.p0, self.p1, self.r0 * factor + add_mm, self.r1 * factor + add_mm)

    def mapped(self, fn) -> Tubes:
        """End points passed through ``fn`` ((n, 3) -> (n, 3)), radii unchanged."""
        return Tubes(fn(self.p0), fn(self.p1), self.r0.copy(), self.r1.copy())


@dataclass
class Layer:
    """A ``uint8`` occupancy volume covering ``grid`` indices ``lo:lo+data.shape`` only."""

    data: np.ndarray
    lo: tuple[int, int, int]

    def window(self, z0: int, z1: int, shape_yx: tuple[int, int]):
        """The part of this layer inside slices ``z0:z1``.

        Returns:
            (sub, (zs, ys, xs)) where ``sub`` is a view and the slices locate it inside a slab of
            shape (z1 - z0, *shape_yx); ``None`` when the layer does not reach the slab.
        """
        lz, ly, lx = self.lo
        nz, ny, nx = self.data.shape
        a, b = max(z0, lz), min(z1, lz + nz)
        if b <= a or ny == 0 or nx == 0:
            return None
        sub = self.data[a - lz:b - lz]
        return sub, (slice(a - z0, b - z0), slice(ly, ly + ny), slice(lx, lx + nx))


def smooth_envelope(layer: Layer, grid: Grid, sigma_mm: float, level: float = 0.25) -> Layer:
    """A smooth hull of ``layer`` in each slice: blur in-plane by about ``sigma_mm`` (two box
    filters per axis) and re-threshold
    at ``level`` with a one-pixel ramp, so that neighbouring tubes merge into one outline (the
    pleura drapes over the mediastinal vessels rather than wrapping each one)."""
    if layer.data.size == 0:
        return layer
    pad = int(np.ceil(2 * sigma_mm / min(grid.spacing[1:])))
    lz, ly, lx = layer.lo
    ny, nx = grid.shape[1:]
    y0, x0 = max(ly - pad, 0), max(lx - pad, 0)
    y1, x1 = min(ly + layer.data.shape[1] + pad, ny), min(lx + layer.data.shape[2] + pad, nx)
    occ = np.zeros((layer.data.shape[0], y1 - y0, x1 - x0), np.float32)
    occ[:, ly - y0:ly - y0 + layer.data.shape[1], lx - x0:lx - x0 + layer.data.shape[2]] = \
        layer.data * np.float32(1 / 255)
    hull = occ
    for axis, sp in ((1, grid.spacing[1]), (2, grid.spacing[2])):
        # two box passes of width w approximate a Gaussian of variance 2 (w^2 - 1) / 12
        width = max(1, int(round(np.sqrt(6 * (sigma_mm / sp) ** 2 + 1))))
        for _ in range(2):
            hull = ndi.uniform_filter1d(hull, width, axis=axis, mode="constant")
    hull -= np.float32(level)
    hull *= np.float32(12.0)
    hull += np.float32(0.5)
    np.clip(hull, 0, 1, out=hull)
    np.maximum(hull, occ, out=hull)
    return Layer((hull * 255).astype(np.uint8), (lz, y0, x0))


def render_tubes(tubes: Tubes, grid: Grid) -> Layer:
    """Rasterise ``tubes`` on ``grid`` as partial-volume occupancy (0..255).

    Partial volume: in-plane the edge is a one-pixel linear ramp; across slices, a voxel whose
    slab contains the nearest axis point sees the in-plane profile, scaled by the fraction of the
    slab thickness the tube fills (``2 r / (dz cos(elevation))``, plus 0.4 for the tails of the
    slice sensitivity profile, at most 1), so thin vessels that run in-plane fade somewhat in
    thick slices as they do on a scanner. Tubes thinner than a pixel keep their cross-section
    area (fainter rather than wider), so coarse grids are not flooded by small vessels.
    """
    empty = Layer(np.zeros((0, 0, 0), np.uint8), (0, 0, 0))
    if len(tubes) == 0:
        return empty
    dz, dy, dx = grid.spacing
    soft = float(min(dx, dy))
    pieces = _cut_into_pieces(tubes, soft)
    a, b, ra, rb = pieces
    sp = np.array([dx, dy, dz])
    org = np.array([grid.origin[2], grid.origin[1], grid.origin[0]])
    rmax = np.maximum(ra, rb)[:, None] + soft
    lo_mm = np.minimum(a, b) - rmax
    hi_mm = np.maximum(a, b) + rmax
    lo_mm[:, 2] -= dz / 2
    hi_mm[:, 2] += dz / 2
    lo = np.floor((lo_mm - org) / sp).astype(np.int64)
    hi = np.ceil((hi_mm - org) / sp).astype(np.int64)
    shape_xyz = np.array([grid.shape[2], grid.shape[1], grid.shape[0]])
    inside = np.all((hi >= 0) & (lo < shape_xyz), axis=1)
    if not inside.any():
        return empty
    a, b, ra, rb, lo, hi = a[inside], b[inside], ra[inside], rb[inside], lo[inside], hi[inside]
    box_lo = np.maximum(lo.min(axis=0), 0)
    box_hi = np.minimum(hi.max(axis=0) + 1, shape_xyz)
    layer = np.zeros((box_hi[2] - box_lo[2], box_hi[1] - box_lo[1], box_hi[0] - box_lo[0]),
                     np.uint8)
    size = hi - lo + 1
    bucket = _BOX_SIZES[np.minimum(np.searchsorted(_BOX_SIZES, size), len(_BOX_SIZES) - 1)]
    bucket = np.maximum(bucket, size)  # tubes longer than the largest box keep their own size
    keys = bucket[:, 0] * 1_000_000_000 + bucket[:, 1] * 100_000 + bucket[:, 2]
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    starts = np.r_[0, np.nonzero(np.diff(keys_sorted))[0] + 1, len(order)]
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        idx = order[s:e]
        bx, by, bz = bucket[idx[0]]
        per = max(1, _BATCH_VOXELS // int(bx * by * bz))
        for c in range(0, len(idx), per):
            sel = idx[c:c + per]
            _splat(layer, box_lo, a[sel], b[sel], ra[sel], rb[sel], lo[sel], (bx, by, bz),
                   grid, soft)
    return Layer(layer, (int(box_lo[2]), int(box_lo[1]), int(box_lo[0])))


def _cut_into_pieces(tubes: Tubes, soft: float):
    """Split segments so that each piece is at most about four radii (and 3 px) long."""
    d = tubes.p1 - tubes.p0
    length = np.linalg.norm(d, axis=1)
    rmax = np.maximum(tubes.r0, tubes.r1)
    target = np.maximum(4.0 * rmax + 2 * soft, 3 * soft)
    n = np.maximum(1, np.ceil(length / target)).astype(np.int64)
    seg = np.repeat(np.arange(len(n)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    t0 = (k / n[seg])[:, None]
    t1 = ((k + 1) / n[seg])[:, None]
    a = tubes.p0[seg] + d[seg] * t0
    b = tubes.p0[seg] + d[seg] * t1
    ra = tubes.r0[seg] + (tubes.r1[seg] - tubes.r0[seg]) * t0[:, 0]
    rb = tubes.r0[seg] + (tubes.r1[seg] - tubes.r0[seg]) * t1[:, 0]
    return a, b, ra, rb


def _splat(layer, box_lo, a, b, ra, rb, lo, box, grid: Grid, soft: float) -> None:
    """Evaluate one batch of equal-size boxes and max-merge it into ``layer``."""
    bx, by, bz = (int(v) for v in box)
    dz, dy, dx = grid.spacing
    f32 = np.float32
    X = (grid.origin[2] + (lo[:, 0:1] + np.arange(bx)) * dx).astype(f32)[:, None, None, :]
    Y = (grid.origin[1] + (lo[:, 1:2] + np.arange(by)) * dy).astype(f32)[:, None, :, None]
    Z = (grid.origin[0] + (lo[:, 2:3] + np.arange(bz)) * dz).astype(f32)[:, :, None, None]
    a32 = a.astype(f32)
    ab = (b - a).astype(f32)
    l2 = np.maximum((ab ** 2).sum(axis=1), f32(1e-9))
    ax, ay, az = (a32[:, i, None, None, None] for i in range(3))
    ux, uy, uz = ((ab[:, i] / l2)[:, None, None, None] for i in range(3))
    t = ((Z - az) * uz + (Y - ay) * uy) + (X - ax) * ux
    np.clip(t, 0, 1, out=t)
    abx, aby, abz = (ab[:, i, None, None, None] for i in range(3))
    ddx = X - ax - t * abx
    d2 = ddx * ddx
    ddy = Y - ay - t * aby
    d2 += ddy * ddy
    ddz = np.abs(Z - az - t * abz)
    ddz -= f32(dz / 2)
    np.maximum(ddz, 0, out=ddz)
    d2 += ddz * ddz
    r = ra.astype(f32)[:, None, None, None] + t * (rb - ra).astype(f32)[:, None, None, None]
    occ = r - np.sqrt(d2)
    occ *= f32(1 / soft)
    occ += f32(0.5)
    np.clip(occ, 0, 1, out=occ)
    cos_el = np.sqrt(np.maximum(1 - (ab[:, 2] ** 2) / l2, 1e-6))
    rm = np.maximum(ra, rb)
    frac = np.minimum(1.0, 0.4 + 2 * rm / (dz * cos_el))
    # tubes thinner than a pixel: keep the cross-section area (the ramp profile of peak p
    # integrates to pi s^2 p^3 / 3 instead of pi r^2)
    peak = np.minimum(1.0, rm / soft + 0.5)
    frac *= np.minimum(1.0, 3 * rm ** 2 / (soft ** 2 * peak ** 3))
    occ *= (frac * 255).astype(f32)[:, None, None, None]
    # scatter into the layer (indices relative to the layer box)
    zi = lo[:, 2, None] + np.arange(bz) - box_lo[2]
    yi = lo[:, 1, None] + np.arange(by) - box_lo[1]
    xi = lo[:, 0, None] + np.arange(bx) - box_lo[0]
    lz, ly, lx = layer.shape
    valid = ((zi >= 0) & (zi < lz))[:, :, None, None] & ((yi >= 0) & (yi < ly))[:, None, :, None]
    valid = valid & ((xi >= 0) & (xi < lx))[:, None, None, :]
    valid &= occ >= 1
    flat = (zi[:, :, None, None] * ly + yi[:, None, :, None]) * lx + xi[:, None, None, :]
    np.maximum.at(layer.reshape(-1), flat[valid], occ[valid].astype(np.uint8))
