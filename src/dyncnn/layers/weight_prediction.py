"""Dynamic parameters by weight prediction: a hyper-network predicts each sample's depthwise kernel.

Where CondConv mixes a fixed set of kernels, weight prediction generates the kernel directly: a small network
(global average pool -> Linear -> ReLU -> Linear) maps the pooled input features to a C x k x k depthwise kernel
per sample. Depthwise kernels are small (C * k^2 numbers), so the hyper-network stays cheap. With
``residual=True`` (the default) the prediction is added to a static kernel and the output layer of the
hyper-network starts at zero, so a fresh layer is exactly the static depthwise convolution it was built from.

The per-sample kernels of a batch run as one grouped convolution (groups = N * C), not a loop over samples.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .conv import take_conv_weights
from .dynamic_conv import _exporting, conv_output_size, grouped_conv_per_sample

__all__ = ["PredictedDepthwiseConv2d"]


class PredictedDepthwiseConv2d(nn.Module):
    """Depthwise k x k convolution whose kernel (and optionally bias) is predicted per sample from avgpool(x).

    ``hidden``: width of the hyper-network (default ``max(channels // 16, 8)``). ``residual``: predict an offset
    to a learned static kernel (zero at initialisation) instead of the whole kernel.
    """

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, bias: bool = False, hidden: int | None = None, residual: bool = True):
        super().__init__()
        if channels < 1 or kernel_size < 1:
            raise ValueError(f"PredictedDepthwiseConv2d: channels and kernel_size must be >= 1, "
                             f"got {channels}, {kernel_size}")
        hidden = max(channels // 16, 8) if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"PredictedDepthwiseConv2d: hidden must be >= 1, got {hidden}")
        self.channels, self.residual = channels, residual
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = _pair((kernel_size - 1) // 2 * dilation if padding is None else padding)
        kk = self.kernel_size[0] * self.kernel_size[1]
        self.hyper = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels * kk))
        if residual:
            self.weight = nn.Parameter(torch.empty(channels, 1, *self.kernel_size))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            nn.init.zeros_(self.hyper[-1].weight)
            nn.init.zeros_(self.hyper[-1].bias)
        else:
            self.register_parameter("weight", None)
            with torch.no_grad():   # predicted kernels start at nn.Conv2d's init scale (fan-in k*k)
                self.hyper[-1].weight.mul_(1 / math.sqrt(kk))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def predict_kernels(self, x: Tensor) -> Tensor:
        """(N, C, 1, kh, kw): each sample's depthwise kernel."""
        w = self.hyper(x.mean((2, 3))).view(x.shape[0], self.channels, 1, *self.kernel_size)
        return w + self.weight if self.residual else w

    def forward(self, x: Tensor) -> Tensor:
        if not _exporting() and (x.dim() != 4 or x.shape[1] != self.channels):
            raise ValueError(f"PredictedDepthwiseConv2d: expected input (N, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        w = self.predict_kernels(x)
        b = None if self.bias is None else self.bias.expand(x.shape[0], -1)
        return grouped_conv_per_sample(x, w, b, self.stride, self.padding, self.dilation, self.channels,
                                       self.kernel_size)

    def macs(self, input_size: tuple[int, int]) -> int:
        """Per-sample MACs: the hyper-network's Linears + one depthwise convolution."""
        oh, ow = conv_output_size(tuple(input_size), self.kernel_size, self.stride, self.padding, self.dilation)
        lin = sum(m.in_features * m.out_features for m in self.hyper if isinstance(m, nn.Linear))
        return lin + self.channels * self.kernel_size[0] * self.kernel_size[1] * oh * ow

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, hidden: int | None = None) -> "PredictedDepthwiseConv2d":
        """Built from a depthwise ``nn.Conv2d`` (its kernel becomes the static kernel): equals it when fresh."""
        c = conv.in_channels
        if (conv.groups != c or conv.out_channels != c or isinstance(conv.padding, str)
                or conv.kernel_size[0] != conv.kernel_size[1] or conv.padding_mode != "zeros"):
            raise ValueError(f"PredictedDepthwiseConv2d.from_conv: needs a square depthwise nn.Conv2d "
                             f"(groups == in == out channels, numeric zero padding), got {conv}")
        layer = cls(c, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0],
                    conv.bias is not None, hidden, residual=True)
        layer.stride, layer.padding, layer.dilation = conv.stride, conv.padding, conv.dilation
        return take_conv_weights(layer, conv)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"residual={self.residual}, bias={self.bias is not None}")
