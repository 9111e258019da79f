import pickle

import numpy as np
import pytest
import torch

import dyncnn
from dyncnn.data import MNISTDigits, ScaledMNIST, get_dataset, load_mnist_digits, split_indices
from dyncnn.data.folders import cifar, image_folder


def test_embedded_digits_are_real_and_shuffled_before_split():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    idx = {s: split_indices(s) for s in ("train", "val", "test")}
    assert [len(v) for v in idx.values()] == [3500, 500, 1000]
    all_idx = torch.cat(list(idx.values()))
    assert len(set(all_idx.tolist())) == 5000                     # disjoint, complete
    for split in idx.values():                                    # every class in every split
        assert len(torch.unique(labels[split])) == 10
    assert torch.equal(split_indices("val", seed=0), idx["val"])
    assert not torch.equal(split_indices("val", seed=1), idx["val"])
    ds = MNISTDigits("val")
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_scaled_mnist_deterministic_with_metadata():
    a = ScaledMNIST("val", canvas=48, clutter=2, seed=3)
    b = ScaledMNIST("val", canvas=48, clutter=2, seed=3)
    c = ScaledMNIST("val", canvas=48, clutter=2, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.scales, b.scales)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (500, 1, 48, 48)
    assert float(a.scales.min()) >= 0.2 and float(a.scales.max()) <= 0.95
    assert a.scales.std() > 0.1                                    # a real spread of sizes
    x, y = a[5]
    assert x.shape == (1, 48, 48) and 0 <= y < 10
    # the digit is where the metadata says: the digit's box holds most of its ink
    top, left = a.positions[5].tolist()
    side = int(round(float(a.scales[5]) * 48))
    clean = ScaledMNIST("val", canvas=48, clutter=0, seed=3)
    top, left = clean.positions[5].tolist()
    side = int(round(float(clean.scales[5]) * 48))
    img = clean.images[5, 0].float()
    assert img[top:top + side, left:left + side].sum() == pytest.approx(img.sum())


def test_scaled_mnist_bad_options():
    with pytest.raises(ValueError, match="min_scale"):
        ScaledMNIST("val", min_scale=0.8, max_scale=0.5)
    with pytest.raises(ValueError, match="unknown split"):
        ScaledMNIST("validation")
    with pytest.raises(ValueError, match="expected one of mnist, scaled_mnist"):
        get_dataset("imagenet")


def _write_tiny_cifar(root, n_train=12, n_test=6, classes=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, classes, n_train).tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, classes, n_test).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(classes)]}, f)
    return folder


def test_cifar_from_local_files(tmp_path):
    _write_tiny_cifar(tmp_path)
    train = cifar("cifar10", tmp_path, "train", val_size=10)
    val = cifar("cifar10", tmp_path, "val", val_size=10)
    test = get_dataset("cifar10", "test", root=str(tmp_path))
    assert (len(train), len(val), len(test)) == (50, 10, 6)
    assert set(train.indices).isdisjoint(val.indices)
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert train.num_classes == 10 and train.in_chans == 3


def test_cifar_missing_or_malformed_path_names_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/\{data_batch_1"):
        cifar("cifar10", tmp_path / "nowhere")
    folder = _write_tiny_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        cifar("cifar10", tmp_path)
    with pytest.raises(ValueError, match="reads a local folder"):
        get_dataset("cifar10")


def test_image_folder(tmp_path):
    from PIL import Image
    for cls in ("cat", "dog"):
        d = tmp_path / "train" / cls
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir(parents=True)
    for i, cls in enumerate(("cat", "dog")):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "val" / cls / "0.png")
    ds = image_folder(tmp_path, "train", input_size=32)
    assert len(ds) == 3 and ds.num_classes == 2 and ds[0][0].shape == (3, 32, 32)   # one carved out as test
    assert len(image_folder(tmp_path, "val")) == 2 and len(image_folder(tmp_path, "test", input_size=32)) == 1
    with pytest.raises(FileNotFoundError, match="ROOT/\\{train,val,test\\}/CLASS_NAME"):
        image_folder(tmp_path / "nowhere", "val")


def test_scaled_mnist_repeats_render_new_placements():
    one = ScaledMNIST("val", canvas=32, seed=1)
    three = ScaledMNIST("val", canvas=32, seed=1, repeats=3)
    assert len(three) == 3 * len(one)
    assert torch.equal(three.images[:500], one.images)                   # the first rendering is unchanged
    assert torch.equal(three.targets[500:1000], one.targets)             # the same digits again ...
    assert not torch.equal(three.images[500:1000], one.images)           # ... placed anew
    with pytest.raises(ValueError, match="repeats"):
        ScaledMNIST("val", repeats=0)


def test_folder_dataset_with_transforms_v2(image_tree, write_image_tree, tmp_path):
    splits = {s: get_dataset("folder", s, root=str(image_tree), input_size=16) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 2, 2]          # 80/10/10 of 24, by seed
    assert sorted(sum((splits[s].indices for s in splits), [])) == list(range(24))   # disjoint, all of them
    assert get_dataset("folder", "val", root=str(image_tree), input_size=16).indices == splits["val"].indices
    assert get_dataset("folder", "val", root=str(image_tree), seed=1, input_size=16).indices != splits["val"].indices
    val = splits["val"]
    assert (val.num_classes, val.in_chans, val.input_size, val.classes) == (3, 3, 16, ["blue", "green", "red"])
    x, y = val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    # eval: resize + centre crop, no randomness; then [0, 1] and ImageNet normalisation
    torch.testing.assert_close(val[0][0], x)
    raw = np.asarray(val.base.loader(val.base.samples[val.indices[0]][0]), dtype=np.float32) / 255
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    assert torch.allclose(x.mean((1, 2)) * std + mean, torch.from_numpy(raw).mean((0, 1)), atol=0.02)
    assert int(x.mean((1, 2)).argmax()) == {"red": 0, "green": 1, "blue": 2}[val.classes[y]]
    assert splits["train"][0][0].shape == (3, 16, 16)
    with pytest.raises(dyncnn.DyncnnError, match="too small to carve"):
        get_dataset("folder", "train", root=str(write_image_tree(tmp_path, per_class=1, classes=("a",))))
    with pytest.raises(ValueError, match="reads a local folder"):
        get_dataset("folder")
