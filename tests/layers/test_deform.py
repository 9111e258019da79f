"""Deformable convolution v1 / v2: a fresh layer is the plain convolution, offsets move the sampling grid,
MACs are counted, bad settings are refused, and ONNX export works at opset 19 (refused clearly before)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.export.onnx import ExportError, export_onnx, onnx_session
from dyncnn.layers.deform import DeformConv2d

# (in, out, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = [(4, 6, 3, 1, 1, 1, 1, False), (4, 6, 3, 2, 1, 1, 2, True), (4, 4, 3, 1, 2, 2, 1, True),
              (6, 6, 5, 1, 2, 1, 3, False), (4, 8, 1, 1, 0, 1, 1, True)]


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fresh_layer_equals_conv(geometry, modulated):
    cin, cout, k, s, p, d, g, bias = geometry
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias)
    layer = DeformConv2d.from_conv(conv, modulated=modulated, offset_groups=2 if cin % 2 == 0 else 1)
    x = torch.randn(2, cin, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
    # built directly, with the same weights, it is the same function
    direct = DeformConv2d(cin, cout, k, s, p, d, g, bias=bias, modulated=modulated)
    with torch.no_grad():
        direct.weight.copy_(conv.weight)
        if bias:
            direct.bias.copy_(conv.bias)
    torch.testing.assert_close(direct(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offset_scale", [1.0, 0.1])
def test_integer_offset_shifts_the_sampling_grid(offset_scale):
    """Offset (dy, dx) = (0, 1) on every tap samples x one column to the right: conv of the shifted input."""
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    layer = DeformConv2d.from_conv(conv, offset_scale=offset_scale)
    with torch.no_grad():
        layer.conv_offset.bias.view(-1, 2)[:, 1] = 1.0 / offset_scale   # (dy, dx) pairs per tap
    x = torch.randn(2, 3, 8, 8)
    # out(r, c) = sum_ij W_ij x(r + i - 1, c + j): an unpadded conv of x padded by 1 row each side, 2 columns right
    want = F.conv2d(F.pad(x, (0, 2, 1, 1)), conv.weight)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    assert (layer(x) - conv(x)).abs().max() > 0.1    # and that is not the unshifted convolution


def test_modulation_scales_every_tap():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = DeformConv2d.from_conv(conv, modulated=True)
    taps = 9
    with torch.no_grad():
        layer.conv_offset.bias[2 * taps:] = torch.logit(torch.tensor(0.3))   # mask = 2 * 0.3 = 0.6
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(layer(x), 0.6 * conv(x), rtol=1e-4, atol=1e-5)
    official = DeformConv2d.from_conv(conv, modulated=True, mask_scale=1.0)   # the official sigmoid: 0.5 fresh
    torch.testing.assert_close(official(x), 0.5 * conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("modulated", [False, True])
def test_macs_counted_and_gradients_reach_offsets(modulated):
    layer = DeformConv2d(4, 6, 3, stride=2, offset_groups=2, modulated=modulated)
    x = torch.randn(3, 4, 10, 10)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x)
    taps = 2 * 9   # offset groups x kernel taps
    offset_macs = (3 if modulated else 2) * taps * 4 * 9 * 5 * 5
    deform_macs = 6 * 4 * 9 * 5 * 5
    assert counter.get_total_flops() // 2 == 3 * (offset_macs + deform_macs) == 3 * layer.macs((10, 10))
    layer(x).square().mean().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=6, out_channels=4, offset_groups=4), "divisible by offset_groups"),
    (dict(in_channels=6, out_channels=4, groups=4), "divisible by groups"),
    (dict(in_channels=4, out_channels=4, kernel_size=0), "kernel_size"),
    (dict(in_channels=4, out_channels=4, stride=0), "stride"),
    (dict(in_channels=4, out_channels=4, dilation=0), "dilation"),
    (dict(in_channels=4, out_channels=4, padding=-1), "padding"),
    (dict(in_channels=4, out_channels=4, padding="same"), "padding"),
    (dict(in_channels=4, out_channels=4, groups=0), "groups"),
    (dict(in_channels=4, out_channels=4, mask_scale=0.0), "mask_scale"),
    (dict(in_channels=4, out_channels=4, offset_scale=-1.0), "offset_scale"),
])
def test_unsupported_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeformConv2d(**kwargs)


def test_bad_input_raises():
    layer = DeformConv2d(4, 4, 3, padding=0)
    with pytest.raises(ValueError, match=r"expected input \(N, 4, H, W\)"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(1, 4, 2, 2))


class _DeformNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.deform = DeformConv2d(3, 6, 3, stride=2, groups=1, offset_groups=3, bias=True, modulated=True)
        self.head = nn.Conv2d(6, 2, 1)
        nn.init.normal_(self.deform.conv_offset.weight, 0, 0.3)   # real, fractional offsets

    def forward(self, x):
        return self.head(torch.relu(self.deform(x))).mean((2, 3))


def test_onnx_export_refused_before_opset_19(tmp_path):
    model = _DeformNet().eval()
    with pytest.raises(ExportError, match=r"needs opset >= 19, got opset 17.*opset=19"):
        export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m.onnx", opset=17)
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_export_opset_19_matches_eager(tmp_path):
    model = _DeformNet().eval()
    x = torch.randn(3, 3, 12, 12)
    path = export_onnx(model, x[:1], tmp_path / "m.onnx", opset=19)
    sess = onnx_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]   # batch 3 through the dynamic axis
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_default_export_picks_the_opset_deformable_convolution_needs(tmp_path):
    import onnx
    from dyncnn.layers.deform import DeformConv2d
    model = torch.nn.Sequential(DeformConv2d(3, 4, 3, modulated=True)).eval()
    path = export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m.onnx")
    assert max(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")) == 19
