"""Plots of temporally adaptive models: where AdaFocus looked, and how many frames it read.

``plot_focus_strips`` draws, for a few clips, the strip of frames with the patch each read frame was focused on
(a box), the frames never read greyed out and the frames that truly show the digit (MovingDigits' ``informative``
metadata) marked, so one sees at a glance whether the policy found the digit and stopped at the right time.
``plot_frame_usage`` is the histogram of frames read per clip beside the read rate of each frame position.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from ..dynamic.patches import patch_corners  # noqa: E402
from .plots import _save  # noqa: E402


def plot_focus_strips(clips: Tensor, result, patch_size: int, path: str | Path, labels=None,
                      informative: Tensor | None = None, max_clips: int = 4, title: str = "") -> Path:
    """``clips`` (N, T, C, H, W) and the ``AdaFocusResult`` of ``model.infer(clips, ...)`` (its ``centers`` and
    ``choices``); ``informative`` (N, T) bool marks the frames that show the labelled digit (green title)."""
    if clips.dim() != 5:
        raise ValueError(f"expected clips (N, T, C, H, W), got shape {tuple(clips.shape)}")
    n, t, _, h, w = clips.shape
    if result.choices is None or getattr(result, "centers", None) is None or result.choices.shape != (n, t):
        raise ValueError(f"expected an AdaFocusResult for {n} clips of {t} frames (choices and centers)")
    rows = min(n, max_clips)
    fig, axes = plt.subplots(rows, t, figsize=(t * 0.9, rows * 1.05), squeeze=False)
    for i in range(rows):
        pred = int(result.logits[i].argmax())
        for k in range(t):
            ax = axes[i][k]
            img = clips[i, k].float().mean(0).cpu().numpy()
            read = bool(result.choices[i, k] > 0)
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, alpha=1.0 if read else 0.25)
            if read:
                top, left = patch_corners(result.centers[i, k][None], h, w, patch_size)[0].tolist()
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), patch_size, patch_size, fill=False, lw=1.2,
                                       ec="tab:orange"))
            if informative is not None and bool(informative[i, k]):
                ax.set_title("digit", fontsize=6, color="tab:green", pad=1)
            ax.set_xticks([]), ax.set_yticks([])
        lab = f" label {int(labels[i])}" if labels is not None else ""
        axes[i][0].set_ylabel(f"pred {pred}{lab}\n{int(result.exit_index[i]) + 1} frames", fontsize=6)
    fig.suptitle(title or "frames read (greyed: not read) and the patch focused on", fontsize=8)
    return _save(fig, path)


def plot_frame_usage(result, path: str | Path, title: str = "") -> Path:
    """Histogram of frames read per clip (from ``exit_index``) and the fraction of clips reading each frame."""
    choices = result.choices
    if choices is None or choices.dim() != 2:
        raise ValueError("expected a result with choices (N, T): the frames each clip read")
    t = choices.shape[1]
    read = (result.exit_index + 1).cpu()
    counts = torch.bincount(read, minlength=t + 1)[1:].tolist()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    a.bar(range(1, t + 1), counts)
    a.set_xlabel("frames read per clip"), a.set_ylabel("clips")
    a.set_title(f"mean {float(read.float().mean()):.2f} of {t} frames", fontsize=9)
    b.bar(range(1, t + 1), choices.float().mean(0).cpu().tolist(), color="tab:orange")
    b.set_xlabel("frame"), b.set_ylabel("fraction of clips that read it"), b.set_ylim(0, 1.05)
    fig.suptitle(title or "frame usage", fontsize=10)
    return _save(fig, path)
