"""3D overview of a study: lung and infection surfaces (METHOD section 5), headless matplotlib.

Each mask is cropped to its bounding box, block-averaged to roughly ``target_mm`` voxels (the
fraction of each block inside the mask), smoothed with a 3D Gaussian of ``smooth_mm`` and turned into
a surface with ``skimage.measure.marching_cubes`` at level 0.5 with the coarse voxel spacing, so the
vertices are in millimetres. A 300 x 512 x 512 study renders in a few seconds. When a surface has more
than ``max_faces`` triangles the blocks are made coarser until it fits.

World axes of the plot (mm, from the centre of voxel (0, 0, 0)): X = x * spacing_x toward the
patient's Left, Y = y * spacing_y toward Posterior, Z = z * spacing_z toward Superior (the package's
canonical orientation). The camera looks from the front (anterior), slightly from the patient's left
and above, with Z up, so the patient's right is on the viewer's left as in radiology; "R" and "L"
labels are drawn at the two sides of the lungs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage import measure  # noqa: E402

from radlogics_repro.report.study_figures import (  # noqa: E402
    ReportError,
    add_notice,
    save_figure_atomic,
)

logger = logging.getLogger(__name__)

TARGET_VOXEL_MM = 2.5
"""Voxel size (mm) the masks are block-averaged to before marching cubes."""

SMOOTH_MM = 2.0
"""Standard deviation (mm) of the Gaussian blur applied to the block-averaged masks."""

MAX_FACES = 40_000
"""Default triangle budget per surface."""

VIEW_ELEVATION_DEG = 12.0
VIEW_AZIMUTH_DEG = -68.0
"""Camera: -90 is straight from the front (anterior); -68 turns it a little toward the patient's
left so the lungs' depth shows."""

COLOURS = {
    "lung": ("#6fa8dc", 0.16),
    "infection": ("#d7301f", 1.0),
    "ggo": ("#fdae61", 1.0),
    "consolidation": ("#a50026", 1.0),
}
"""Face colour and opacity of each surface."""


@dataclass(frozen=True)
class Surface:
    """A triangle mesh in world millimetres: ``verts`` (n, 3) as (X, Y, Z), ``faces`` (m, 3)."""

    verts: np.ndarray
    faces: np.ndarray

    @property
    def lower(self) -> np.ndarray:
        return self.verts.min(axis=0)

    @property
    def upper(self) -> np.ndarray:
        return self.verts.max(axis=0)


def render_3d_overview(
    lung_mask,
    infection_mask,
    spacing,
    path: str | os.PathLike,
    *,
    ggo_mask=None,
    consolidation_mask=None,
    max_faces: int = MAX_FACES,
    title: str = "",
    target_mm: float = TARGET_VOXEL_MM,
    smooth_mm: float = SMOOTH_MM,
    dpi: float = 110,
) -> Path:
    """Write a PNG of the lung surface (translucent) and the infection surface(s) (opaque).

    Args:
        lung_mask: ``(z, y, x)`` lung mask, canonical orientation: bool, or labels (nonzero = lung).
        infection_mask: ``(z, y, x)`` bool/0-1 infection mask, or None. Drawn in one colour unless
            ``ggo_mask`` or ``consolidation_mask`` is given and not empty, in which case those are
            drawn instead, in two colours.
        spacing: ``(z, y, x)`` voxel spacing in mm.
        path: output PNG.
        ggo_mask, consolidation_mask: optional ``(z, y, x)`` masks of ground-glass opacity and
            consolidation. Consolidation is drawn after (over) GGO, so a consolidation core inside
            a GGO halo stays visible.
        max_faces: triangle budget per surface; coarser blocks are used when it is exceeded.
        title: figure title (pseudonymous case id only).
        target_mm: block size (mm) the masks are averaged to before marching cubes.
        smooth_mm: Gaussian blur (mm, standard deviation) before marching cubes.

    An empty lung mask gives a figure saying "no lung found"; no infection gives lungs only.
    Returns the PNG path.
    """
    spacing = _check_spacing(spacing)
    lung = _as_3d("lung_mask", lung_mask)
    shape = lung.shape
    infections = _infection_layers(infection_mask, ggo_mask, consolidation_mask, shape)

    title = title or "3D overview"
    lung_surface = mask_surface(lung, spacing, max_faces=max_faces, target_mm=target_mm,
                                smooth_mm=smooth_mm)
    fig = plt.figure(figsize=(8.0, _figure_height(lung_surface)))
    if lung_surface is None:
        fig.text(0.5, 0.5, "no lung found", ha="center", va="center", fontsize=20, color="0.3")
        fig.suptitle(title, fontsize=12)
        add_notice(fig, fontsize=9)
        return save_figure_atomic(fig, path, dpi=dpi)

    ax = fig.add_subplot(projection="3d", computed_zorder=False, proj_type="ortho")
    handles = [Patch(facecolor=COLOURS["lung"][0], alpha=0.5, label="lungs")]
    drawn_infection = False
    for zorder, (name, label, mask) in enumerate(infections, start=1):
        surface = mask_surface(mask, spacing, max_faces=max_faces, target_mm=target_mm,
                               smooth_mm=smooth_mm)
        if surface is None:
            continue
        _add_surface(ax, surface, *COLOURS[name], zorder=zorder)
        handles.append(Patch(facecolor=COLOURS[name][0], label=label))
        drawn_infection = True
    # The translucent lungs are drawn last so they tint what lies inside them.
    _add_surface(ax, lung_surface, *COLOURS["lung"], zorder=10)
    if not drawn_infection:
        handles.append(Patch(facecolor="none", edgecolor="none", label="no infection found"))

    _frame_axes(ax, lung_surface)
    ax.view_init(elev=VIEW_ELEVATION_DEG, azim=VIEW_AZIMUTH_DEG, vertical_axis="z")
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.85)
    fig.suptitle(title, fontsize=12)
    fig.text(0.5, 0.008 + 0.22 / fig.get_figheight(),
             "anterior view, head up, patient's right on the viewer's left; axes in mm",
             ha="center", fontsize=8, color="0.3")
    add_notice(fig, fontsize=9)
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.06, top=0.93)
    return save_figure_atomic(fig, path, dpi=dpi)


# ------------------------------------------------------------------------------------------------
# surfaces
# ------------------------------------------------------------------------------------------------
def mask_surface(
    mask,
    spacing,
    *,
    max_faces: int = MAX_FACES,
    target_mm: float = TARGET_VOXEL_MM,
    smooth_mm: float = SMOOTH_MM,
) -> Surface | None:
    """The smoothed iso-surface of a ``(z, y, x)`` mask in world mm (X, Y, Z), or None if empty.

    A mask smaller than the blur (whose smoothed maximum stays below 0.5) is drawn at half its
    smoothed maximum instead of vanishing.
    """
    mask = np.asarray(mask)
    spacing = _check_spacing(spacing)
    if not mask.any():
        return None
    crop, origin = _crop_to_content(mask if mask.dtype == bool else mask > 0)  # no copy of a bool mask
    target = float(target_mm)
    for _ in range(6):
        factors = tuple(max(1, round(target / s)) for s in spacing)
        surface = _surface_at(crop, origin, spacing, factors, smooth_mm)
        if surface is None or len(surface.faces) <= max_faces:
            return surface
        target *= 1.1 * np.sqrt(len(surface.faces) / max_faces)
        logger.debug("surface has %d faces > %d; coarser blocks of %.1f mm",
                     len(surface.faces), max_faces, target)
    return surface


def _surface_at(crop: np.ndarray, origin: np.ndarray, spacing: np.ndarray,
                factors: tuple[int, int, int], smooth_mm: float) -> Surface | None:
    occupancy, lead = _block_mean(crop, factors)
    coarse = spacing * np.asarray(factors)
    sigma = [smooth_mm / c for c in coarse]
    pad = 2 + int(np.ceil(3 * max(sigma)))
    volume = np.pad(occupancy, pad)
    if smooth_mm > 0:
        volume = ndimage.gaussian_filter(volume, sigma=sigma, mode="constant")
    peak = float(volume.max())
    if peak <= 0:
        return None
    level = min(0.5, 0.5 * peak)
    verts, faces, _, _ = measure.marching_cubes(volume, level=level, spacing=tuple(coarse))
    # coarse voxel i (after padding) is centred on original voxel
    # origin - lead + (i - pad) * f + (f - 1) / 2
    shift = (origin - lead + (np.asarray(factors) - 1) / 2.0) * spacing - pad * coarse
    zyx = verts + shift
    return Surface(verts=zyx[:, ::-1].astype(np.float32), faces=faces)


def _block_mean(mask: np.ndarray, factors: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of each ``factors``-sized block inside ``mask``, and the zero padding put before
    the mask on each axis (the mask is padded to whole blocks, centred in them)."""
    extra = [(-n) % f for n, f in zip(mask.shape, factors, strict=True)]
    pads = [(e // 2, e - e // 2) for e in extra]
    if any(extra):
        mask = np.pad(mask, pads)
    nz, ny, nx = (n // f for n, f in zip(mask.shape, factors, strict=True))
    fz, fy, fx = factors
    blocks = mask.reshape(nz, fz, ny, fy, nx, fx)
    occupancy = blocks.sum(axis=(1, 3, 5), dtype=np.float32) / float(fz * fy * fx)
    return occupancy, np.array([p[0] for p in pads], dtype=np.float64)


def _crop_to_content(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
             for axis in range(3)]
    lower = np.array([i[0] for i in index])
    upper = np.array([i[-1] + 1 for i in index])
    crop = mask[lower[0]:upper[0], lower[1]:upper[1], lower[2]:upper[2]]
    return crop.view(np.uint8), lower.astype(np.float64)


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
def _add_surface(ax, surface: Surface, colour: str, alpha: float, *, zorder: int) -> None:
    polys = surface.verts[surface.faces]
    collection = Poly3DCollection(polys, facecolors=colour, edgecolors=colour, linewidths=0.0,
                                  alpha=alpha, shade=True, zorder=zorder)
    ax.add_collection3d(collection)


def _frame_axes(ax, lungs: Surface) -> None:
    """Equal-aspect limits around the lungs, mm axis labels, R/L/S markers."""
    lower, upper = lungs.lower.astype(np.float64), lungs.upper.astype(np.float64)
    margin = 0.04 * float(np.max(upper - lower)) + 2.0
    lower, upper = lower - margin, upper + margin
    ax.set_xlim(lower[0], upper[0])
    ax.set_ylim(lower[1], upper[1])
    ax.set_zlim(lower[2], upper[2])
    ax.set_box_aspect(tuple(upper - lower), zoom=0.88)
    ax.set_xlabel("R \u2192 L (mm)", fontsize=8, labelpad=2)
    ax.set_ylabel("A \u2192 P (mm)", fontsize=8, labelpad=2)
    ax.set_zlabel("I \u2192 S (mm)", fontsize=8, labelpad=2)
    ax.tick_params(labelsize=6, pad=0)
    ax.yaxis.set_major_locator(MaxNLocator(4))
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_pane_color((0.96, 0.96, 0.96, 1.0))
    mid = (lower + upper) / 2.0
    style = {"fontsize": 14, "fontweight": "bold", "color": "0.25", "ha": "center",
             "va": "center", "zorder": 20}
    ax.text(lower[0], mid[1], mid[2], "R", **style)
    ax.text(upper[0], mid[1], mid[2], "L", **style)


def _figure_height(lungs: Surface | None, width: float = 8.0) -> float:
    """Figure height (inches) that fits the lungs' height-to-width ratio without wide margins."""
    if lungs is None:
        return 7.0
    extent = lungs.upper - lungs.lower
    ratio = float(extent[2] / max(float(extent[0]), 1e-6))
    return 2.0 + 0.72 * width * min(max(ratio, 0.5), 1.3)


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def _check_spacing(spacing) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or not np.all(spacing > 0):
        raise ReportError(f"spacing must be three positive (z, y, x) values in mm, got {spacing}")
    return spacing


def _as_3d(name: str, mask, shape: tuple[int, ...] | None = None) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ReportError(f"{name} must be a 3D (z, y, x) array, got shape {mask.shape}")
    if shape is not None and mask.shape != shape:
        raise ReportError(f"{name} has shape {mask.shape}, lung_mask has shape {shape}")
    return mask


def _infection_layers(infection_mask, ggo_mask, consolidation_mask, shape):
    """[(colour key, legend label, mask)] to draw, in drawing order."""
    layers = []
    if ggo_mask is not None:
        layers.append(("ggo", "ground-glass opacity", _as_3d("ggo_mask", ggo_mask, shape)))
    if consolidation_mask is not None:
        layers.append(("consolidation", "consolidation",
                       _as_3d("consolidation_mask", consolidation_mask, shape)))
    if any(mask.any() for _, _, mask in layers):
        return layers
    if infection_mask is None:
        return []
    return [("infection", "infection", _as_3d("infection_mask", infection_mask, shape))]
