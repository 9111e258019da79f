"""The batched fetch of the in-memory datasets: ``__getitems__`` gives the samples ``__getitem__`` gives, at once."""
import pytest
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data._utils.collate import default_collate

from dyncnn.data import MNISTDigits, MovingDigits, RowSequenceDigits, ScaledMNIST
from dyncnn.data.stored import StoredBatch
from dyncnn.train.trainer import stack_samples

IDX = [7, 0, 31, 7, 12, -1]          # out of order, a repeat, a negative index


@pytest.fixture(scope="module")
def scaled():
    return ScaledMNIST("val", canvas=32, clutter=1)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a, b)


def _datasets(scaled):
    return {"scaled": (scaled, scaled.images), "digits": (MNISTDigits("val"), MNISTDigits("val").images),
            "rows": (RowSequenceDigits("val"), RowSequenceDigits("val").images),
            "clips": (MovingDigits("val", frames=4, canvas=32, limit=40), MovingDigits("val", frames=4, canvas=32,
                                                                                         limit=40).clips)}


def test_batched_fetch_equals_the_samples_one_by_one(scaled):
    for name, (ds, pixels) in _datasets(scaled).items():
        batch = ds.__getitems__(IDX)
        assert isinstance(batch, StoredBatch) and len(batch) == len(IDX), name
        one_by_one = [ds[i] for i in IDX]
        for (x, y), (x1, y1), i in zip(batch, one_by_one, IDX):
            _same(x, x1)
            _same(x, pixels[i].float() / 255)            # the plain reference: the stored pixels scaled
            assert type(y) is int and y == y1 == int(ds.targets[i]), name
        images, labels = stack_samples(batch)            # the whole batch at once ...
        ref_images, ref_labels = stack_samples(one_by_one)   # ... as stacking the samples gives it
        _same(images, ref_images)
        _same(labels, ref_labels)
        for got, ref in zip(default_collate(batch), default_collate(one_by_one)):   # any other collate still reads it
            _same(got, ref)


def _in_scaled(ds, i):
    return _in_scaled(ds.dataset, ds.indices[i]) if isinstance(ds, Subset) else i


def test_subset_forwards_the_batched_fetch_with_its_indices(scaled):
    inner = Subset(scaled, list(range(100, 150)))
    for ds in (inner, Subset(inner, list(range(49, -1, -2)))):       # a subset of a subset
        idx = [3, 0, 20, 3, -1]
        batch = ds.__getitems__(idx)
        assert isinstance(batch, StoredBatch)
        images, labels = stack_samples(batch)
        ref_images, ref_labels = stack_samples([ds[i] for i in idx])
        _same(images, scaled.images[[_in_scaled(ds, i) for i in idx]].float() / 255)   # mapped through the subsets
        _same(images, ref_images)
        _same(labels, ref_labels)


def test_an_index_out_of_range_is_refused(scaled):
    for bad in (len(scaled), -len(scaled) - 1):
        with pytest.raises(IndexError, match=f"index {bad} is out of bounds for ScaledMNIST of 500 samples"):
            scaled.__getitems__([0, bad, 1])
    with pytest.raises(IndexError):
        Subset(scaled, range(10)).__getitems__([3, 10])


class _Mirrored(ScaledMNIST):
    """A subclass that makes its samples otherwise: the batched fetch must not bypass it."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x.flip(-1), y


def test_a_subclass_with_its_own_samples_is_fetched_one_by_one():
    ds = _Mirrored("val", canvas=16)
    assert not isinstance(ds.__getitems__([0, 1]), StoredBatch)
    x, y = next(iter(DataLoader(ds, batch_size=4, collate_fn=stack_samples)))
    _same(x, (ds.images[:4].float() / 255).flip(-1))
    assert y.tolist() == ds.targets[:4].tolist()
