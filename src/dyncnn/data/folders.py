"""Users' data from local folders: CIFAR-10/100 in its own format, and ImageFolder trees. Nothing downloads."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from ..errors import DyncnnError

CIFAR_LAYOUT = {
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta}",
    "cifar100": "ROOT/cifar-100-python/{train, test, meta}",
}
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR python batches and nothing else: dicts, lists, str/bytes, numbers and numpy arrays.
    Any other global (``os.system``, a class with ``__reduce__``) is refused, so that a crafted file in
    ``--data-root`` cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch never holds")


def load_cifar_pickle(path: str | os.PathLike, keys: tuple[str, ...]) -> dict:
    """A CIFAR python batch or meta file, read with :class:`_BatchUnpickler`; a file that is not one (garbage,
    another pickle, a crafted one) is a DyncnnError naming the file and what was expected."""
    expected = f"a CIFAR python batch (a pickled dict with {' / '.join(keys)})"
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except Exception as e:      # UnpicklingError, EOFError, ValueError, ...: all mean "not a CIFAR batch"
        raise DyncnnError(f"{path} is not {expected}: {type(e).__name__}: {e}") from None
    if not isinstance(entry, dict) or not any(k in entry for k in keys):
        raise DyncnnError(f"{path} is not {expected}: it holds a {type(entry).__name__}"
                          + (f" with keys {sorted(map(str, entry))[:6]}" if isinstance(entry, dict) else ""))
    return entry


def _cifar_init(self, root, train: bool = True, transform=None, target_transform=None, download: bool = False):
    """torchvision's CIFAR ``__init__`` with every file read by :func:`load_cifar_pickle` and presence checks
    instead of md5 checks (a local copy that was re-packed or subset, as in our tests, loads)."""
    datasets.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
    self.train = train
    folder = os.path.join(self.root, self.base_folder)
    data, targets = [], []
    for name, _ in (self.train_list if train else self.test_list):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing")
        entry = load_cifar_pickle(path, ("data",))
        labels = entry.get("labels", entry.get("fine_labels"))
        x = entry.get("data")
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or \
                not isinstance(labels, list) or len(labels) != len(x) or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise DyncnnError(f"{path} is not a CIFAR python batch: expected 'data' uint8 (N, 3072) and N integer "
                              f"labels, got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')} "
                              f"and {len(labels) if isinstance(labels, list) else type(labels).__name__} labels")
        data.append(x)
        targets.extend(labels)
    self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
    self.targets = targets
    meta_path = os.path.join(folder, self.meta["filename"])
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} is missing")
    classes = load_cifar_pickle(meta_path, (self.meta["key"],)).get(self.meta["key"])
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DyncnnError(f"{meta_path}: expected a list of class names under {self.meta['key']!r}")
    if any(not 0 <= v < len(classes) for v in targets):
        raise DyncnnError(f"{folder}: labels must lie in [0, {len(classes)}) for the {len(classes)} classes of "
                          f"{self.meta['filename']}")
    self.classes = classes
    self.class_to_idx = {c: i for i, c in enumerate(classes)}


def _relaxed(cls):
    """The torchvision CIFAR class reading its files with a restricted unpickler (see :func:`_cifar_init`)."""
    return type(f"Local{cls.__name__}", (cls,), {"__init__": _cifar_init})


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
    except DyncnnError:
        raise
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


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FOLDER_LAYOUT = ("ROOT/{train,val,test}/CLASS_NAME/IMAGE (val and test optional: carved from train with the seed), "
                 "or ROOT/CLASS_NAME/IMAGE (split 80/10/10 with the seed)")
FOLDER_SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def folder_transforms(input_size: int, augment: bool, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1]):
    """torchvision transforms v2 of an image folder: in training a random resized crop and flip, else a resize to
    ``input_size * 256 / 224`` and a centre crop (the ImageNet recipe), then float in [0, 1] and normalisation."""
    from torchvision.transforms import v2
    if augment:
        geometry = [v2.RandomResizedCrop(input_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(int(input_size * 256 / 224), antialias=True), v2.CenterCrop(input_size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class FolderSplit(Dataset):
    """One split of an ImageFolder tree: ``indices`` of ``base`` (an untransformed ``ImageFolder``) read through
    ``transform``; ``num_classes``, ``in_chans``, ``input_size``, ``classes`` and ``targets`` as every dataset."""

    def __init__(self, base: datasets.ImageFolder, indices: list[int], transform, input_size: int):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.classes, self.num_classes, self.in_chans, self.input_size = base.classes, len(base.classes), 3, input_size
        self.targets = [base.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i]]
        return self.transform(image), label


def _read_tree(path: Path) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"cannot read image folder {path}: {e}. Expected {FOLDER_LAYOUT}, images with an "
                                f"image extension") from None


def _carve(n: int, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Disjoint index lists of ``n`` samples: each split but ``train`` gets its fraction (at least one sample),
    ``train`` the rest; the order is a permutation drawn from ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = {}, 0
    for name in (s for s in fractions if s != "train"):
        size = max(1, round(n * fractions[name]))
        out[name] = perm[start:start + size]
        start += size
    if start >= n:
        raise DyncnnError(f"an image folder of {n} images is too small to carve {', '.join(out)} from it; add "
                          f"images or give the split folders")
    out["train"] = perm[start:]
    return out


def image_folder(root: str | os.PathLike, split: str = "train", input_size: int = 224,
                 augment: bool | None = None, seed: int = 0) -> Dataset:
    """An ImageFolder tree (layouts in :data:`FOLDER_LAYOUT`), read with torchvision transforms v2
    (:func:`folder_transforms`), RGB, ImageNet-normalised: ``get_dataset("folder", split, root=DIR)``. A split
    folder that is absent is carved from ``train`` (val: 10%, test: 10%) or, with no ``train`` folder, from the
    class folders at the top (80/10/10), by ``seed``. Nothing is downloaded."""
    if split not in FOLDER_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {FOLDER_LAYOUT}")
    tf = folder_transforms(input_size, split == "train" if augment is None else augment)
    if (root / split).is_dir():
        base = _read_tree(root / split)
        indices = list(range(len(base)))
        if split == "train":           # absent val / test folders are carved from train: keep them out of it
            missing = {s: f for s, f in FOLDER_SPLITS.items() if s != "train" and not (root / s).is_dir()}
            if missing:
                indices = _carve(len(base), {"train": 1 - sum(missing.values()), **missing}, seed)["train"]
    elif (root / "train").is_dir():
        base = _read_tree(root / "train")
        missing = {s: f for s, f in FOLDER_SPLITS.items() if s != "train" and not (root / s).is_dir()}
        indices = _carve(len(base), {"train": 1 - sum(missing.values()), **missing}, seed)[split]
    else:
        base = _read_tree(root)
        indices = _carve(len(base), FOLDER_SPLITS, seed)[split]
    return FolderSplit(base, indices, tf, input_size)
