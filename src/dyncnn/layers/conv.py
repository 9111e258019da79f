"""Convolution blocks: conv + norm + activation, group convolution, depthwise-separable convolution.

``ConvNormAct`` is torchvision's ``Conv2dNormActivation`` (same parameter names, same ``same``-padding rule), so
that models built from it are layer-for-layer comparable with torchvision's.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

ConvNormAct = Conv2dNormActivation


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of ``divisor`` without going more than 10% below ``value``.

    The one rule of channel rounding used by MobileNet V2/V3 (torchvision's ``_make_divisible``) and timm; every
    width multiplier in dyncnn goes through here.
    """
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < round_limit * value:
        new += divisor
    return new


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"group convolution with {groups} groups needs in_channels and out_channels divisible "
                         f"by {groups}, got in_channels={in_channels}, out_channels={out_channels}")


class GroupConv2d(nn.Conv2d):
    """A convolution split into ``groups`` independent groups: 1/G of the weights and of the MACs of a dense one.

    Same as ``nn.Conv2d(..., groups=G)`` but checks divisibility up front with a message that names the widths.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1,
                 stride: int = 1, padding: int | None = None, bias: bool = False, **kwargs):
        _check_groups(in_channels, out_channels, groups)
        if padding is None:
            padding = (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, bias=bias, **kwargs)


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise k x k convolution (one filter per channel) followed by a pointwise 1x1 convolution.

    The MobileNetV1 unit: cost H*W*C*(k^2 + C_out) instead of H*W*C*k^2*C_out for a dense convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] | None = nn.ReLU,
                 pw_act: bool = True):
        super().__init__(
            ConvNormAct(in_channels, in_channels, kernel_size, stride=stride, groups=in_channels,
                        norm_layer=norm_layer, activation_layer=act_layer),
            ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer,
                        activation_layer=act_layer if pw_act else None),
        )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride


def take_conv_weights(layer: nn.Module, conv: nn.Conv2d) -> nn.Module:
    """Move ``layer`` to ``conv``'s device and dtype and copy its ``weight`` (and ``bias``) into it: how a dynamic
    layer built ``from_conv`` starts equal to the static convolution it replaces."""
    layer.to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    return layer
