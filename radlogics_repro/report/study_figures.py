"""Per-study figures: slice overlays of the fine localization map, the Corona Score curve.

Pure functions on numpy arrays (headless matplotlib, Agg backend). Every figure carries
:data:`radlogics_repro.RESEARCH_USE_NOTICE`; titles and labels are whatever the caller passes, so
pass a pseudonymous case id only, never a patient name, ID or birth date.

Slices are in the package's canonical orientation (``hu[z]`` is an axial slice with rows toward the
patient's posterior and columns toward the patient's left), so ``imshow`` gives the radiological
view: patient's right on the image left, anterior at the top. The overlays mark R/L/A/P accordingly.

Also holds the helpers the other report modules share: :class:`ReportError` and the atomic
figure writer.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import cm, colors, patheffects  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE  # noqa: E402

logger = logging.getLogger(__name__)

LUNG_WINDOW_HU = (-1350.0, 150.0)
"""Default display window (lower, upper) in HU: width 1500, level -600."""

MAP_CMAP = "jet"
"""Colour map of the fine localization map overlay (values 0..1)."""

MAP_MAX_ALPHA = 0.6
"""Opacity of the overlay where the map is 1; it falls linearly to fully transparent at 0."""

OVERLAY_DPI = 100


class ReportError(ValueError):
    """Bad input to a report function: wrong array shape, mismatched lengths, unreadable image."""


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------
def add_notice(fig, *, fontsize: float = 8.0) -> None:
    """Write the research-use notice along the bottom edge of ``fig``."""
    fig.text(0.5, 0.008, RESEARCH_USE_NOTICE, ha="center", va="bottom", fontsize=fontsize,
             color="#a00000", fontweight="bold")


def save_figure_atomic(fig, path: str | os.PathLike, *, dpi: float = OVERLAY_DPI) -> Path:
    """Save ``fig`` as PNG to ``path`` through a temporary sibling file and ``os.replace``; close it.

    The parent folder is created when missing. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _as_2d(name: str, array, shape: tuple[int, int] | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ReportError(f"{name} must be a 2D (y, x) array, got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ReportError(f"{name} has shape {array.shape}, the slice has shape {shape}")
    return array


# ------------------------------------------------------------------------------------------------
# slice overlay
# ------------------------------------------------------------------------------------------------
def slice_overlay_png(
    hu_slice,
    path: str | os.PathLike,
    *,
    lung_mask=None,
    fine_map=None,
    infection_mask=None,
    title: str = "",
    window: tuple[float, float] = LUNG_WINDOW_HU,
    pixel_spacing: tuple[float, float] | None = None,
) -> Path:
    """Write a side-by-side PNG: the plain slice | the slice with lung contour, map and infection.

    Args:
        hu_slice: ``(y, x)`` axial slice in HU, canonical orientation.
        path: output PNG.
        lung_mask: optional ``(y, x)`` bool/0-1 lung mask; drawn as a cyan contour.
        fine_map: optional ``(y, x)`` fine localization map in [0, 1] in the slice's own pixels;
            drawn with the ``jet`` colour map, opacity proportional to the value (0 is transparent,
            1 is ``MAP_MAX_ALPHA``), with a colour bar on the fixed 0..1 scale.
        infection_mask: optional ``(y, x)`` bool/0-1 infection mask; drawn as a white dashed contour.
        title: figure title (pseudonymous case id, slice index...).
        window: display window ``(lower, upper)`` in HU; default W1500/L-600.
        pixel_spacing: optional ``(row, column)`` spacing in mm, to draw non-square pixels true to
            size; square pixels are assumed when omitted.

    Returns the PNG path (1100 x 510 pixels).
    """
    hu = _as_2d("hu_slice", hu_slice).astype(np.float32)
    lung = None if lung_mask is None else _as_2d("lung_mask", lung_mask, hu.shape) > 0
    infection = (None if infection_mask is None
                 else _as_2d("infection_mask", infection_mask, hu.shape) > 0)
    fmap = None if fine_map is None else _as_2d("fine_map", fine_map, hu.shape).astype(np.float32)
    lower, upper = float(window[0]), float(window[1])
    if not upper > lower:
        raise ReportError(f"window must be (lower, upper) with upper > lower, got {window}")
    aspect = 1.0 if pixel_spacing is None else float(pixel_spacing[0]) / float(pixel_spacing[1])

    fig, (ax_plain, ax_over) = plt.subplots(1, 2, figsize=(11.0, 5.1), layout="constrained")
    for ax in (ax_plain, ax_over):
        ax.imshow(hu, cmap="gray", vmin=lower, vmax=upper, aspect=aspect, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        _orientation_marks(ax)
    ax_plain.set_title(f"CT slice (window W{upper - lower:.0f} / L{(upper + lower) / 2:.0f} HU)",
                       fontsize=10)

    legend = []
    if fmap is not None:
        clean = np.nan_to_num(fmap, nan=0.0)
        alpha = np.clip(clean, 0.0, 1.0) * MAP_MAX_ALPHA
        ax_over.imshow(clean, cmap=MAP_CMAP, vmin=0.0, vmax=1.0, alpha=alpha, aspect=aspect,
                       interpolation="bilinear")
        mappable = cm.ScalarMappable(norm=colors.Normalize(0.0, 1.0), cmap=MAP_CMAP)
        bar = fig.colorbar(mappable, ax=ax_over, fraction=0.046, pad=0.02)
        bar.set_label("fine localization map (0-1)", fontsize=9)
        legend.append("colour: localization map")
    if lung is not None and lung.any():
        ax_over.contour(lung, levels=[0.5], colors="cyan", linewidths=1.0)
        legend.append("cyan: lung")
    if infection is not None and infection.any():
        ax_over.contour(infection, levels=[0.5], colors="white", linewidths=1.2,
                        linestyles="dashed")
        legend.append("white dashed: infection")
    ax_over.set_title("Overlay" + (f" ({', '.join(legend)})" if legend else ""), fontsize=9)

    fig.suptitle(title or "Axial slice", fontsize=11)
    add_notice(fig)
    fig.get_layout_engine().set(rect=(0.0, 0.045, 1.0, 0.955))
    return save_figure_atomic(fig, path)


def _orientation_marks(ax) -> None:
    """Radiological-view labels: patient's right on the image left, anterior at the top."""
    style = {"color": "yellow", "fontsize": 10, "fontweight": "bold", "transform": ax.transAxes,
             "path_effects": [patheffects.withStroke(linewidth=2.5, foreground="black")]}
    ax.text(0.01, 0.5, "R", ha="left", va="center", **style)
    ax.text(0.99, 0.5, "L", ha="right", va="center", **style)
    ax.text(0.5, 0.99, "A", ha="center", va="top", **style)
    ax.text(0.5, 0.01, "P", ha="center", va="bottom", **style)


# ------------------------------------------------------------------------------------------------
# Corona Score over time
# ------------------------------------------------------------------------------------------------
def corona_curve_png(
    days: Sequence[float],
    corona_scores: Sequence[float],
    path: str | os.PathLike,
    *,
    true_volumes: Sequence[float] | None = None,
    case_ids: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG of one patient's Corona Score (cm^3) against scan day.

    Args:
        days: scan day of each study (e.g. days since the first scan or since symptom onset).
        corona_scores: Corona Score of each study in cm^3 (METHOD section 6).
        path: output PNG.
        true_volumes: optional reference lesion volume of each study in cm^3, drawn dashed on the
            same axes; NaN for a study without a reference.
        case_ids: optional pseudonymous label of each study, written next to its marker.
        title: figure title (pseudonymous patient id).

    Points are drawn in order of day. Returns the PNG path.
    """
    days_a = np.asarray(days, dtype=np.float64).reshape(-1)
    scores = np.asarray(corona_scores, dtype=np.float64).reshape(-1)
    if days_a.shape != scores.shape:
        raise ReportError(f"days ({days_a.size}) and corona_scores ({scores.size}) differ in length")
    truth = None
    if true_volumes is not None:
        truth = np.asarray(true_volumes, dtype=np.float64).reshape(-1)
        if truth.shape != days_a.shape:
            raise ReportError(f"true_volumes ({truth.size}) and days ({days_a.size}) differ in length")
    labels = None
    if case_ids is not None:
        labels = [str(c) for c in case_ids]
        if len(labels) != days_a.size:
            raise ReportError(f"case_ids ({len(labels)}) and days ({days_a.size}) differ in length")

    order = np.argsort(days_a, kind="stable")
    fig, ax = plt.subplots(figsize=(7.0, 4.4), layout="constrained")
    if days_a.size == 0:
        ax.text(0.5, 0.5, "no scans", ha="center", va="center", transform=ax.transAxes, fontsize=12)
    else:
        ax.plot(days_a[order], scores[order], "o-", color="tab:red", lw=1.8, ms=6,
                label="Corona Score")
        if truth is not None and np.isfinite(truth).any():
            keep = order[np.isfinite(truth[order])]
            ax.plot(days_a[keep], truth[keep], "s--", color="tab:blue", lw=1.4, ms=5,
                    label="reference lesion volume")
        if labels is not None:
            for i in order:
                ax.annotate(labels[i], (days_a[i], scores[i]), textcoords="offset points",
                            xytext=(4, 6), fontsize=7, color="0.3")
        ax.set_ylim(bottom=0.0)
        ax.margins(x=0.08)
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("scan day (days)")
    ax.set_ylabel("volume (cm$^3$)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Corona Score over time", fontsize=11)
    add_notice(fig)
    fig.get_layout_engine().set(rect=(0.0, 0.04, 1.0, 0.96))
    return save_figure_atomic(fig, path, dpi=110)


# ------------------------------------------------------------------------------------------------
# slice choice
# ------------------------------------------------------------------------------------------------
def most_involved_slices(fine_maps_sum_per_slice, k: int) -> list[int]:
    """Indices of the ``k`` slices with the largest fine-map mass, largest first.

    Args:
        fine_maps_sum_per_slice: ``(n_slices,)`` map mass of each slice (sum of its fine map, or the
            map mass in cm^3); a ``(n_slices, y, x)`` stack of maps is summed per slice first.
        k: how many slices to return; fewer when there are fewer slices.

    Ties go to the lower index. Slices with zero mass are not excluded: filter them out if only
    involved slices are wanted. Non-finite values are an error.
    """
    mass = np.asarray(fine_maps_sum_per_slice, dtype=np.float64)
    if mass.ndim == 0:
        raise ReportError("fine_maps_sum_per_slice must have one value per slice, got a scalar")
    if mass.ndim > 1:
        mass = mass.reshape(mass.shape[0], -1).sum(axis=1)
    if not np.isfinite(mass).all():
        raise ReportError("fine_maps_sum_per_slice contains NaN or infinite values")
    if int(k) < 0:
        raise ReportError(f"k must be >= 0, got {k}")
    order = np.lexsort((np.arange(mass.size), -mass))  # last key primary: mass descending
    return [int(i) for i in order[: int(k)]]
