"""ShuffleNet V1 / V2: published cost, paper layout, shuffle and concatenation behaviour, stage metadata."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dyncnn import count_macs, create_model, list_models
from dyncnn.layers import ChannelShuffle
from dyncnn.models import published_figures
from dyncnn.models.shufflenet import (ShuffleUnitCfg, ShuffleV1Unit, ShuffleV2Unit, shufflenet_v1,
                                      shufflenet_v2)

# Conv+linear MACs and parameters at 224. The exact counts equal those of the official code
# (megvii-model/ShuffleNet-Series) for the same configurations, plus our classifier bias (1,000 parameters).
PUBLISHED_EXACT = {
    "shufflenet_v1_g3_x1_0": (137_460_672, 1_865_728),
    "shufflenet_v1_g8_x1_0": (138_365_952, 2_434_768),
    "shufflenet_v2_x0_5": (40_476_448, 1_366_792),
    "shufflenet_v2_x1_0": (145_814_296, 2_279_760),
    "shufflenet_v2_x1_5": (298_970_656, 3_507_720),
    "shufflenet_v2_x2_0": (590_783_000, 7_403_600),
}
# The paper's 41M for V2 0.5x is not what conv+linear MACs of its own (official) layout give: 40.48M, -1.3%.
MACS_TOLERANCE = {"shufflenet_v2_x0_5": 0.015}


def _rounds_to(measured: float, published: float) -> bool:
    """True if ``measured`` agrees with ``published`` to the published precision (2 significant digits)."""
    unit = 10 ** (math.floor(math.log10(published)) - 1)
    return abs(measured - published) <= unit / 2


@pytest.mark.parametrize("name", sorted(PUBLISHED_EXACT))
def test_published_macs_and_params(name):
    report = count_macs(create_model(name), torch.randn(1, 3, 224, 224))
    pub = published_figures(name)
    assert pub["input_size"] == 224
    assert report.per_sample == pytest.approx(pub["macs"], rel=MACS_TOLERANCE.get(name, 0.01))
    # Published parameter counts carry two significant digits (1.9M): compare at that precision.
    assert _rounds_to(report.params, pub["params"]), (report.params, pub["params"])
    assert (report.per_sample, report.params) == PUBLISHED_EXACT[name]


def test_generic_builders_default_to_published_models():
    assert published_figures("shufflenet_v1") == published_figures("shufflenet_v1_g3_x1_0")
    assert published_figures("shufflenet_v2") == published_figures("shufflenet_v2_x1_0")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(shufflenet_v1(groups=8, width_mult=0.5)) == n(create_model("shufflenet_v1_g8_x0_5"))
    assert n(shufflenet_v2(width_mult=1.5)) == n(create_model("shufflenet_v2_x1_5"))


def test_registered_names():
    names = set(list_models("shufflenet*"))
    widths = ("x0_5", "x1_0", "x1_5", "x2_0")
    expected = {f"shufflenet_v1_g{g}_{w}" for g in (1, 2, 3, 4, 8) for w in widths}
    expected |= {f"shufflenet_v2_{w}" for w in widths} | {"shufflenet_v1", "shufflenet_v2"}
    assert names == expected


@pytest.mark.parametrize("name", list_models("shufflenet*"))
def test_every_registered_name_builds(name):
    model = create_model(name, num_classes=5)
    widths = [u.out for u in model.arch.stages]
    assert [i.channels for i in model.stage_info][:3] == widths
    assert model.fc.in_features == model.num_features == model.stage_info[-1].channels
    assert model.fc.out_features == 5


# Every 0.5x model, plus the widest of each family (its dropout and largest groups), forward and backward.
TRAIN_SUBSET = [*list_models("shufflenet*x0_5"), "shufflenet_v1_g8_x2_0", "shufflenet_v2_x2_0"]


@pytest.mark.parametrize("name", TRAIN_SUBSET)
def test_models_train_on_small_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    out = model(torch.randn(2, 3, 32, 40))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert model.stem[0].weight.grad.abs().sum() > 0


def test_v1_table1_widths_and_dense_first_pointwise():
    model = create_model("shufflenet_v1_g3_x1_0")
    assert [i.channels for i in model.stage_info] == [240, 480, 960]
    first = model.stages[0][0]
    assert first.conv_pw[0].groups == 1 and isinstance(first.shuffle, nn.Identity)
    assert first.conv_pw[0].out_channels == 240 // 4          # bottleneck: 1/4 of the unit's full output
    assert first.conv_pwl[0].groups == 3 and first.conv_pwl[0].out_channels == 240 - 24
    later = model.stages[1][0]
    assert later.conv_pw[0].groups == 3 and later.shuffle.groups == 3
    assert later.conv_pw[0].out_channels == 480 // 4 and later.conv_pwl[0].out_channels == 480 - 240
    g8 = create_model("shufflenet_v1_g8_x0_5")
    assert g8.stem[0].out_channels == 16 and [i.channels for i in g8.stage_info] == [192, 384, 768]


def test_v1_stride2_unit_concatenates_pooled_shortcut():
    torch.manual_seed(0)
    unit = ShuffleV1Unit(ShuffleUnitCfg(24, 240, 60, stride=2, groups=3, first_groups=3)).eval()
    x = torch.rand(2, 24, 8, 8)                                     # non-negative, like a ReLU output
    out = unit(x)
    assert out.shape == (2, 240, 4, 4)
    pooled = nn.functional.avg_pool2d(x, 3, stride=2, padding=1)
    torch.testing.assert_close(out[:, :24], pooled)                 # shortcut first, unchanged
    assert not torch.allclose(out[:, 24:], torch.zeros_like(out[:, 24:]))


def test_v2_stride2_unit_keeps_input_width_on_shortcut():
    unit = create_model("shufflenet_v2_x1_0").stages[0][0]
    assert unit.branch_proj[1][0].out_channels == 24                 # paper layout: keeps the input width
    assert unit.branch_main[2][0].out_channels == 116 - 24           # torchvision would have 58 + 58
    out = unit(torch.randn(1, 24, 16, 16))
    assert out.shape == (1, 116, 8, 8)


def test_v1_shuffle_lets_every_group_see_every_group():
    """Perturbing the input channels of group 0 reaches all output groups only because of the shuffle."""
    torch.manual_seed(0)
    g, c = 4, 64
    unit = ShuffleV1Unit(ShuffleUnitCfg(c, c, c // 4, stride=1, groups=g, first_groups=g)).eval()
    x = torch.rand(1, c, 6, 6)
    dx = torch.zeros_like(x)
    dx[:, : c // g] = 1.0

    def groups_changed(u):
        with torch.no_grad():
            diff = (u(x + dx) - u(x)).abs().reshape(g, -1).amax(1)
        return (diff > 1e-6).tolist()

    assert isinstance(unit.shuffle, ChannelShuffle) and unit.shuffle.groups == g
    assert groups_changed(unit) == [True] * g
    unit.shuffle = nn.Identity()
    assert groups_changed(unit) == [True] + [False] * (g - 1)


def test_v2_unit_interleaves_identity_half_and_branch():
    """Stride 1: output channels 0, 2, 4, ... are the untouched first half; 1, 3, 5, ... the branch."""
    torch.manual_seed(0)
    unit = ShuffleV2Unit(ShuffleUnitCfg(32, 32, 16, stride=1)).eval()
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        out = unit(x)
        branch = unit.branch_main(x[:, 16:])
    torch.testing.assert_close(out[:, 0::2], x[:, :16])
    torch.testing.assert_close(out[:, 1::2], branch)


@pytest.mark.parametrize("name", ["shufflenet_v1_g3_x0_5", "shufflenet_v1_g8_x0_5", "shufflenet_v2_x0_5"])
def test_stage_info_matches_feature_maps(name):
    model = create_model(name, num_classes=3).eval()
    seen = {}
    for info in model.stage_info:
        model.get_submodule(info.module).register_forward_hook(
            lambda m, i, o, key=info.module: seen.__setitem__(key, o.shape))
    size = 64
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, size, size))
    assert [i.stride for i in model.stage_info][:3] == [8, 16, 32]
    for info in model.stage_info:
        assert seen[info.module] == (1, info.channels, size // info.stride, size // info.stride), info
    assert feats.shape[1] == model.num_features == model.stage_info[-1].channels
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)


@pytest.mark.parametrize("build, match", [
    (lambda: shufflenet_v1(groups=5), r"groups must be one of \[1, 2, 3, 4, 8\]"),
    (lambda: shufflenet_v1(width_mult=0.75), r"width_mult must be one of \[0.5, 1.0, 1.5, 2.0\]"),
    (lambda: shufflenet_v2(width_mult=0.25), r"width_mult must be one of \[0.5, 1.0, 1.5, 2.0\]"),
    (lambda: create_model("shufflenet_v1_g3_x1_0", groups=8), r"fixes groups=3"),
    (lambda: create_model("shufflenet_v2_x0_5", width_mult=1.0), r"fixes width_mult=0.5"),
])
def test_unsupported_configurations_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_input_checks():
    model = create_model("shufflenet_v2_x0_5", num_classes=4).eval()
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 1, 32, 32))
    gray = create_model("shufflenet_v1_g2_x0_5", num_classes=4, in_chans=1).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 4)
