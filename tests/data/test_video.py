"""MovingDigits: deterministic clips whose metadata (informative frames, positions) matches their pixels."""
import pytest
import torch

from dyncnn.data.mnist import load_mnist_digits, split_indices
from dyncnn.data.video import MovingDigits

SMALL = dict(frames=8, canvas=32, limit=6)


def test_shapes_attributes_and_labels():
    d = MovingDigits("val", **SMALL)
    x, y = d[0]
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert (d.num_classes, d.in_chans, d.input_size, d.frames, len(d)) == (10, 1, 32, 8, 6)
    _, labels = load_mnist_digits()
    assert d.targets.tolist() == labels[split_indices("val")[:6]].tolist()
    assert y == int(d.targets[0])


def test_deterministic_per_seed_split_and_index():
    a, b = MovingDigits("test", **SMALL), MovingDigits("test", **SMALL)
    assert torch.equal(a.clips, b.clips) and torch.equal(a.informative, b.informative)
    # clip i does not depend on how many clips are built
    c = MovingDigits("test", frames=8, canvas=32, limit=3)
    assert torch.equal(c.clips, a.clips[:3]) and torch.equal(c.positions, a.positions[:3])
    other = MovingDigits("test", frames=8, canvas=32, limit=6, seed=1)
    assert not torch.equal(other.clips, a.clips)


def test_metadata_matches_pixels_without_noise_or_distractors():
    d = MovingDigits("train", frames=8, canvas=32, limit=12, noise=0.0, distractors=0)
    for i in range(len(d)):
        clip = d.clips[i, :, 0]
        info, pos, s = d.informative[i], d.positions[i], int(d.sizes[i])
        assert clip[~info].sum() == 0                       # nothing outside the informative frames
        for t in torch.nonzero(info).flatten().tolist():
            top, left = pos[t].tolist()
            assert 0 <= top <= 32 - s and 0 <= left <= 32 - s
            inside = clip[t, top:top + s, left:left + s]
            assert inside.sum() > 0 and inside.sum() == clip[t].sum()   # every lit pixel in the recorded box
        # the digit moves: trajectory with a constant-velocity step (up to bounces and rounding)
        assert pos.shape == (8, 2)
    k = d.informative.sum(1)
    assert bool(((k >= 2) & (k <= 4)).all())                # 25%..50% of 8 frames
    gaps = [(torch.nonzero(r).flatten().diff() > 1).any().item() for r in d.informative]
    assert any(gaps) and not all(gaps)                       # scattered and contiguous subsets both occur


def test_distractors_fill_other_frames_with_partial_smaller_fragments():
    d = MovingDigits("train", frames=8, canvas=32, limit=6, noise=0.0, distractors=2)
    clean = MovingDigits("train", frames=8, canvas=32, limit=6, noise=0.0, distractors=0)
    assert torch.equal(d.informative, clean.informative)
    info = d.informative
    assert torch.equal(d.clips[info], clean.clips[info])      # informative frames unchanged by distractors
    lit = (d.clips[~info] > 0).flatten(1).sum(1)
    assert bool((lit > 0).all())                               # every other frame holds something
    digit_area = (clean.clips[info] > 0).flatten(1).sum(1).float().mean()
    assert lit.float().mean() < 2 * digit_area                # two fragments are smaller than a whole digit


def test_noise_covers_every_frame():
    d = MovingDigits("val", frames=8, canvas=32, limit=2, noise=0.1, distractors=0)
    assert bool(((d.clips > 0).flatten(2).float().mean(2) > 0.2).all())


@pytest.mark.parametrize("kw", [dict(split="nope"), dict(frames=1), dict(canvas=8), dict(min_scale=0.6, max_scale=0.5),
                                dict(min_informative=0.0), dict(fragment=40), dict(noise=-1.0)])
def test_bad_arguments(kw):
    args = dict(frames=8, canvas=32, limit=1)
    args.update(kw)
    with pytest.raises(ValueError):
        MovingDigits(**args)
