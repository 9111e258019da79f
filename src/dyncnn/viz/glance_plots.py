"""Where a glance-and-focus network looked: the patches of each sample, step by step, as boxes on the image.

Each row is one sample: its full image with the boxes of every focus patch it used (numbered by step, drawn up
to the step it exited at under the given exit policy), then the patches themselves as the local encoder saw
them. Greyed titles mark the steps a sample skipped because it had already exited.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from ..dynamic.patches import crop_patches, patch_corners  # noqa: E402
from .plots import _save  # noqa: E402

COLORS = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown", "tab:pink")


def plot_glance_patches(model, images: Tensor, path: str | Path, policy=None,
                        labels: Sequence[int] | None = None, title: str = "") -> Path:
    """Plot the patches ``model`` (a GFNet) looked at for each of ``images`` (N, C, H, W); ``policy``: the exit
    thresholds (default: every step). Returns the written path."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, C, H, W) of images, got {tuple(images.shape)}")
    centers = model.patch_centers(images)                       # (N, T-1, 2)
    result = model.infer(images, policy)
    preds, exits = result.logits.argmax(1), result.exit_index
    n, steps, p = images.shape[0], centers.shape[1], model.cfg.patch_size
    h, w = images.shape[-2:]
    fig, axes = plt.subplots(n, steps + 1, figsize=(2.0 * (steps + 1), 2.1 * n), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(images[i].mean(0).numpy(), cmap="gray")
        used = int(exits[i])
        for k in range(steps):
            top, left = (int(v) for v in patch_corners(centers[i:i + 1, k], h, w, p)[0])
            if k < used:
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), p, p, fill=False, lw=1.5,
                                       color=COLORS[k % len(COLORS)]))
                ax.text(left, top - 1, str(k + 2), color=COLORS[k % len(COLORS)], fontsize=7)
        truth = f" / true {labels[i]}" if labels is not None else ""
        ax.set_title(f"pred {int(preds[i])}{truth}, stop {used + 1}", fontsize=7)
        patches = crop_patches(images[i:i + 1].expand(steps, -1, -1, -1), centers[i], p)
        for k in range(steps):
            a = axes[i, k + 1]
            a.imshow(patches[k].mean(0).numpy(), cmap="gray")
            a.set_title(f"step {k + 2}" + ("" if k < used else " (skipped)"), fontsize=7,
                        color="black" if k < used else "0.6")
        for a in axes[i]:
            a.set_xticks([])
            a.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
