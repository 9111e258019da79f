"""CondConv and dynamic convolution: one aggregated convolution per sample equals the mixture of the n expert
convolutions, the batch equals its samples, and FlopCounterMode's count equals the layers' MAC ledger."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.layers.dynamic_conv import CondConv2d, DynamicConv2d, dyconv_tau

LAYERS = [CondConv2d, DynamicConv2d]
# (in, out, kernel, stride, groups, bias): regular, strided, grouped, depthwise, pointwise (the bmm path)
GEOMETRIES = [(6, 8, 3, 1, 1, False), (6, 8, 3, 2, 1, True), (6, 9, 3, 1, 3, True), (8, 8, 3, 2, 8, False),
              (8, 12, 1, 1, 1, True), (8, 12, 1, 2, 1, False), (8, 8, 5, 1, 8, True)]


def make(cls, geometry, num_experts=3):
    cin, cout, k, s, g, bias = geometry
    layer = cls(cin, cout, k, stride=s, groups=g, bias=bias, num_experts=num_experts)
    if cls is DynamicConv2d:
        layer.set_tau(1.0)   # a sharp attention, so that the experts' weights differ per sample
    return layer


def mixture_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """sum_n a_n (W_n * x), each expert a plain convolution (n of them)."""
    a = layer.routing_weights(x)
    out = 0
    for e in range(layer.num_experts):
        b = None if layer.bias is None else layer.bias[e]
        y = F.conv2d(x, layer.weight[e], b, layer.stride, layer.padding, layer.dilation, layer.groups)
        out = out + a[:, e, None, None, None] * y
    return out


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_equals_mixture_of_expert_outputs(cls, geometry):
    layer = make(cls, geometry).eval()
    x = torch.randn(5, geometry[0], 9, 9)
    with torch.no_grad():
        got, want = layer(x), mixture_reference(layer, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the routing really differs between samples (otherwise the test would not test per-sample kernels)
    a = layer.routing_weights(x)
    assert (a - a[:1]).abs().max() > 1e-4


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_batched_equals_per_sample(cls, geometry):
    layer = make(cls, geometry).eval()
    x = torch.randn(4, geometry[0], 8, 8)
    with torch.no_grad():
        batched = layer(x)
        single = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_flop_counter_equals_ledger(cls, geometry):
    n, e = 3, 4
    layer = make(cls, geometry, num_experts=e).eval()
    x = torch.randn(n, geometry[0], 10, 10)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x)
    total = counter.get_total_flops() // 2
    assert total == n * layer.macs((10, 10))
    # the parts: one convolution per sample (not n), routing Linears, aggregation as counted matmuls
    cin, cout, k, s, g, bias = geometry
    oh = (10 + 2 * (k // 2) - k) // s + 1
    conv = n * cout * (cin // g) * k * k * oh * oh
    hidden = layer.router[0].out_features if cls is DynamicConv2d else None
    routing = n * (cin * e if hidden is None else cin * hidden + hidden * e)
    aggregation = n * e * (cout * (cin // g) * k * k + (cout if bias else 0))
    assert total == conv + routing + aggregation
    by_op = {str(op): v // 2 for op, v in counter.get_flop_counts()["Global"].items()}
    conv_ops = sum(v for op, v in by_op.items() if "convolution" in op or "bmm" in op)
    assert conv_ops == conv


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[4]])
def test_chunked_batches_equal_the_whole_batch_and_count_the_same(cls, geometry):
    layer = make(cls, geometry).eval()
    x = torch.randn(5, geometry[0], 8, 8)
    with torch.no_grad():
        whole = layer(x)
        per_sample = layer.weight[0].numel() * layer.weight.element_size()
        layer.chunk_from_bytes, layer.chunk_bytes = 0, 2 * per_sample        # chunks of 2, 2 and 1 samples
        sizes, run = [], layer._conv_per_sample
        layer._conv_per_sample = lambda xs, a: sizes.append(len(xs)) or run(xs, a)
        with FlopCounterMode(display=False) as counter:
            chunked = layer(x)
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert counter.get_total_flops() // 2 == len(x) * layer.macs((8, 8))


@pytest.mark.parametrize("cls", LAYERS)
def test_from_conv_copy_equals_static_conv_and_trains(cls):
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    layer = cls.from_conv(conv, num_experts=4)
    x = torch.randn(3, 6, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)
    layer.train()
    layer(x).square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    routing_grads = [p.grad for p in layer.router.parameters()]
    assert all(g is not None for g in routing_grads) and sum(g.abs().sum() for g in routing_grads) > 0


def test_condconv_routing_is_sigmoid_of_pooled_linear():
    layer = CondConv2d(4, 4, 3, num_experts=5)
    x = torch.randn(2, 4, 6, 6)
    want = torch.sigmoid(x.mean((2, 3)) @ layer.router.weight.T + layer.router.bias)
    torch.testing.assert_close(layer.routing_weights(x), want)


def test_dynamic_conv_attention_and_temperature():
    layer = DynamicConv2d(4, 4, 3, num_experts=4, tau=30.0)
    with torch.no_grad():
        layer.router[-1].weight.normal_(0, 3.0)
    x = torch.randn(3, 4, 6, 6)
    layer.requires_grad_(False)
    hot = layer.routing_weights(x)
    torch.testing.assert_close(hot.sum(1), torch.ones(3))
    layer.set_tau(0.1)
    cold = layer.routing_weights(x)
    torch.testing.assert_close(cold.sum(1), torch.ones(3))
    # a high temperature keeps the attention near uniform, a low one makes it peaked
    assert (hot - 0.25).abs().max() < (cold - 0.25).abs().max()
    assert float(hot.max(1).values.min()) < float(cold.max(1).values.max())


def test_dyconv_tau_schedule():
    assert dyconv_tau(0.0) == 30.0
    assert dyconv_tau(0.05, anneal_fraction=0.1) == pytest.approx(15.5)   # linear
    assert dyconv_tau(0.1, anneal_fraction=0.1) == 1.0
    assert dyconv_tau(0.9, anneal_fraction=0.1) == 1.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_expert_count_below_one_raises(bad):
    for cls in LAYERS:
        with pytest.raises(ValueError, match="num_experts"):
            cls(4, 4, 3, num_experts=bad)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_temperature_not_positive_raises(bad):
    with pytest.raises(ValueError, match="tau"):
        DynamicConv2d(4, 4, 3, tau=bad)
    layer = DynamicConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="tau"):
        layer.set_tau(bad)
    with pytest.raises(ValueError, match="tau"):
        dyconv_tau(0.5, start=bad)


def test_bad_groups_and_input_raise():
    with pytest.raises(ValueError, match="divisible by groups"):
        CondConv2d(6, 8, 3, groups=4)
    layer = CondConv2d(6, 8, 3)
    with pytest.raises(ValueError, match=r"expected input \(N, 6, H, W\)"):
        layer(torch.randn(2, 5, 8, 8))


def test_onnx_export_with_dynamic_batch_matches_eager(tmp_path):
    """Exported, the per-sample convolution is im2col + batched MatMul (an ONNX Conv needs a static group count,
    which N * groups is not): ONNX Runtime on a batch of 3 must match eager."""
    import numpy as np

    from dyncnn.export.onnx import export_onnx, onnx_session
    from dyncnn.layers.weight_prediction import PredictedDepthwiseConv2d

    net = nn.Sequential(make(CondConv2d, (3, 6, 3, 2, 3, True)), make(DynamicConv2d, (6, 6, 3, 1, 6, False)),
                        make(CondConv2d, (6, 8, 1, 1, 1, True)), PredictedDepthwiseConv2d(8, 3, stride=2, hidden=4))
    with torch.no_grad():
        net[3].hyper[-1].weight.normal_(0, 0.3)
    net.eval()
    x = torch.randn(3, 3, 12, 12)
    path = export_onnx(net, x[:1], tmp_path / "dyn.onnx")
    sess = onnx_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
