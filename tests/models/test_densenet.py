"""DenseNet family: torchvision equality (DenseNet-121), published DenseNet-BC sizes, stage metadata, layer shapes."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dyncnn.models import create_model, list_models, published_figures
from dyncnn.models.densenet import DenseBlock, DenseLayer, Transition, imagenet_cfg
from dyncnn.profile.macs import count_macs


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


def test_densenet121_equals_torchvision():
    torch.manual_seed(0)
    ours = create_model("densenet121")
    torch.manual_seed(0)
    ref = torchvision.models.densenet121()
    # Same parameters, in the same order, initialised identically from the same seed.
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    # Same MACs as torchvision's model (live, at 64x64) and its exact count at 224 (counted once, here):
    # count_macs(torchvision.models.densenet121(), 1x3x224x224).total; torchvision publishes 2.834 "GFLOPS".
    small = torch.randn(1, 3, 64, 64)
    assert count_macs(ours, small).total == count_macs(ref, small).total
    macs = count_macs(ours, torch.randn(1, 3, 224, 224))
    assert macs.total == 2_834_161_664
    pub = published_figures("densenet121")
    assert macs.params == sum(p.numel() for p in ref.parameters()) == pub["params"]
    assert macs.total == pytest.approx(pub["macs"], rel=1e-3)
    # Same function: logits equal after copying the state dict by position.
    _randomize_norms(ref)
    with torch.no_grad():
        ref.classifier.bias.uniform_(-0.1, 0.1)
    _copy_by_position(ours, ref)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(small), ref.eval()(small), atol=1e-5, rtol=1e-5)


def test_densenet_bc_100_params_match_published():
    params = sum(p.numel() for p in create_model("densenet_bc_cifar").parameters())
    # The paper's "0.8M" has one significant digit: within its rounding (0.75M..0.85M); we count 769,162.
    assert abs(params - published_figures("densenet_bc_cifar")["params"]) <= 0.05e6
    # Huang et al. Table 2: DenseNet-BC (L=250, k=24) has 15.3M parameters.
    big = sum(p.numel() for p in create_model("densenet_bc_cifar", depth=250, growth_rate=24).parameters())
    assert big == pytest.approx(15.3e6, rel=0.01)


def test_dense_layer_block_and_transition_shapes():
    x = torch.randn(2, 24, 8, 8)
    layer = DenseLayer(24, growth_rate=12, bn_size=4)
    assert layer(x).shape == (2, 12, 8, 8) and layer.conv1.out_channels == 48
    block = DenseBlock(3, 24, growth_rate=12).eval()
    with torch.no_grad():
        y = block(x)
    assert y.shape == (2, 24 + 3 * 12, 8, 8)
    assert torch.equal(y[:, :24], x)  # concatenation keeps the input untouched (in-place ReLUs must not leak)
    trans = Transition(60, 30)
    assert trans(y).shape == (2, 30, 4, 4)
    dropped = DenseLayer(24, growth_rate=12, drop_rate=0.5)
    assert (dropped.train()(x) == 0).float().mean() > 0.3 and (dropped.eval()(x) == 0).float().mean() < 0.3


def test_compression_sets_transition_width():
    model = create_model("densenet_bc_cifar", depth=40, compression=0.25)
    assert model.stages[1].transition.out_chs == (24 + 6 * 12) // 4


def test_cifar_forward_backward_32x32():
    model = create_model("densenet_bc_cifar", num_classes=7, depth=40)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["densenet_bc_cifar", "densenet121"])
def test_runs_on_32x32_and_rejects_smaller(name):
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
    ("densenet_bc_cifar", 32, [216, 300, 342], [1, 2, 4]),
    ("densenet121", 64, [256, 512, 1024, 1024], [4, 8, 16, 32]),
])
def test_stage_info_matches_feature_maps(name, size, channels, strides):
    model = create_model(name)
    assert [s.channels for s in model.stage_info] == channels
    assert [s.stride for s in model.stage_info] == strides
    shapes = _feature_shapes(model, [s.module for s in model.stage_info], torch.randn(1, 3, size, size))
    for info in model.stage_info:
        assert shapes[info.module] == (1, info.channels, size // info.stride, size // info.stride), info
    assert model.num_features == channels[-1]
    assert model.forward_head(model.forward_features(torch.randn(1, 3, size, size)), pre_logits=True).shape == \
        (1, channels[-1])


def test_unsupported_configs_name_supported_values():
    with pytest.raises(ValueError, match=r"6n\+4.*100, 190, 250"):
        create_model("densenet_bc_cifar", depth=101)
    with pytest.raises(ValueError, match=r"\[121\]"):
        imagenet_cfg(169)
    with pytest.raises(ValueError, match="compression"):
        create_model("densenet_bc_cifar", depth=40, compression=0.0)
    assert {"densenet_bc_cifar", "densenet121"} <= set(list_models("densenet*"))
