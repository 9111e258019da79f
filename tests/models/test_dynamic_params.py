"""Dynamic-parameter zoo variants: registered, built by substitution, equal to the static backbone when their
layers are copied from it, MACs = backbone - replaced convolutions + the layers' own ledgers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dyncnn
from dyncnn.layers.deform import DeformConv2d
from dyncnn.layers.dynamic_conv import CondConv2d, DynamicConv2d
from dyncnn.layers.weight_prediction import PredictedDepthwiseConv2d
from dyncnn.models.dynamic_params import (DynamicParamsCfg, dynamic_macs_ledger, layer_input_sizes,
                                          make_dynamic)
from dyncnn.profile import count_macs

TINY = dict(num_classes=10, in_chans=1)
# variant -> (static backbone, backbone kwargs, layer class)
VARIANTS = {
    "condconv_mobilenet_v2_e4": ("mobilenet_v2", dict(width_mult=0.25), CondConv2d),
    "condconv_mobilenet_v2_e8": ("mobilenet_v2", dict(width_mult=0.25), CondConv2d),
    "condconv_shufflenet_v2_e4": ("shufflenet_v2", dict(width_mult=0.5), CondConv2d),
    "condconv_shufflenet_v2_e8": ("shufflenet_v2", {}, CondConv2d),
    "dyconv_mobilenet_v3_large": ("mobilenet_v3_large", dict(width_mult=0.25), DynamicConv2d),
    "dyconv_mobilenet_v3_small": ("mobilenet_v3_small", dict(width_mult=0.25), DynamicConv2d),
    "hyper_mobilenet_v2": ("mobilenet_v2", dict(width_mult=0.25), PredictedDepthwiseConv2d),
    "deform_resnet18": ("resnet18", dict(width_mult=0.25), DeformConv2d),
    "deform_resnet50": ("resnet50", dict(width_mult=0.125), DeformConv2d),
    "condconv_tiny_mobilenet_e4": ("tiny_mobilenet", {}, CondConv2d),
    "dyconv_tiny_mobilenet": ("tiny_mobilenet", {}, DynamicConv2d),
    "hyper_tiny_mobilenet": ("tiny_mobilenet", {}, PredictedDepthwiseConv2d),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_registered_variant_builds_runs_and_counts(name):
    backbone, kw, layer_cls = VARIANTS[name]
    torch.manual_seed(0)
    model = dyncnn.create_model(name, **TINY, **kw).eval()
    static = dyncnn.create_model(backbone, **TINY, **kw).eval()
    assert model.replaced and all(isinstance(m, layer_cls) for _, m in model.dynamic_layers())
    x = torch.rand(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
    # ledger: backbone MACs - the replaced static convolutions + each dynamic layer's routing/aggregation/conv
    static_report = count_macs(static, x[:1])
    paths = [p[len("backbone."):] for p in model.replaced]
    sizes = layer_input_sizes(static, x[:1], paths)
    ledger = dynamic_macs_ledger(model, static_report.total, {f"backbone.{p}": static_report.by_module[p]
                                                              for p in paths},
                                 {f"backbone.{p}": sizes[p] for p in paths})
    assert count_macs(model, x[:1]).total == ledger
    assert count_macs(model, x).total == 2 * ledger      # a static cost per sample, whatever the batch
    assert count_macs(model, x[:1]).params > static_report.params    # more parameters, the point of the method


@pytest.mark.parametrize("kind", ["condconv", "dyconv", "hyper", "deform"])
def test_copied_variant_equals_static_backbone(kind):
    name = "resnet18" if kind == "deform" else "mobilenet_v2"
    static = dyncnn.create_model(name, **TINY, width_mult=0.25).eval()
    cfg = DynamicParamsCfg(kind, copy_weights=True, num_experts=3,
                           stages=(1, 2, 3) if kind == "deform" else None)
    model = make_dynamic(copy.deepcopy(static), cfg).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), rtol=1e-4, atol=1e-5)


def test_condconv_replaces_only_the_later_blocks():
    model = dyncnn.create_model("condconv_mobilenet_v2_e4", **TINY, width_mult=0.25)
    blocks = {p.rsplit(".", 2)[0] for p in model.replaced}
    all_blocks = [f"backbone.stages.{i}.{j}" for i, s in enumerate(model.backbone.stages) for j in range(len(s))]
    assert sorted(blocks) == sorted(all_blocks[-6:])
    assert isinstance(model.backbone.stem[0], nn.Conv2d) and type(model.backbone.stages[0][0].conv_dw[0]) is nn.Conv2d


def test_dyconv_temperature_schedule_and_training_step():
    model = dyncnn.create_model("dyconv_tiny_mobilenet", **TINY, tau_anneal=0.5)
    layers = [m for _, m in model.dynamic_layers()]
    model.set_progress(0.0)
    assert all(m.tau == 30.0 for m in layers)
    model.set_progress(0.25)
    assert all(m.tau == pytest.approx(15.5) for m in layers)
    model.set_progress(0.7)
    assert all(m.tau == 1.0 for m in layers)
    model.train()
    x, y = torch.rand(4, 1, 32, 32), torch.arange(4)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(m.router[-1].weight.grad.abs().sum() > 0 for m in layers)   # gradients reach the routing


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="num_experts"):
        dyncnn.create_model("condconv_tiny_mobilenet_e4", num_experts=0)
    with pytest.raises(ValueError, match="tau"):
        dyncnn.create_model("dyconv_tiny_mobilenet", tau_start=0)
    with pytest.raises(ValueError, match="stages"):
        dyncnn.create_model("deform_resnet18", stages=(7,))
    with pytest.raises(ValueError, match="kind"):
        DynamicParamsCfg("mixture")
