"""Large-canvas ScaledMNIST: the "tiny objects are hard" case of spatially adaptive networks.

Digits are drawn on a 128x128 canvas at 12% to 50% of its side (15 to 64 pixels) among three clutter fragments.
A 32x32 glance of the whole image (a 4x down-sampling) shrinks the smallest digits to about 4 pixels, too few to
read, while a 32x32 full-resolution patch holds them whole: a glance-and-focus network has to find and zoom in
on the small ones, and can stop after the glance on the large ones.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Subset

from .mnist import ScaledMNIST

LARGE_CANVAS = {"canvas": 128, "min_scale": 0.12, "max_scale": 0.5, "clutter": 3}


def large_canvas_mnist(split: str = "train", patch_size: int | None = None, **overrides) -> ScaledMNIST:
    """ScaledMNIST with the large-canvas preset (``LARGE_CANVAS``); keyword ``overrides`` (canvas, min_scale,
    max_scale, clutter, seed, repeats, fragment) replace the preset's values.

    With ``patch_size`` (the side of the patches a region-level model will crop), a canvas smaller than the patch
    is refused: such a model could not crop anything from it.
    """
    cfg = {**LARGE_CANVAS, **overrides}
    if patch_size is not None:
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
        if cfg["canvas"] < patch_size:
            raise ValueError(f"canvas {cfg['canvas']} is smaller than the patch size {patch_size}: a patch must fit "
                             f"inside the image (use canvas >= {patch_size})")
    return ScaledMNIST(split, **cfg)


def digit_centers(dataset) -> Tensor:
    """Centres (N, 2), (row, col) as fractions of the canvas side, of the digits of a ScaledMNIST (or a Subset of
    one): the metadata a region-level model may use as a supervised teacher in training (GFNet's stage II warm
    start). Raises TypeError for datasets without positions."""
    if isinstance(dataset, Subset):
        return digit_centers(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if not isinstance(dataset, ScaledMNIST):
        raise TypeError(f"digit_centers needs a ScaledMNIST (or a Subset of one), got {type(dataset).__name__}")
    canvas = dataset.config.canvas
    return (dataset.positions.float() + dataset.scales[:, None] * canvas / 2) / canvas
