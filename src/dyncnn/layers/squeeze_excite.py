"""Squeeze-and-excitation: per-sample channel attention, torchvision's ``SqueezeExcitation``.

MobileNetV3 uses it with a hard-sigmoid gate and a squeeze width rounded by ``make_divisible(C / 4)``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.ops import SqueezeExcitation

from .conv import make_divisible


class SqueezeExcite(SqueezeExcitation):
    """``SqueezeExcitation`` with the squeeze width given as a ratio of the input channels, rounded to 8."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, divisor: int = 8,
                 act_layer: Callable[..., nn.Module] = nn.ReLU,
                 gate_layer: Callable[..., nn.Module] = nn.Hardsigmoid):
        super().__init__(channels, make_divisible(channels * rd_ratio, divisor),
                         activation=act_layer, scale_activation=gate_layer)
        self.channels = channels
