"""ResNet family: torchvision equality (ImageNet), published CIFAR sizes, stage/block metadata, residual-block API."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dyncnn.models import create_model, list_models, published_figures
from dyncnn.models.resnet import BasicBlock, Bottleneck, ResidualBlock, ZeroPadShortcut, resnet_cifar
from dyncnn.profile.macs import count_macs

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
# count_macs(torchvision.models.<name>(), 1x3x224x224).total; torchvision publishes 1.814 / 4.089 "GFLOPS".
TORCHVISION_MACS_224 = {"resnet18": 1_814_073_344, "resnet50": 4_089_184_256}


def _randomize_norms(model: nn.Module) -> None:
    """Give every BN non-trivial statistics and affine parameters so that an eval-mode comparison means something."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2),
                              (m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


def _copy_by_position(dst: nn.Module, src: nn.Module) -> None:
    d, s = dst.state_dict(), src.state_dict()
    assert len(d) == len(s)
    for (kd, vd), (ks, vs) in zip(d.items(), s.items()):
        assert vd.shape == vs.shape, (kd, ks)
    dst.load_state_dict(dict(zip(d.keys(), s.values())))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnet_equals_torchvision(name):
    torch.manual_seed(0)
    ours = create_model(name, zero_init_residual=True)
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(zero_init_residual=True)
    # Same parameters, in the same order, initialised identically from the same seed (incl. zero_init_residual).
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    # Same MACs as torchvision's model (live, at 64x64) and its exact count at 224 (counted once, here).
    small = torch.randn(1, 3, 64, 64)
    assert count_macs(ours, small).total == count_macs(ref, small).total
    macs = count_macs(ours, torch.randn(1, 3, 224, 224))
    assert macs.total == TORCHVISION_MACS_224[name]
    pub = published_figures(name)
    assert macs.params == sum(p.numel() for p in ref.parameters()) == pub["params"]
    assert macs.total == pytest.approx(pub["macs"], rel=1e-3)
    # Same function: logits equal after copying the state dict by position.
    _randomize_norms(ref)
    _copy_by_position(ours, ref)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(small), ref.eval()(small), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_cifar_params_match_published_with_option_a(depth):
    name = f"resnet{depth}_cifar"
    pub = published_figures(name)["params"]
    params = sum(p.numel() for p in create_model(name, shortcut="A").parameters())
    # Within 1%, or within the rounding of the published figure (1.7M for ResNet-110 means 1.65M..1.75M).
    digits = f"{pub / 1e6:g}".split(".")[-1]
    half_unit = 0.5 * 10 ** -len(digits) * 1e6
    assert abs(params - pub) <= max(0.01 * pub, half_unit), (params, pub)
    # Option B (default) adds exactly the two projection shortcuts: 1x1 convs 16->32 and 32->64, each with BN.
    params_b = sum(p.numel() for p in create_model(name).parameters())
    assert params_b - params == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_resnet20_macs_match_published():
    report = count_macs(create_model("resnet20_cifar", shortcut="A"), torch.randn(1, 3, 32, 32))
    assert report.per_sample == pytest.approx(published_figures("resnet20_cifar")["macs"], rel=0.02)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_forward_backward_32x32(shortcut):
    model = create_model("resnet20_cifar", num_classes=7, shortcut=shortcut)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnet_runs_on_32x32_and_rejects_smaller(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 16, 16))


def _feature_shapes(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: shapes.__setitem__(p, tuple(o.shape))) for p in paths]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("name,size,channels,strides", [
    ("resnet20_cifar", 32, [16, 32, 64], [1, 2, 4]),
    ("resnet18", 64, [64, 128, 256, 512], [4, 8, 16, 32]),
    ("resnet50", 64, [256, 512, 1024, 2048], [4, 8, 16, 32]),
])
def test_stage_and_block_info_match_feature_maps(name, size, channels, strides):
    model = create_model(name)
    assert [s.channels for s in model.stage_info] == channels
    assert [s.stride for s in model.stage_info] == strides
    infos = model.stage_info + model.block_info
    shapes = _feature_shapes(model, [i.module for i in infos], torch.randn(1, 3, size, size))
    for info in infos:
        assert shapes[info.module] == (1, info.channels, size // info.stride, size // info.stride), info
    assert model.num_features == channels[-1]


def test_block_info_lists_every_residual_block_in_order():
    model = create_model("resnet110_cifar")
    blocks = model.blocks()
    assert len(blocks) == len(model.block_info) == 54
    assert all(model.get_submodule(i.module) is b for i, b in zip(model.block_info, blocks))
    assert all(isinstance(b, BasicBlock) for b in blocks)
    assert [b.stride for b in blocks].count(2) == 2
    assert isinstance(create_model("resnet50").blocks()[0], Bottleneck)


def test_block_is_act_of_branch_plus_shortcut():
    """The contract gates rely on: a block is exactly act(branch(x) + shortcut(x)); skipping = act(shortcut(x))."""
    torch.manual_seed(0)
    for shortcut in ("A", "B"):
        model = create_model("resnet20_cifar", width_mult=0.5, shortcut=shortcut).eval()
        x = torch.randn(2, 8, 32, 32)
        block = model.stages[1][0]
        assert isinstance(block, ResidualBlock) and block.stride == 2
        with torch.no_grad():
            assert torch.allclose(block(x), block.act(block.branch(x) + block.shortcut(x)))


def test_zero_init_residual_makes_blocks_identity():
    model = create_model("resnet20_cifar", shortcut="A", zero_init_residual=True).eval()
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        for block in model.stages[0]:  # identity shortcuts: a zeroed branch leaves block(x) = relu(x)
            assert torch.equal(block(x), torch.relu(x))
        assert all(b.last_norm.weight.abs().sum() == 0 for b in model.blocks())
        default = create_model("resnet20_cifar")
        assert all(b.last_norm.weight.min() == 1 for b in default.blocks())


def test_zero_pad_shortcut_subsamples_and_pads_channels():
    sc = ZeroPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 9, 9)
    y = sc(x)
    assert y.shape == (2, 32, 5, 5) and not list(sc.parameters())
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    model_a = create_model("resnet20_cifar", shortcut="A")
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model_a.modules())


def test_width_mult_scales_all_stages():
    model = create_model("resnet20_cifar", width_mult=0.5)
    assert [s.channels for s in model.stage_info] == [8, 16, 32]
    assert model.stem[0][0].out_channels == 8


def test_unsupported_configs_name_supported_values():
    with pytest.raises(ValueError, match=r"6n\+2.*20, 32, 44, 56, 110"):
        resnet_cifar(21)
    from dyncnn.models.resnet import resnet_imagenet
    with pytest.raises(ValueError, match=r"\[18, 34, 50, 101, 152\]"):
        resnet_imagenet(19)
    with pytest.raises(ValueError, match="'A', 'B'"):
        create_model("resnet20_cifar", shortcut="C")


def test_registered_names_and_generic_depth():
    names = set(list_models("resnet*"))
    assert {f"resnet{d}_cifar" for d in CIFAR_DEPTHS} | {"resnet18", "resnet50"} <= names
    assert len(resnet_cifar(8).blocks()) == 3
