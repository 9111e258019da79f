"""Batched patch cropping for region-level models (glance-and-focus, AdaFocus).

A patch location is given per sample as a centre in normalised coordinates (row, col) in [0, 1]: 0 puts the
patch against the top / left border, 1 against the bottom / right one, so every centre gives a patch inside the
image. Cropping is one indexing operation for the whole batch, never a per-sample Python loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(images: Tensor, centers: Tensor, size: int) -> tuple[int, int]:
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if centers.shape != (n, 2):
        raise ValueError(f"expected centers of shape ({n}, 2) (row, col in [0, 1]), got {tuple(centers.shape)}")
    if not 0 < size <= min(h, w):
        raise ValueError(f"patch size {size} must be in [1, {min(h, w)}] for {h}x{w} images")
    return h, w


def patch_corners(centers: Tensor, height: int, width: int, size: int) -> Tensor:
    """Integer top-left corners (N, 2) of ``size`` x ``size`` patches centred at ``centers``."""
    c = centers.detach().float().clamp(0, 1)
    top = torch.round(c[:, 0] * (height - size)).long()
    left = torch.round(c[:, 1] * (width - size)).long()
    return torch.stack([top, left], dim=1)


def crop_patches(images: Tensor, centers: Tensor, size: int) -> Tensor:
    """Crop one ``size`` x ``size`` patch per image at ``centers`` (N, 2); exact pixels, not interpolated."""
    h, w = _check(images, centers, size)
    corners = patch_corners(centers, h, w, size).to(images.device)
    offs = torch.arange(size, device=images.device)
    rows = (corners[:, 0:1] + offs)[:, :, None]          # (N, P, 1)
    cols = (corners[:, 1:2] + offs)[:, None, :]          # (N, 1, P)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def crop_patches_differentiable(images: Tensor, centers: Tensor, size: int) -> Tensor:
    """Bilinear crop that is differentiable with respect to ``centers`` (AdaFocusV2's patch selection).

    At integer-aligned centres it equals :func:`crop_patches`.
    """
    h, w = _check(images, centers, size)
    n = images.shape[0]
    c = centers.float().clamp(0, 1)
    # pixel coordinate of the patch's first row / column, then the sampling grid in [-1, 1] (align_corners=True)
    top, left = c[:, 0] * (h - size), c[:, 1] * (w - size)
    offs = torch.arange(size, device=images.device, dtype=images.dtype)
    ys = (top[:, None] + offs) / max(h - 1, 1) * 2 - 1      # (N, P)
    xs = (left[:, None] + offs) / max(w - 1, 1) * 2 - 1
    grid = torch.stack([xs[:, None, :].expand(n, size, size), ys[:, :, None].expand(n, size, size)], dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=True)
