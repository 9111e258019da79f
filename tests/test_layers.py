import pytest
import torch
from torch import nn

from dyncnn import count_macs
from dyncnn.layers import (ChannelShuffle, ConvNormAct, DepthwiseSeparableConv, GroupConv2d, HardSigmoid, HardSwish,
                           SqueezeExcite, channel_shuffle, channel_unshuffle, get_act_layer, make_divisible)


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8])
def test_channel_shuffle_is_a_permutation_and_inverse_restores(groups):
    c = 24
    x = torch.arange(c).float().view(1, c, 1, 1).expand(2, c, 3, 3).contiguous()
    y = channel_shuffle(x, groups)
    order = y[0, :, 0, 0].long().tolist()
    assert sorted(order) == list(range(c))
    # channel k*G + g of the output comes from group g, position k of the input
    k = c // groups
    assert order == [g * k + i for i in range(k) for g in range(groups)]
    assert torch.equal(channel_unshuffle(y, groups), x)
    assert torch.equal(ChannelShuffle(groups)(x), y)


def test_channel_shuffle_rejects_indivisible():
    with pytest.raises(ValueError, match="cannot be split into 5 groups"):
        channel_shuffle(torch.zeros(1, 12, 2, 2), 5)


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_group_conv_has_one_over_g_weights_and_macs(groups):
    x = torch.randn(1, 32, 8, 8)
    dense, grouped = GroupConv2d(32, 64, 3, groups=1), GroupConv2d(32, 64, 3, groups=groups)
    assert grouped.weight.numel() * groups == dense.weight.numel()
    assert count_macs(grouped, x).total * groups == count_macs(dense, x).total
    assert grouped(x).shape == dense(x).shape == (1, 64, 8, 8)


def test_group_conv_names_widths_when_indivisible():
    with pytest.raises(ValueError, match="in_channels=30, out_channels=64"):
        GroupConv2d(30, 64, 1, groups=4)


def test_depthwise_separable_cost_and_shape():
    x = torch.randn(1, 16, 10, 10)
    m = DepthwiseSeparableConv(16, 32, stride=2)
    assert m(x).shape == (1, 32, 5, 5)
    # depthwise 3x3 on 16 channels + pointwise 16->32, at 5x5 output positions
    assert count_macs(m, x).total == 5 * 5 * (16 * 9 + 16 * 32)


def test_conv_norm_act_is_torchvision_block():
    m = ConvNormAct(3, 8, 3, stride=2, activation_layer=nn.ReLU6)
    assert isinstance(m[0], nn.Conv2d) and m[0].padding == (1, 1) and m[0].bias is None
    assert isinstance(m[1], nn.BatchNorm2d) and isinstance(m[2], nn.ReLU6)


def test_squeeze_excite_rescales_channels_per_sample():
    se = SqueezeExcite(16).eval()
    assert se.fc1.out_channels == make_divisible(16 * 0.25, 8) == 8
    x = torch.randn(2, 16, 5, 5)
    y = se(x)
    # the same positive scale for every position of a channel, different per sample
    ratio = y / x
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-5)
    assert (ratio > 0).all() and (ratio <= 1).all()
    assert not torch.allclose(ratio[0, :, 0, 0], ratio[1, :, 0, 0])


def test_hard_activations_match_their_definitions():
    x = torch.linspace(-5, 5, 101)
    assert torch.allclose(HardSigmoid()(x), torch.clamp(x + 3, 0, 6) / 6)
    assert torch.allclose(HardSwish()(x), x * torch.clamp(x + 3, 0, 6) / 6)
    assert get_act_layer("hard_swish") is nn.Hardswish
    with pytest.raises(ValueError, match="expected one of"):
        get_act_layer("swishy")


@pytest.mark.parametrize("value,expected", [(32 * 0.75, 24), (16 * 0.35, 8), (96 * 1.4, 136), (3, 8)])
def test_make_divisible(value, expected):
    assert make_divisible(value) == expected
