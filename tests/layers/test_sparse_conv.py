"""Sparse convolution primitives: equal to the dense convolution at every active position, for every density."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.layers.sparse_conv import (Positions, check_mask, compact_neighbours, dilate_mask, fold_bn, scatter_rows,
                                       sparse_conv, sparse_conv2d, to_padded_rows, to_rows)

DENSITIES = (0.0, 0.1, 0.25, 0.5, 1.0)


def _random_mask(n, h, w, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    if density >= 1.0:
        return torch.ones(n, h, w, dtype=torch.bool)
    return torch.rand(n, h, w, generator=g) < density


def _bn(c):
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kind", ["1x1", "3x3", "dw3x3"])
def test_sparse_equals_dense_at_active_positions(kind, density):
    c_in, c_out = 6, (6 if kind == "dw3x3" else 5)
    k, groups = (1, 1) if kind == "1x1" else (3, c_in if kind == "dw3x3" else 1)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False).eval()
    bn, act = _bn(c_out), nn.ReLU()
    x = torch.randn(3, c_in, 9, 7)
    mask = _random_mask(3, 9, 7, density, seed=int(density * 100))
    with torch.no_grad():
        dense = act(bn(conv(x)))
        sparse = sparse_conv2d(x, mask, conv, bn, act)
    m = mask.unsqueeze(1).expand_as(dense)
    assert torch.allclose(sparse[m], dense[m], atol=1e-5)
    assert bool((sparse[~m] == 0).all())            # nothing computed where the mask is off
    assert sparse.shape == dense.shape


def test_macs_counted_are_the_active_positions():
    x = torch.randn(2, 4, 8, 8)
    mask = _random_mask(2, 8, 8, 0.25, seed=3)
    for conv in (nn.Conv2d(4, 7, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                 nn.Conv2d(4, 7, 1, bias=False)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            sparse_conv2d(x, mask, conv)
        assert counter.get_total_flops() // 2 == conv.weight.numel() * int(mask.sum())


def test_positions_and_neighbours():
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 2, 3] = True
    pos = Positions.from_mask(mask, pad=1)
    assert pos.flat.tolist() == [1 * 20 + 2 * 5 + 3]
    assert pos.counts.tolist() == [0, 1]
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5)
    rows = to_padded_rows(x, 1)
    nb = rows[pos.neighbours(3)].view(3, 3)
    assert torch.equal(nb, x[1, 0, 1:4, 2:5])
    assert torch.equal(to_rows(x)[pos.flat, 0], x[1, 0, 2, 3].view(1))


def test_dilate_mask_matches_footprint():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 4, 3] = True
    d = dilate_mask(mask, 3)
    assert int(d.sum()) == 4 + 9
    assert bool(d[0, 3:6, 2:5].all()) and bool(d[0, :2, :2].all()) and not bool(d[0, 2, 2])
    soft = mask.float().unsqueeze(1).requires_grad_()
    dilate_mask(soft, 3).sum().backward()             # the straight-through mask keeps a gradient
    assert soft.grad is not None and soft.grad.sum() > 0


def test_fold_bn_matches_eval_norm():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), _bn(4)
    w, b = fold_bn(conv, bn)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), atol=1e-5)


def test_bad_masks_raise():
    x = torch.randn(2, 3, 4, 4)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    with pytest.raises(ValueError, match=r"\(N, H, W\) = \(2, 4, 4\)"):
        check_mask(x, torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool"):
        sparse_conv2d(x, torch.ones(2, 4, 4), conv)
    with pytest.raises(ValueError, match="stride-1"):
        sparse_conv2d(x, torch.ones(2, 4, 4, dtype=torch.bool), nn.Conv2d(3, 3, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="odd"):
        dilate_mask(torch.ones(1, 4, 4, dtype=torch.bool), 2)
    pos = Positions.from_mask(torch.ones(2, 4, 4, dtype=torch.bool), pad=1)
    with pytest.raises(ValueError, match="do not match"):
        sparse_conv(to_rows(x), pos, conv.weight)          # a 3x3 kernel needs padded rows


@pytest.mark.parametrize("n", [1, 3])
def test_padded_rows_and_flat_indices_for_every_layout(n):
    wide = torch.randn(n, 5, 6, 9)
    x = wide[..., 1:8].contiguous()
    ref = torch.zeros(n, 8, 9, 5)
    ref[:, 1:7, 1:8] = x.permute(0, 2, 3, 1)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), wide[..., 1:8]):      # NCHW, NHWC, strided
        rows = to_padded_rows(inp, 1)
        assert rows.is_contiguous() and torch.equal(rows, ref.view(-1, 5))
    mask = _random_mask(n, 6, 7, 0.3, seed=n)
    pos = Positions.from_mask(mask, pad=2)
    b, r, c = mask.nonzero().unbind(1)
    assert torch.equal(pos.flat, (b * 6 + r) * 7 + c)
    assert torch.equal(pos.padded, (b * 10 + r + 2) * 11 + c + 2)


def test_compact_neighbours_read_like_a_zeroed_padded_map():
    mask = _random_mask(2, 6, 5, 0.3, seed=4)
    pos_m = Positions.from_mask(mask, pad=1)
    pos_d = Positions.from_mask(dilate_mask(mask, 3), pad=1)
    feats = torch.randn(len(pos_d), 4)
    padded = scatter_rows(feats, pos_d.padded, torch.zeros(2 * 8 * 7, 4))
    compact = torch.cat([feats, feats.new_zeros(1, 4)])
    assert torch.equal(compact[compact_neighbours(pos_m, pos_d, 3)], padded[pos_m.neighbours(3)])
