"""Learned group convolution and the condensed linear layer: schedule, importance, masks, conversion."""
import math

import pytest
import torch
from torch import nn

from dyncnn.errors import DyncnnError
from dyncnn.layers.learned_group import (CondensedGroupConv, CondensedLinear, ConversionError, LearnedGroupConv,
                                         LearnedLinear, condensing_stage, group_lasso_loss)
from dyncnn.profile.macs import count_macs


def randomize_norm(module: nn.Module, gen: torch.Generator) -> None:
    """Random BN statistics and affine parameters, so that conversion must carry them over correctly."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)


@pytest.mark.parametrize("c, progress, stage", [
    (4, 0.0, 0), (4, 1 / 6 - 1e-6, 0), (4, 1 / 6, 1), (4, 2 / 6, 2), (4, 0.49, 2), (4, 0.5, 3), (4, 1.0, 3),
    (8, 0.5 / 7 * 3, 3), (8, 0.7, 7), (2, 0.25, 0), (2, 0.5, 1), (1, 0.9, 0),
])
def test_condensing_stage_spreads_c_minus_1_stages_over_first_half(c, progress, stage):
    assert condensing_stage(progress, c - 1) == stage


def _ranked_layer(in_chs=16, out_chs=8, groups=4, c=4, seed=0):
    """A layer whose per-group importance of each input is a known random permutation (importance = 2 x rank)."""
    gen = torch.Generator().manual_seed(seed)
    layer = LearnedGroupConv(in_chs, out_chs, groups, c)
    ranks = torch.stack([torch.randperm(in_chs, generator=gen) for _ in range(groups)]).float() + 1  # (G, in)
    with torch.no_grad():
        for o in range(out_chs):
            sign = 1 if o % 3 else -1   # signs must not matter: importance is the L1 norm
            layer.conv.weight[o, :, 0, 0] = sign * ranks[o % groups]
    return layer, ranks


def test_each_stage_drops_exactly_one_cth_per_group_smallest_importance_first():
    layer, ranks = _ranked_layer()
    g, n, c = 4, 16, 4
    assert layer.keep.all()
    for stage, progress in enumerate((1 / 6, 2 / 6, 0.5), start=1):
        layer.set_progress(progress)
        assert layer.stage == stage and int(layer.condense_stage) == stage
        kept = layer.keep.sum(1)
        assert kept.tolist() == [n - stage * (n // c)] * g
        for grp in range(g):
            # the kept inputs are exactly the group's highest-ranked ones
            expected = set(torch.argsort(ranks[grp], descending=True)[: n - stage * (n // c)].tolist())
            assert set(layer.keep[grp].nonzero()[:, 0].tolist()) == expected
    assert layer.condensing_done and layer.kept_per_group == 4


def test_progress_jump_runs_every_due_stage_and_never_goes_back():
    layer, _ = _ranked_layer()
    layer.set_progress(0.9)          # from stage 0 straight to the end: all three steps run
    assert layer.keep.sum(1).tolist() == [4, 4, 4, 4]
    before = layer.keep.clone()
    layer.set_progress(0.1)          # an earlier fraction does not restore anything
    assert torch.equal(layer.keep, before) and layer.stage == 3


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half", None])
def test_set_progress_rejects_values_outside_unit_interval(bad):
    layer, _ = _ranked_layer()
    with pytest.raises(DyncnnError, match=r"\[0, 1\]"):
        layer.set_progress(bad)


def test_a_dropped_input_no_longer_reaches_its_group():
    gen = torch.Generator().manual_seed(1)
    layer = LearnedGroupConv(16, 8, groups=4, condense_factor=4).eval()
    randomize_norm(layer, gen)
    layer.set_progress(0.5)
    x = torch.randn(2, 16, 5, 5, generator=gen)
    g, i = 2, int((~layer.keep[2]).nonzero()[0])     # an input that group 2 dropped
    x2 = x.clone()
    x2[:, i] += 10.0
    d = (layer(x2) - layer(x)).abs().amax(dim=(0, 2, 3))        # change per output channel
    group_of = torch.arange(8) % 4
    assert torch.all(d[group_of == g] == 0)
    assert bool(layer.keep[:, i].any()) == bool((d[group_of != g] > 0).any())


@pytest.mark.parametrize("in_chs, out_chs, groups, c", [(16, 8, 4, 4), (24, 16, 4, 8), (32, 32, 8, 8), (20, 12, 2, 3)])
def test_converted_layer_equals_masked_layer_and_costs_only_kept_connections(in_chs, out_chs, groups, c):
    gen = torch.Generator().manual_seed(in_chs + c)
    layer = LearnedGroupConv(in_chs, out_chs, groups, c)
    nn.init.normal_(layer.conv.weight, generator=gen)
    randomize_norm(layer, gen)
    layer.eval().set_progress(1.0)
    conv = layer.convert()
    assert isinstance(conv, CondensedGroupConv) and not conv.training
    x = torch.randn(2, in_chs, 6, 7, generator=gen)
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-5, atol=1e-5)
    kept = in_chs - (c - 1) * (in_chs // c)
    assert conv.index.numel() == groups * kept
    assert count_macs(conv, x[:1], check=False).total == 6 * 7 * out_chs * kept == 42 * int(layer.weight_mask().sum())


def test_convert_before_condensing_has_finished_is_refused():
    layer, _ = _ranked_layer()
    layer.set_progress(0.2)
    with pytest.raises(ConversionError, match=r"stage 1 of 3.*set_progress"):
        layer.convert()


def test_group_lasso_is_the_sum_of_group_input_norms_and_vanishes_when_done():
    layer, _ = _ranked_layer()
    layer.set_progress(1 / 6)
    w = layer.conv.weight.detach()[:, :, 0, 0] * layer.weight_mask()
    expected = sum(math.sqrt(float((w[g::4, i] ** 2).sum())) for g in range(4) for i in range(16)
                   if layer.keep[g, i])
    loss = layer.group_lasso()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert layer.conv.weight.grad.abs().sum() > 0
    layer.set_progress(0.5)
    assert group_lasso_loss(layer).item() == 0.0


def test_schedule_state_survives_a_state_dict_round_trip():
    layer, _ = _ranked_layer()
    layer.set_progress(1 / 6)
    fresh = LearnedGroupConv(16, 8, 4, 4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.stage == 1 and torch.equal(fresh.keep, layer.keep)
    fresh.set_progress(0.5)
    layer.set_progress(0.5)
    assert torch.equal(fresh.keep, layer.keep)


def test_learned_linear_drops_half_its_inputs_at_the_end_of_condensing():
    gen = torch.Generator().manual_seed(3)
    lin = LearnedLinear(10, 3)
    with torch.no_grad():
        lin.linear.weight.copy_(torch.randn(3, 10, generator=gen))
        lin.linear.bias.copy_(torch.randn(3, generator=gen))
    lin.set_progress(0.49)
    assert lin.keep.all()
    lin.set_progress(0.5)
    importance = lin.linear.weight.abs().sum(0)
    assert set(lin.keep.nonzero()[:, 0].tolist()) == set(importance.argsort(descending=True)[:5].tolist())
    small = lin.convert()
    assert isinstance(small, CondensedLinear) and small.linear.in_features == 5
    x = torch.randn(4, 10, generator=gen)
    torch.testing.assert_close(small(x), lin(x))


def test_invalid_layer_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible by groups"):
        LearnedGroupConv(16, 10, groups=4)
    with pytest.raises(ValueError, match="condense_factor"):
        LearnedGroupConv(2, 8, groups=4, condense_factor=4)
