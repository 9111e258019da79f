"""Datasets held in memory as one uint8 tensor, and the batched fetch they allow.

Sample ``i`` of such a dataset is ``(pixels[i] / 255 as float, int(targets[i]))``. A DataLoader asks a map-style
dataset for a whole batch through ``__getitems__(indices)`` when the dataset has one (torch >= 2.1; ``Subset``
forwards it with its indices mapped): here that is one index op on the stored tensors instead of one ``__getitem__``
per sample, and the collate function (``train.trainer.stack_samples``) takes the gathered batch as it is.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


def to_unit_float(pixels: Tensor) -> Tensor:
    """uint8 pixels as float32 in [0, 1] (a new tensor)."""
    return pixels.float().div_(255)


class StoredBatch(Sequence):
    """The samples at some indices of a :class:`StoredImages`, gathered by one index op.

    A sequence of ``(image, label)`` samples equal to the dataset's own (so any collate function reads it);
    :meth:`stacked` gives the whole batch at once, equal to stacking those samples.
    """

    def __init__(self, pixels: Tensor, targets: Tensor):
        self.pixels, self.targets = pixels, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return to_unit_float(self.pixels[i]), int(self.targets[i])

    def stacked(self) -> tuple[Tensor, Tensor]:
        """(float images (N, ...), int64 labels (N,)): ``torch.stack`` of the samples and their labels."""
        return to_unit_float(self.pixels), self.targets.to(torch.int64)


class StoredImages(Dataset):
    """A dataset whose pixels are the uint8 tensor named by ``pixels_attr`` (first dimension: the sample) and
    whose labels are the tensor ``targets``."""

    pixels_attr = "images"
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return to_unit_float(getattr(self, self.pixels_attr)[i]), int(self.targets[i])

    def __getitems__(self, indices: list[int]) -> Sequence[tuple[Tensor, int]]:
        # A subclass that makes its samples otherwise (augmentation, other fields) is fetched through its own
        # ``__getitem__``: the batched path would return samples it never makes.
        if type(self).__getitem__ is not StoredImages.__getitem__:
            return [self[i] for i in indices]
        n, idx = len(self), torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and not -n <= int(idx.min()) <= int(idx.max()) < n:
            bad = next(int(i) for i in indices if not -n <= int(i) < n)
            raise IndexError(f"index {bad} is out of bounds for {type(self).__name__} of {n} samples")
        # index_select on the first dimension copies whole rows: ~20x faster than advanced indexing (``x[idx]``),
        # which goes through the generic gather kernel (150 vs 8 us for 64 images of 64x64 on a CPU). It takes no
        # negative indices, so they are made positive first, as ``x[i]`` reads them.
        idx = idx.remainder(n)
        return StoredBatch(getattr(self, self.pixels_attr).index_select(0, idx), self.targets.index_select(0, idx))
