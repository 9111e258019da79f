"""Users' data from local folders: CIFAR-10/100 in its own format, and ImageFolder trees. Nothing downloads."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

CIFAR_LAYOUT = {
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta}",
    "cifar100": "ROOT/cifar-100-python/{train, test, meta}",
}
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _relaxed(cls):
    """The torchvision CIFAR class with its md5 checks replaced by presence checks, so that a local copy that
    was re-packed or subset (as in our tests) loads; a missing file is still an error."""
    return type(f"Local{cls.__name__}", (cls,), {
        "train_list": [(f, None) for f, _ in cls.train_list],
        "test_list": [(f, None) for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


_CIFAR = {"cifar10": _relaxed(datasets.CIFAR10), "cifar100": _relaxed(datasets.CIFAR100)}


def _val_split(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[val_size:], perm[:val_size]


class _WithMeta(Subset):
    def __init__(self, dataset, indices, num_classes, in_chans, input_size):
        super().__init__(dataset, indices)
        self.num_classes, self.in_chans, self.input_size = num_classes, in_chans, input_size


def cifar(name: str, root: str | os.PathLike, split: str = "train", seed: int = 0, val_size: int = 5000,
          augment: bool | None = None) -> Dataset:
    """CIFAR-10/100 from ``root`` (never downloaded). ``val`` is carved from the training set with ``seed``."""
    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(_CIFAR)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")
    root = Path(root)
    augment = (split == "train") if augment is None else augment
    tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    tf = transforms.Compose(tf + [transforms.ToTensor(), transforms.Normalize(*CIFAR_STATS)])
    try:
        base = _CIFAR[name](str(root), train=split != "test", transform=tf, download=False)
    except (RuntimeError, FileNotFoundError, OSError, KeyError, EOFError, ValueError) as e:
        raise FileNotFoundError(f"cannot load {name} from {root}: {e}. Expected the layout "
                                f"{CIFAR_LAYOUT[name]} (the python version of the archive, unpacked)") from None
    num_classes = len(base.classes)
    if split == "test":
        return _WithMeta(base, list(range(len(base))), num_classes, 3, 32)
    if not 0 <= val_size < len(base):
        raise ValueError(f"val_size must be in [0, {len(base)}), got {val_size}")
    train_idx, val_idx = _val_split(len(base), val_size, seed)
    return _WithMeta(base, train_idx if split == "train" else val_idx, num_classes, 3, 32)


def image_folder(root: str | os.PathLike, split: str = "train", input_size: int = 224,
                 augment: bool | None = None) -> Dataset:
    """An ImageFolder tree ``ROOT/SPLIT/CLASS/*.jpg``; images resized to ``input_size``, ImageNet-normalised."""
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist; expected the layout ROOT/{{train,val,test}}/"
                                f"CLASS_NAME/IMAGE.jpg")
    augment = (split == "train") if augment is None else augment
    if augment:
        tf = [transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(int(input_size * 256 / 224)), transforms.CenterCrop(input_size)]
    tf = transforms.Compose(tf + [transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    try:
        ds = datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"cannot read image folder {path}: {e}. Expected ROOT/SPLIT/CLASS_NAME/IMAGE "
                                f"files with an image extension") from None
    ds.num_classes, ds.in_chans, ds.input_size = len(ds.classes), 3, input_size
    return ds
