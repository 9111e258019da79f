"""Datasets: the embedded MNIST digits (plain and ScaledMNIST), CIFAR from a local folder, ImageFolder trees."""
from __future__ import annotations

from torch.utils.data import Dataset

from .folders import cifar, image_folder
from .canvas import large_canvas_mnist
from .sequences import ClipFeatureSequences, RowSequenceDigits
from .video import MovingDigits
from .mnist import MNISTDigits, ScaledMNIST, load_mnist_digits, split_indices

DATASETS = ("mnist", "scaled_mnist", "scaled_mnist_large", "moving_digits", "mnist_rows", "clip_features", "cifar10",
            "cifar100", "folder", "imagefolder")


def get_dataset(name: str, split: str = "train", root: str | None = None, seed: int = 0, **kwargs) -> Dataset:
    """Build a dataset by name. Every dataset has ``num_classes``, ``in_chans`` and ``input_size`` attributes.

    ``mnist`` and ``scaled_mnist`` are embedded (no ``root``); ``cifar10``/``cifar100``/``folder`` (an ImageFolder
    tree, also called ``imagefolder``; ``input_size=`` its side, default 224) read ``root`` and never download.
    """
    if name == "mnist":
        return MNISTDigits(split, seed=seed)
    if name == "scaled_mnist":
        return ScaledMNIST(split, seed=seed, **kwargs)
    if name == "scaled_mnist_large":       # 128x128 canvas, small digits and clutter: a 32x32 glance is not enough
        from .canvas import large_canvas_mnist
        return large_canvas_mnist(split, seed=seed, **kwargs)
    if name == "moving_digits":            # clips (T, 1, H, W) of a digit moving in some frames only
        return MovingDigits(split, seed=seed, **kwargs)
    if name == "mnist_rows":               # the digits read row by row: sequences (28, 28)
        return RowSequenceDigits(split, seed=seed)
    if name == "clip_features":            # moving-digit clips as sequences of pooled frames (T, 256)
        return ClipFeatureSequences(split, seed=seed, **kwargs)
    if name in ("cifar10", "cifar100", "folder", "imagefolder"):
        if root is None:
            raise ValueError(f"dataset {name!r} reads a local folder: pass root=PATH (--data-root on the CLI)")
        if name in ("folder", "imagefolder"):
            return image_folder(root, split, seed=seed, **kwargs)
        return cifar(name, root, split, seed=seed, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "get_dataset", "MNISTDigits", "ScaledMNIST", "load_mnist_digits", "split_indices",
           "cifar", "image_folder",
           "large_canvas_mnist", "MovingDigits", "RowSequenceDigits", "ClipFeatureSequences"]
