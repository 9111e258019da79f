"""Channel attention as a dynamic parameter: (x * W) (.) a = x * (W (.) a), per sample.

Squeeze-excitation re-weights channels with per-sample weights a; because convolution is linear in its kernel,
scaling a convolution's output channels by a is the convolution with the kernel's output filters scaled by a, and
scaling its input channels by a (MobileNetV3: SE before the projection) is the kernel's input slices scaled by a.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.layers import SqueezeExcite
from dyncnn.layers.dynamic_conv import AttentionScaledConv2d


def test_scaling_output_equals_scaling_kernel_per_sample():
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
    se = SqueezeExcite(8)
    x = torch.randn(4, 6, 7, 7)
    with torch.no_grad():
        y = conv(x)
        a = se._scale(y)[:, :, 0, 0]                      # (N, 8): SE's per-sample channel weights
        torch.testing.assert_close(se(y), y * a[:, :, None, None])
        for i in range(len(x)):
            scaled_kernel = conv.weight * a[i].view(8, 1, 1, 1)   # W (.) a_i over output channels
            torch.testing.assert_close(se(y)[i:i + 1], F.conv2d(x[i:i + 1], scaled_kernel, padding=1),
                                       rtol=1e-4, atol=1e-5)
        assert (a - a[:1]).abs().max() > 1e-4            # the weights are per sample


def test_se_before_a_projection_equals_scaling_its_input_slices():
    se, proj = SqueezeExcite(8), nn.Conv2d(8, 5, 1, bias=True)
    h = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        a = se._scale(h)[:, :, 0, 0]
        want = proj(se(h))
        for i in range(len(h)):
            scaled_kernel = proj.weight * a[i].view(1, 8, 1, 1)   # W (.) a_i over input channels
            torch.testing.assert_close(want[i:i + 1], F.conv2d(h[i:i + 1], scaled_kernel, proj.bias),
                                       rtol=1e-4, atol=1e-5)


def test_attention_scaled_conv_batched_equals_scaled_output():
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    layer = AttentionScaledConv2d(conv, min_hidden=4)
    with torch.no_grad():
        layer.attention[2].weight.normal_(0, 1.0)
    x = torch.randn(4, 6, 9, 9)
    with torch.no_grad():
        a = layer.channel_weights(x)
        torch.testing.assert_close(layer(x), conv(x) * a[:, :, None, None], rtol=1e-4, atol=1e-5)
        single = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
        torch.testing.assert_close(layer(x), single, rtol=1e-5, atol=1e-6)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x)
    assert counter.get_total_flops() // 2 == 4 * layer.macs((9, 9)) == 4 * (6 * 4 + 4 * 8 + 8 * 6 * 9 * 5 * 5)
