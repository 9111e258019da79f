"""MobileNet V1/V2/V3: exact equality with torchvision (V2, V3) and timm (V1), API, stage_info, bad input."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dyncnn
from dyncnn import count_macs, create_model, list_models
from dyncnn.models import published_figures
from dyncnn.models.mobilenet import (MOBILENET_V2, BlockCfg, InvertedResidual, InvertedResidualCfg, MobileNet,
                                     MobileNetArch, build_stages)

TV_NAMES = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
ALL_NAMES = ["mobilenet_v1", *TV_NAMES]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def copy_by_position(src: nn.Module, dst: nn.Module) -> None:
    """Load ``src``'s state into ``dst`` pairing entries in order; every pair must have the same shape."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert len(src_sd) == len(dst_sd)
    new = {}
    for (k, v), (dk, dv) in zip(src_sd.items(), dst_sd.items()):
        assert v.shape == dv.shape, (k, dk, v.shape, dv.shape)
        new[dk] = v
    dst.load_state_dict(new)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm non-trivial statistics so that an eval-mode comparison exercises them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_registered_with_published_figures():
    assert set(ALL_NAMES) <= set(list_models("mobilenet*"))
    for name in ALL_NAMES:
        pub = published_figures(name)
        assert pub["input_size"] == 224 and pub["macs"] > 0 and pub["params"] > 0


@pytest.mark.parametrize("name", TV_NAMES)
def test_params_and_macs_equal_torchvision(name):
    ours, ref = create_model(name), getattr(torchvision.models, name)()
    x = torch.randn(1, 3, 224, 224)
    mo, mr = count_macs(ours, x), count_macs(ref, x)
    assert mo.params == mr.params == n_params(ref)
    assert mo.total == mr.total
    pub = published_figures(name)
    assert abs(mo.total - pub["macs"]) / pub["macs"] < 0.01
    assert abs(mo.params - pub["params"]) / pub["params"] < 0.03


@pytest.mark.parametrize("name", TV_NAMES)
@pytest.mark.parametrize("width", [0.5, 0.75])
def test_width_mult_params_equal_torchvision(name, width):
    ours = create_model(name, width_mult=width, num_classes=10)
    ref = getattr(torchvision.models, name)(width_mult=width, num_classes=10)
    assert n_params(ours) == n_params(ref)


@pytest.mark.parametrize("name", TV_NAMES)
def test_same_init_and_settings_as_torchvision(name):
    """Same module order, init scheme and BN settings: with one seed the two models are bit-identical."""
    torch.manual_seed(0)
    ours = create_model(name, num_classes=10)
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(num_classes=10)
    for (k, a), (rk, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), (k, rk)
    bn_ours = [(m.eps, m.momentum) for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_ref = [(m.eps, m.momentum) for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_ours == bn_ref
    if name.startswith("mobilenet_v3"):
        assert set(bn_ours) == {(1e-3, 0.01)}
    drops = lambda m: [d.p for d in m.modules() if isinstance(d, nn.Dropout)]
    assert drops(ours) == drops(ref) == [0.2]


@pytest.mark.parametrize("name", TV_NAMES)
def test_state_dict_by_position_gives_torchvision_logits(name):
    ref = getattr(torchvision.models, name)(num_classes=10).eval()
    randomize_bn(ref)
    ours = create_model(name, num_classes=10).eval()
    copy_by_position(ref, ours)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def test_v1_matches_timm_mobilenetv1_100():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("mobilenetv1_100", pretrained=False).eval()
    ours = create_model("mobilenet_v1").eval()
    assert n_params(ours) == n_params(ref) == 4_231_976
    randomize_bn(ref)
    copy_by_position(ref, ours)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width,macs,params", [(1.0, 569e6, 4.2e6), (0.75, 325e6, 2.6e6),
                                               (0.5, 149e6, 1.3e6), (0.25, 41e6, 0.47e6)])
def test_v1_width_multipliers_match_paper(width, macs, params):
    report = count_macs(create_model("mobilenet_v1", width_mult=width), torch.randn(1, 3, 224, 224))
    assert abs(report.total - macs) / macs < 0.01       # paper's table 6 (MACs in millions)
    assert abs(report.params - params) / params < 0.03


def test_v1_unsupported_width_names_supported_values():
    with pytest.raises(ValueError, match=r"0\.25, 0\.5, 0\.75, 1\.0"):
        create_model("mobilenet_v1", width_mult=0.35)


@pytest.mark.parametrize("name", TV_NAMES)
@pytest.mark.parametrize("width", [0.0, -1.0, "wide"])
def test_bad_width_rejected(name, width):
    with pytest.raises(ValueError, match="width_mult"):
        create_model(name, width_mult=width)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_api_small_input_grayscale_and_backward(name):
    width = 0.25 if name == "mobilenet_v1" else 0.35
    model = create_model(name, num_classes=7, in_chans=1, width_mult=width)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 1, 1)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model.stage_info[-1].channels == model.num_features and model.stage_info[-1].stride == 32


@pytest.mark.parametrize("name", ALL_NAMES)
def test_stage_info_matches_executed_shapes(name):
    model = create_model(name, num_classes=5).eval()
    seen = {}
    for s in model.stage_info:
        model.get_submodule(s.module).register_forward_hook(
            lambda m, i, o, key=s.module: seen.__setitem__(key, tuple(o.shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    strides = [s.stride for s in model.stage_info]
    assert strides == sorted(strides) and strides[0] in (2, 4)
    for s in model.stage_info:
        assert seen[s.module] == (1, s.channels, 64 // s.stride, 64 // s.stride)


def test_input_size_agnostic_and_checked():
    model = create_model("mobilenet_v3_small", num_classes=3, width_mult=0.5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 3)
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(dyncnn.DyncnnError, match="3 input channels"):
        model(torch.randn(1, 1, 64, 64))


def test_num_classes_zero_gives_pooled_features():
    model = create_model("mobilenet_v2", num_classes=0, width_mult=0.5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)


def test_inverted_residual_block_config():
    cfg = InvertedResidualCfg(in_chs=16, mid_chs=64, out_chs=16, kernel=5, se=True, act="hard_swish")
    block = InvertedResidual(cfg)
    assert block.has_skip and isinstance(block.conv_dw[2], nn.Hardswish)
    assert block.conv_dw[0].kernel_size == (5, 5) and block.conv_dw[0].groups == 64
    assert isinstance(block.se.scale_activation, nn.Hardsigmoid)
    assert len(block.conv_pwl) == 2          # linear bottleneck: conv + norm, no activation
    # No expansion when mid == in; no residual across a stride or a width change.
    thin = InvertedResidual(InvertedResidualCfg(16, 16, 24, stride=2))
    assert isinstance(thin.conv_pw, nn.Identity) and not thin.has_skip
    x = torch.randn(2, 16, 8, 8)
    assert block(x).shape == x.shape and thin(x).shape == (2, 24, 4, 4)
    with pytest.raises(ValueError, match="stride"):
        InvertedResidual(InvertedResidualCfg(16, 16, 16, stride=3))


def test_builder_decodes_widths_and_rejects_unknown_block():
    stages, info, out = build_stages(MOBILENET_V2.stages, 16, 0.5, nn.BatchNorm2d, nn.Identity)
    assert out == 160 and [s.channels for s in info] == [8, 16, 16, 32, 48, 80, 160]
    assert len(stages[1]) == 2 and stages[1][0].conv_dw[0].stride == (2, 2)
    assert stages[1][1].cfg.mid_chs == 16 * 6            # V2: hidden = in * expand_ratio, unrounded
    with pytest.raises(ValueError, match="unknown block type"):
        build_stages(((BlockCfg("fused", 8),),), 8, 1.0, nn.BatchNorm2d, nn.Identity)
    custom = MobileNet(MobileNetArch(stages=((BlockCfg("ir", 24, stride=2, mid=48, se=True),),), stem_chs=16,
                                     act="relu"), num_classes=4)
    assert custom(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert [(s.channels, s.stride) for s in custom.stage_info] == [(24, 4)]
