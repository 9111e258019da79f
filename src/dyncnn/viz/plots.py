from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_training_curves(history: Sequence[dict], path: str | Path, title: str = "",
                         loss_label: str = "cross-entropy loss", accuracy_label: str = "accuracy (%)") -> Path:
    """Train/val loss and accuracy per epoch from a trainer history (``metrics.jsonl`` records).

    ``loss_label`` names the loss on its axis (a multi-exit network trains on the sum of its exits' losses, which is
    not the last exit's). Every epoch is a marker, so that a run of one or two epochs is not an empty plot.
    """
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    style = {"marker": "o", "ms": 5}
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train", **style)
    if history and all("val_loss" in h for h in history):
        ax1.plot(epochs, [h["val_loss"] for h in history], label="validation", **style)
    ax1.set_xlabel("epoch"), ax1.set_ylabel(loss_label), ax1.legend()
    ax2.plot(epochs, [100 * h["train_acc"] for h in history], label="train", **style)
    if history and all("val_acc" in h for h in history):
        ax2.plot(epochs, [100 * h["val_acc"] for h in history], label="validation", **style)
    ax2.set_xlabel("epoch"), ax2.set_ylabel(accuracy_label), ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)    # epochs are whole numbers
        if len(epochs) == 1:                                       # one point: give it room on the axis
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_by_scale(bin_edges: Sequence[float], accuracy: Sequence[float], counts: Sequence[int],
                           path: str | Path, title: str = "") -> Path:
    """Accuracy per digit-scale bin: small digits are the hard inputs a dynamic network should send deeper."""
    centers = [(a + b) / 2 for a, b in zip(bin_edges[:-1], bin_edges[1:])]
    widths = [(b - a) * 0.9 for a, b in zip(bin_edges[:-1], bin_edges[1:])]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(centers, accuracy, width=widths)
    for c, a, n in zip(centers, accuracy, counts):
        ax.text(c, a + 0.01, f"n={n}", ha="center", fontsize=7)
    ax.set_xlabel("digit side / canvas side"), ax.set_ylabel("test accuracy"), ax.set_ylim(0, 1.08)
    ax.set_title(title)
    return _save(fig, path)
