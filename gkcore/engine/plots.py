"""Figures for the demo and for training runs (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["plot_loss_curves", "plot_grounding"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(history: Sequence[Dict[str, float]], path: str, title: str = "pre-training losses") -> str:
    """Plot ``loss`` and every ``loss_*`` entry of the per-step records against ``step``; save a PNG.

    Args:
        history: records with a ``step`` key (as in ``train_log.jsonl`` or ``TrainResult.history``).
        path: output file.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    plt = _plt()
    keys = sorted({k for r in history for k in r if k == "loss" or k.startswith("loss_")})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in history if k in r]
        x, y = zip(*pts)
        ax.plot(x, y, label=k, lw=2.2 if k == "loss" else 1.2, color="black" if k == "loss" else None)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_grounding(image: np.ndarray, heatmap: np.ndarray, path: str, *, true_boxes: Sequence[Sequence[float]] = (),
                   title: str = "", region_box: Optional[Sequence[float]] = None) -> str:
    """Overlay a grounding heat map on an image and draw the true box(es).

    Args:
        image: (H, W) or (C, H, W) array (any range; shown min-max scaled, first channel).
        heatmap: (gh, gw) scores over the image (bilinearly stretched to the image).
        true_boxes: normalised xyxy boxes drawn in green (the ground truth).
        region_box: optional normalised xyxy box drawn in dashed red (e.g. the top-scoring region).
        path: output PNG.
    """
    plt = _plt()
    img = np.asarray(image, np.float64)
    if img.ndim == 3:
        img = img[0]
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W) or (C, H, W), got shape {np.shape(image)}")
    hm = np.asarray(heatmap, np.float64)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be (gh, gw), got shape {hm.shape}")
    H, W = img.shape
    img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
    hm = (hm - hm.min()) / max(hm.max() - hm.min(), 1e-12)
    fig, ax = plt.subplots(figsize=(4.6, 4.6), dpi=110)
    ax.imshow(img, cmap="gray", extent=(0, W, H, 0))
    ax.imshow(hm, cmap="jet", alpha=0.4, extent=(0, W, H, 0), interpolation="bilinear")
    from matplotlib.patches import Rectangle

    for b in true_boxes:
        ax.add_patch(Rectangle((b[0] * W, b[1] * H), (b[2] - b[0]) * W, (b[3] - b[1]) * H,
                               fill=False, ec="lime", lw=2, label="true box"))
    if region_box is not None:
        b = region_box
        ax.add_patch(Rectangle((b[0] * W, b[1] * H), (b[2] - b[0]) * W, (b[3] - b[1]) * H,
                               fill=False, ec="red", lw=1.5, ls="--", label="top region"))
    # the arg-max point (pointing game)
    i, j = np.unravel_index(int(np.argmax(hm)), hm.shape)
    ax.plot((j + 0.5) / hm.shape[1] * W, (i + 0.5) / hm.shape[0] * H, "w*", ms=14, mec="k", label="arg-max")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
