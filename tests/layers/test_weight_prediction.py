"""Weight prediction: per-sample depthwise kernels from a hyper-network, run as one grouped convolution."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.layers.weight_prediction import PredictedDepthwiseConv2d


def randomize(layer: PredictedDepthwiseConv2d) -> PredictedDepthwiseConv2d:
    with torch.no_grad():   # a non-zero prediction (the residual layer starts at exactly zero)
        layer.hyper[-1].weight.normal_(0, 0.3)
        layer.hyper[-1].bias.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("stride, bias", [(1, False), (2, True)])
def test_equals_per_sample_conv_loop(residual, stride, bias):
    layer = randomize(PredictedDepthwiseConv2d(6, 3, stride=stride, bias=bias, hidden=5, residual=residual)).eval()
    x = torch.randn(4, 6, 9, 9)
    with torch.no_grad():
        got = layer(x)
        want = []
        for i in range(len(x)):     # the reference: the hyper-network by hand, then F.conv2d per sample
            h = layer.hyper[2](torch.relu(layer.hyper[0](x[i].mean((1, 2)))))
            w = h.view(6, 1, 3, 3) + (layer.weight if residual else 0)
            want.append(F.conv2d(x[i:i + 1], w, layer.bias, stride, 1, 1, 6))
        want = torch.cat(want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    kernels = layer.predict_kernels(x)
    assert (kernels - kernels[:1]).abs().max() > 1e-3     # the kernels really differ per sample


def test_fresh_from_conv_equals_depthwise_conv_and_trains():
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=True)
    layer = PredictedDepthwiseConv2d.from_conv(conv)
    x = torch.randn(3, 8, 10, 10)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)
    layer(x).square().mean().backward()
    assert layer.hyper[-1].weight.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


def test_flop_counter_equals_ledger():
    layer = randomize(PredictedDepthwiseConv2d(16, 5, stride=2, hidden=8))
    x = torch.randn(3, 16, 12, 12)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x)
    hyper = 16 * 8 + 8 * 16 * 25
    conv = 16 * 25 * 6 * 6
    assert counter.get_total_flops() // 2 == 3 * (hyper + conv) == 3 * layer.macs((12, 12))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="depthwise"):
        PredictedDepthwiseConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1))
    with pytest.raises(ValueError, match="channels"):
        PredictedDepthwiseConv2d(0)
    layer = PredictedDepthwiseConv2d(4)
    with pytest.raises(ValueError, match=r"expected input \(N, 4, H, W\)"):
        layer(torch.randn(2, 3, 8, 8))
