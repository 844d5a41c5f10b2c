"""Figures written by the training runs (headless matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE  # noqa: E402
from radlogics_repro.report.study_figures import save_figure_atomic  # noqa: E402


def _pick(n_total: int, n: int) -> np.ndarray:
    return np.unique(np.linspace(0, max(n_total - 1, 0), min(n, n_total)).round().astype(int))


def training_figure(task: str, model, slices, path: str | os.PathLike, n: int = 6) -> Path:
    """A PNG of the model's output on ``n`` validation slices spread over the set.

    Lung U-Net: slice, ground truth contour (green) and prediction (red). Classifier: the input
    crop titled with label and predicted probability.
    """
    index = _pick(len(slices), n)
    images = slices.images[index].astype(np.float32)
    batch = np.repeat(images[..., np.newaxis], 3, axis=-1)
    outputs = np.asarray(model(batch, training=False), np.float32) if len(index) else np.zeros((0,))
    fig, axes = plt.subplots(1, max(len(index), 1), figsize=(2.6 * max(len(index), 1), 3.0),
                             squeeze=False)
    for ax, i, image, out in zip(axes[0], index, images, outputs, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if task == "lung_unet":
            ax.contour(slices.masks[i], levels=[0.5], colors="lime", linewidths=0.8)
            ax.contour(out[..., 0], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{slices.case_ids[i]} z{slices.z[i]}", fontsize=7)
        else:
            ax.set_title(f"label {int(slices.labels[i])}  p={float(out[0]):.2f}", fontsize=8)
        ax.axis("off")
    for ax in axes[0][len(index):]:
        ax.axis("off")
    legend = "green: reference, red: model" if task == "lung_unet" else "label 1 = abnormal slice"
    fig.suptitle(f"{task}: validation slices ({legend}). {RESEARCH_USE_NOTICE}", fontsize=7)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def view_pairs_figure(views: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """A PNG of contrastive view pairs, one pair per column (top: view 1, bottom: view 2).

    Args:
        views: ``(2P, H, W, C)`` in [0, 1], the two views of pair k at rows 2k and 2k + 1 (the
            layout of :func:`radlogics_repro.unlabeled.contrastive_dataset`); channel 0 is shown.
    """
    pairs = max(len(views) // 2, 1)
    fig, axes = plt.subplots(2, pairs, figsize=(1.8 * pairs, 3.8), squeeze=False)
    for k in range(pairs):
        for row in range(2):
            ax = axes[row][k]
            if 2 * k + row < len(views):
                ax.imshow(np.asarray(views[2 * k + row])[..., 0], cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    fig.suptitle(f"{title}\n{RESEARCH_USE_NOTICE}", fontsize=7)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=100)
