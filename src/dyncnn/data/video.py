"""MovingDigits: short clips in which the labelled digit is visible in a few frames only.

Temporal adaptivity (AdaFocus, frame skipping, early exit over time) pays off when only a part of a video carries
the information. Each clip of ``frames`` frames on a ``canvas`` x ``canvas`` image holds one real MNIST digit (its
label is the clip's) moving along a straight, wall-bouncing trajectory; the digit is drawn only in the
*informative* frames (a random contiguous run or a random scattered subset). The other frames hold distractors:
fragments of other digits, smaller than the labelled digit and partial, so that they never show a whole digit.
Gaussian pixel noise covers every frame (so that the informative frames cannot be found by "is anything there").

Every clip is a pure function of (seed, split, index, options): two runs or two processes see the same data.
Metadata per clip: ``informative`` (T,) bool, ``positions`` (T, 2) top-left corners of the digit's box along its
trajectory (defined in every frame, drawn only where informative) and ``sizes`` (the box side in pixels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .mnist import SPLITS, load_mnist_digits, split_indices
from .stored import StoredImages


@dataclass(frozen=True)
class MovingDigitsConfig:
    frames: int = 16
    canvas: int = 64
    min_scale: float = 0.35          # digit box side / canvas side
    max_scale: float = 0.5
    min_informative: float = 0.25    # fraction of the frames that show the digit, smallest
    max_informative: float = 0.5     # largest
    distractors: int = 2             # digit fragments per non-informative frame
    fragment: int = 12               # side of a fragment in source (28x28) pixels: partial by construction
    noise: float = 0.08              # std of the Gaussian pixel noise, in [0, 1] intensity units
    max_speed: float = 3.0           # pixels per frame along each axis


def _bounce(start: np.ndarray, velocity: np.ndarray, steps: np.ndarray, limit: int) -> np.ndarray:
    """Positions start + v t reflected into [0, limit] (a ball bouncing off the walls), rounded to pixels."""
    if limit == 0:
        return np.zeros((len(steps), 2), dtype=np.int64)
    raw = start[None, :] + velocity[None, :] * steps[:, None]
    m = np.mod(raw, 2 * limit)
    return np.rint(limit - np.abs(m - limit)).astype(np.int64)


def _paste_max(frames: Tensor, patches: Tensor, frame_idx: Tensor, corners: Tensor) -> None:
    """frames (T, H, W) <- max(frames, patches (K, s, s) placed at ``corners`` (K, 2) of frames ``frame_idx``).

    One scatter for every patch at once; ``amax`` makes overlapping patches combine deterministically."""
    k, s = patches.shape[0], patches.shape[-1]
    if k == 0:
        return
    _, h, w = frames.shape
    offs = torch.arange(s)
    rows = corners[:, 0, None, None] + offs[None, :, None]            # (K, s, 1)
    cols = corners[:, 1, None, None] + offs[None, None, :]            # (K, 1, s)
    flat = (frame_idx[:, None, None] * h + rows) * w + cols            # (K, s, s)
    frames.view(-1).scatter_reduce_(0, flat.reshape(-1), patches.reshape(-1), reduce="amax")


def _resize(images: Tensor, size: int) -> Tensor:
    """(K, h, w) uint8 or float -> (K, size, size) float in [0, 1], antialiased."""
    return F.interpolate(images[:, None].float() / 255, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[:, 0].clamp_(0, 1)


class MovingDigits(StoredImages):
    """Clips (T, 1, canvas, canvas) float in [0, 1] with the label of the digit they show; see the module doc.

    ``split`` picks the digits (train 3,500 / val 500 / test 1,000, one clip per digit and per repeat); the
    distractor fragments come from digits of the same split.
    """

    num_classes = 10
    in_chans = 1
    pixels_attr = "clips"      # uint8 (N, T, 1, canvas, canvas)

    def __init__(self, split: str = "train", frames: int = 16, canvas: int = 64, seed: int = 0,
                 min_scale: float = 0.35, max_scale: float = 0.5, min_informative: float = 0.25,
                 max_informative: float = 0.5, distractors: int = 2, fragment: int = 12, noise: float = 0.08,
                 max_speed: float = 3.0, repeats: int = 1, limit: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if frames < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        if canvas < 16:
            raise ValueError(f"canvas must be at least 16 pixels, got {canvas}")
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"expected 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        if not 0 < min_informative <= max_informative <= 1:
            raise ValueError(f"expected 0 < min_informative <= max_informative <= 1, got {min_informative}, "
                             f"{max_informative}")
        if distractors < 0 or not 1 <= fragment <= 28 or noise < 0 or max_speed < 0 or repeats < 1:
            raise ValueError(f"expected distractors >= 0, 1 <= fragment <= 28, noise >= 0, max_speed >= 0, "
                             f"repeats >= 1; got {distractors}, {fragment}, {noise}, {max_speed}, {repeats}")
        self.config = MovingDigitsConfig(frames, canvas, min_scale, max_scale, min_informative, max_informative,
                                         distractors, fragment, noise, max_speed)
        self.split, self.seed, self.frames, self.input_size = split, seed, frames, canvas
        images, labels = load_mnist_digits()
        pool = split_indices(split, seed)
        idx = pool.repeat(repeats)
        if limit is not None:
            idx = idx[:limit]
        n = len(idx)
        self.targets = labels[idx]
        self.clips = torch.empty(n, frames, 1, canvas, canvas, dtype=torch.uint8)
        self.informative = torch.zeros(n, frames, dtype=torch.bool)
        self.positions = torch.zeros(n, frames, 2, dtype=torch.int64)
        self.sizes = torch.zeros(n, dtype=torch.int64)
        code = SPLITS.index(split)
        steps = np.arange(frames)
        for i in range(n):
            rng = np.random.default_rng([seed, code, i, frames, canvas, 0x6D64])
            frames_i, info, pos, size = self._render(rng, images[int(idx[i])], images, pool, steps)
            self.clips[i, :, 0] = frames_i.mul_(255).round_().to(torch.uint8)
            self.informative[i], self.positions[i], self.sizes[i] = info, pos, size

    def _render(self, rng: np.random.Generator, digit: Tensor, images: Tensor, pool: Tensor, steps: np.ndarray
                ) -> tuple[Tensor, Tensor, Tensor, int]:
        c = self.config
        t, canvas = c.frames, c.canvas
        scale = float(rng.uniform(c.min_scale, c.max_scale))
        size = max(4, int(round(scale * canvas)))
        # informative frames: a contiguous run or a scattered subset, half of the clips each
        lo, hi = max(1, int(round(c.min_informative * t))), max(1, int(round(c.max_informative * t)))
        k = int(rng.integers(lo, hi + 1))
        info = np.zeros(t, dtype=bool)
        if rng.random() < 0.5:
            start = int(rng.integers(0, t - k + 1))
            info[start:start + k] = True
        else:
            info[rng.choice(t, size=k, replace=False)] = True
        start = rng.uniform(0, canvas - size, size=2)
        velocity = rng.uniform(-c.max_speed, c.max_speed, size=2)
        pos = _bounce(start, velocity, steps, canvas - size)
        frames = torch.zeros(t, canvas, canvas)
        shown = np.flatnonzero(info)
        patch = _resize(digit[None], size).expand(len(shown), size, size)
        _paste_max(frames, patch, torch.from_numpy(shown), torch.from_numpy(pos[shown]))
        # distractors: fragments of other digits of the split, shrunk like the digit, in the other frames
        empty = np.flatnonzero(~info)
        m = len(empty) * c.distractors
        if m:
            src = images[pool[torch.from_numpy(rng.integers(len(pool), size=m))]]
            fy, fx = rng.integers(0, 28 - c.fragment + 1, size=(2, m))
            crops = src[torch.arange(m)[:, None, None], torch.from_numpy(fy)[:, None, None] +
                        torch.arange(c.fragment)[None, :, None],
                        torch.from_numpy(fx)[:, None, None] + torch.arange(c.fragment)[None, None, :]]
            fsize = max(2, int(round(size * c.fragment / 28)))
            corners = torch.from_numpy(rng.integers(0, canvas - fsize + 1, size=(m, 2)))
            _paste_max(frames, _resize(crops, fsize), torch.from_numpy(np.repeat(empty, c.distractors)), corners)
        if c.noise > 0:
            frames.add_(torch.from_numpy(rng.standard_normal((t, canvas, canvas)).astype(np.float32)) * c.noise)
        return frames.clamp_(0, 1), torch.from_numpy(info), torch.from_numpy(pos), size
