"""Mask overlays of pixel-level dynamic networks: where each gated block really computed, over the input image.

The lecture shows DynConv's masks as highlighted regions on the image: the network spends its convolutions on the
object and skips the background. Each panel here is one (sample, block): the input image in grey and the block's
executed positions (``model.masks(x)``, upsampled to the image) in colour.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from .plots import _save  # noqa: E402


def _gray(img: Tensor) -> Tensor:
    """(C, H, W) -> (H, W) in [0, 1] for display."""
    g = img.float().mean(0)
    lo, hi = g.min(), g.max()
    return (g - lo) / (hi - lo) if hi > lo else torch.zeros_like(g)


def upsample_masks(masks: Sequence[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """Each bool mask (N, h, w) -> float (N, H, W) at the image size (nearest: one block cell = one stride cell)."""
    return [F.interpolate(m.unsqueeze(1).float(), size=size, mode="nearest")[:, 0] for m in masks]


def plot_mask_overlays(images: Tensor, masks: Sequence[Tensor], path: str | Path,
                       block_names: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                       max_samples: int = 4, title: str = "executed positions per block") -> Path:
    """One row per sample (at most ``max_samples``): the image, then each block's mask over it.

    ``images``: (N, C, H, W); ``masks``: one bool (N, h_b, w_b) per gated block, as ``model.masks(images)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if not masks:
        raise ValueError("no masks to plot (the model has no gated block?)")
    if any(m.dim() != 3 or m.shape[0] != images.shape[0] for m in masks):
        raise ValueError(f"every mask must be (N, h, w) with N = {images.shape[0]}, got "
                         f"{[tuple(m.shape) for m in masks]}")
    n = min(max_samples, images.shape[0])
    names = list(block_names) if block_names is not None else [f"block {i}" for i in range(len(masks))]
    up = upsample_masks(masks, tuple(images.shape[-2:]))
    cols = 1 + len(masks)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    for i in range(n):
        img = _gray(images[i].detach().cpu())
        axes[i][0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i][0].set_title(labels[i] if labels is not None else "input", fontsize=7)
        for k, m in enumerate(up):
            ax = axes[i][k + 1]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.imshow(m[i].cpu(), cmap="autumn", alpha=0.45 * m[i].cpu().numpy(), vmin=0, vmax=1)
            ax.set_title(f"{names[k]}: {float(masks[k][i].float().mean()):.0%}", fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def plot_model_masks(model, images: Tensor, path: str | Path, max_samples: int = 4, **kwargs) -> Path:
    """Run ``model.masks(images)`` (sparse inference, eval mode) and plot the overlays."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            masks = model.masks(images[:max_samples])
    finally:
        model.train(was_training)
    return plot_mask_overlays(images[:max_samples], masks, path, getattr(model, "decision_names", None),
                              max_samples=max_samples, **kwargs)
