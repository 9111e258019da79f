"""Plots of dynamic networks: accuracy against MACs, exit histogram, easiest/hardest samples gallery."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from .plots import _save  # noqa: E402


def plot_accuracy_vs_macs(curves: dict[str, Sequence[tuple[float, float]]], path: str | Path,
                          anytime: dict[str, Sequence[tuple[float, float]]] | None = None,
                          static: dict[str, tuple[float, float]] | None = None,
                          title: str = "budgeted classification") -> Path:
    """``curves``: name -> [(mean MACs, accuracy)] (budgeted sweep); ``anytime``: name -> per-exit points;
    ``static``: name -> (MACs, accuracy) of single networks."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        pts = sorted(pts)
        ax.plot([m / 1e6 for m, _ in pts], [a * 100 for _, a in pts], "-", label=f"{name} (budgeted)")
    for name, pts in (anytime or {}).items():
        ax.plot([m / 1e6 for m, _ in pts], [a * 100 for _, a in pts], "o--", ms=4, alpha=0.7,
                label=f"{name} (each exit)")
    for name, (m, a) in (static or {}).items():
        ax.plot([m / 1e6], [a * 100], "*", ms=12, label=name)
    ax.set_xlabel("mean MACs per image (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(fig, path)


def plot_exit_histogram(exit_index: Tensor, num_exits: int, path: str | Path, title: str = "") -> Path:
    counts = [int((exit_index == k).sum()) for k in range(num_exits)]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(1, num_exits + 1), counts)
    for k, c in enumerate(counts):
        ax.text(k + 1, c, str(c), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("exit"), ax.set_ylabel("test samples")
    ax.set_xticks(range(1, num_exits + 1))
    ax.set_title(title or "where the samples left")
    return _save(fig, path)


def plot_easy_hard_gallery(images: Tensor, labels: Sequence[int], exit_index: Tensor, path: str | Path,
                           per_row: int = 8, predictions: Sequence[int] | None = None) -> Path:
    """Top row: samples that left at the first exit ("easy"); bottom row: samples that needed the last one.

    Above each image: its true label, and with ``predictions`` the network's prediction (red when wrong).
    """
    first = (exit_index == 0).nonzero().flatten()[:per_row]
    last = (exit_index == int(exit_index.max())).nonzero().flatten()[:per_row]
    fig, axes = plt.subplots(2, per_row, figsize=(per_row * 1.2, 3.2))
    for row, idx, name in ((0, first, "easy:\nfirst exit"), (1, last, "hard:\nlast exit")):
        for j in range(per_row):
            ax = axes[row, j]
            ax.axis("off")
            if j < len(idx):
                i = int(idx[j])
                ax.imshow(images[i].squeeze(0).cpu().numpy(), cmap="gray")
                if predictions is None:
                    ax.set_title(f"label {labels[i]}", fontsize=8)
                else:
                    wrong = int(predictions[i]) != int(labels[i])
                    ax.set_title(f"label {labels[i]}\npred. {int(predictions[i])}", fontsize=8,
                                 color="red" if wrong else "black")
        axes[row, 0].text(-0.15, 0.5, name, transform=axes[row, 0].transAxes, ha="right", va="center",
                          fontsize=8)
    caption = "above each image: true label" + ("; prediction (red: wrong)" if predictions is not None else "")
    fig.suptitle(caption, fontsize=9)
    return _save(fig, path)
