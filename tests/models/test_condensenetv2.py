"""CondenseNetV2: sparse feature reactivation (schedule, conversion, cost) and the registered models."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyncnn.errors import CheckpointError
from dyncnn.layers.learned_group import ConversionError, LearnedGroupConv
from dyncnn.layers.reactivation import CondensedReactivation, SparseFeatureReactivation
from dyncnn.models import create_model, list_models, published_figures
from dyncnn.models.condensenet import DenseStageCfg
from dyncnn.models.condensenetv2 import CondenseNetV2, CondenseNetV2Cfg
from dyncnn.profile.macs import count_macs


def randomize_norm(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)


# ---- the reactivation layer -------------------------------------------------------------------------------------

def _ranked_sfr(in_chs=8, out_chs=16, groups=4, c=4, seed=0):
    """Input group g's importance of earlier feature o is a known random permutation."""
    gen = torch.Generator().manual_seed(seed)
    sfr = SparseFeatureReactivation(in_chs, out_chs, groups, c)
    ranks = torch.stack([torch.randperm(out_chs, generator=gen) for _ in range(groups)]).float() + 1  # (G, out)
    with torch.no_grad():
        for i in range(in_chs):
            sfr.conv.weight[:, i, 0, 0] = ranks[i % groups] * (-1) ** i
    return sfr, ranks


def test_reactivation_drops_one_cth_of_the_earlier_features_per_group_per_stage():
    sfr, ranks = _ranked_sfr()
    for stage, progress in enumerate((1 / 6, 2 / 6, 0.5), start=1):
        sfr.set_progress(progress)
        kept = 16 - stage * 4
        assert sfr.keep.sum(1).tolist() == [kept] * 4
        for g in range(4):
            assert set(sfr.keep[g].nonzero()[:, 0].tolist()) == set(ranks[g].argsort(descending=True)[:kept].tolist())
    assert sfr.condensing_done and sfr.kept_per_group == 4


def test_reactivation_converts_exactly_and_costs_only_kept_connections():
    gen = torch.Generator().manual_seed(5)
    sfr = SparseFeatureReactivation(16, 40, groups=8, condense_factor=8, act_layer=nn.Hardswish)
    nn.init.normal_(sfr.conv.weight, generator=gen)
    randomize_norm(sfr, gen)
    sfr.eval()
    with pytest.raises(ConversionError, match="stage 0 of 7"):
        sfr.convert()
    sfr.set_progress(1.0)
    small = sfr.convert()
    assert isinstance(small, CondensedReactivation) and small.index.numel() == 8 * 5
    new, old = torch.randn(2, 16, 5, 6, generator=gen), torch.randn(2, 40, 5, 6, generator=gen)
    torch.testing.assert_close(small(new, old), sfr(new, old), rtol=1e-5, atol=1e-5)
    assert count_macs(lambda x: small(x, old[:1]), new[:1], check=False).total == 30 * int(sfr.weight_mask().sum())
    # a group's inputs reach only the earlier features it kept
    g = 3
    new2 = new.clone()
    new2[:, g::8] += 5.0
    changed = (sfr(new2, old) - sfr(new, old)).abs().amax(dim=(0, 2, 3)) > 0
    assert torch.equal(changed, sfr.keep[g])


# ---- models ------------------------------------------------------------------------------------------------------

def tiny_v2() -> CondenseNetV2:
    """Four one-layer stages with everything V2 has: reactivation, hard-swish from block 2, SE from block 3."""
    stages = tuple(DenseStageCfg(1, k, act="hard_swish" if i >= 2 else "relu", se=i >= 3)
                   for i, k in enumerate((8, 8, 16, 16)))
    cfg = CondenseNetV2Cfg(stages, stem_stride=2, sfr_groups=4, sfr_condense_factor=4, fc_chs=32)
    return CondenseNetV2(cfg, num_classes=10)


def test_registered_names():
    assert {"condensenetv2_a", "condensenetv2_b", "condensenetv2_c", "condensenetv2_cifar"} <= set(
        list_models("condensenetv2*"))


def test_converted_v2_equals_masked_v2_and_costs_only_kept_connections():
    torch.manual_seed(0)
    model = tiny_v2()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(7):
        model.set_progress(step / 6)
        loss = F.cross_entropy(model.train()(x), y) + 1e-4 * model.group_lasso_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    randomize_norm(model, gen)
    model.eval()
    converted = model.convert()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)

    pixels = {}
    learned = [m for m in model.modules() if isinstance(m, (LearnedGroupConv, SparseFeatureReactivation))]
    hooks = [m.register_forward_hook(lambda mod, inp, out: pixels.__setitem__(mod, out.shape[-2] * out.shape[-1]))
             for m in learned]
    dense = count_macs(model, x[:1]).total
    for h in hooks:
        h.remove()
    expected = dense - sum(hw * (m.in_channels * m.out_channels - int(m.weight_mask().sum()))
                           for m, hw in pixels.items())
    assert len(pixels) == 8 and count_macs(converted, x[:1]).total == expected


def test_v2_convert_refuses_unfinished_schedule_and_names_mismatched_keys():
    model = tiny_v2()
    model.set_progress(0.25)
    with pytest.raises(ConversionError, match="not finished"):
        model.convert()
    other = CondenseNetV2(replace(tiny_v2().cfg, sfr_groups=8, sfr_condense_factor=8), num_classes=10)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*stages\.0\.layer1\.sfr\.keep"):
        other.load_state_dict(model.state_dict())


def _official_count(model: nn.Module, size: int) -> float:
    """The official ``measure_model`` convention: learned convs at 1/C, other convs and linears by weights,
    ReLU/hard-swish one op per element, sigmoid two, pooling one per input element."""
    ops = []

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, (LearnedGroupConv, SparseFeatureReactivation)):
            ops.append(x.numel() + mod.in_channels * mod.out_channels * x.shape[-2] * x.shape[-1] / mod.condense_factor)
        elif isinstance(mod, nn.Conv2d):
            ops.append(mod.weight.numel() * out.shape[-2] * out.shape[-1])
        elif isinstance(mod, nn.Linear):
            ops.append(mod.weight.numel())
        elif isinstance(mod, (nn.ReLU, nn.Hardswish, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            ops.append(x.numel())
        elif isinstance(mod, nn.Sigmoid):
            ops.append(2 * x.numel())
    inner = {id(c) for m in model.modules() if isinstance(m, (LearnedGroupConv, SparseFeatureReactivation))
             for c in m.modules() if c is not m}
    for m in model.modules():
        if id(m) not in inner:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return sum(ops)


def test_v2a_matches_the_official_count():
    """Counted the official way, our CondenseNetV2-A gives the published 46M (45.87M)."""
    assert _official_count(create_model("condensenetv2_a"), 224) == pytest.approx(46e6, rel=0.005)


@pytest.mark.parametrize("name, stages", [
    ("condensenetv2_a", [(24, 2), (32, 4), (96, 8), (288, 16), (800, 32)]),
    ("condensenetv2_b", [(24, 2), (72, 4), (216, 8), (600, 16), (1176, 32)]),
    ("condensenetv2_c", [(48, 2), (144, 4), (400, 8), (1040, 16), (2064, 32)]),
])
def test_imagenet_published_figures(name, stages):
    # conv + linear MACs (SE included) of the converted model; the official count adds activations and pooling,
    # which is 6.2% of V2-A's total, 3.8% of B's and 4.3% of C's.
    pub = published_figures(name)
    model = create_model(name, converted=True)
    report = count_macs(model, torch.randn(1, 3, 224, 224))
    assert 0.93 * pub["macs"] <= report.total <= pub["macs"]
    assert report.params == pytest.approx(pub["params"], rel=0.03)
    assert [(s.channels, s.stride) for s in model.stage_info] == stages
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_cifar_model():
    with pytest.raises(ValueError, match=r"\(110, 146\)"):
        create_model("condensenetv2_cifar", depth=100)
    model = create_model("condensenetv2_cifar", converted=True)
    report = count_macs(model, torch.randn(2, 3, 32, 32))
    assert report.params == pytest.approx(0.48e6, rel=0.03)        # the paper's CondenseNetV2-110: 0.48M
    assert [s.channels for s in model.stage_info] == [16 + 18 * 8, 160 + 18 * 16, 448 + 18 * 32]


def test_converted_v2_exports_to_onnx_even_where_groups_update_the_same_feature(tmp_path):
    pytest.importorskip("onnxruntime")
    from dyncnn.export.onnx import export_onnx, onnx_session
    torch.manual_seed(1)
    model = tiny_v2()
    randomize_norm(model, torch.Generator().manual_seed(2))
    model.set_progress(1.0)
    converted = model.eval().convert()
    index = converted.stages[3].layer1.sfr.index
    assert index.unique().numel() < index.numel()       # several groups update one earlier feature
    x = torch.randn(3, 3, 32, 32)
    path = export_onnx(converted, x[:1], tmp_path / "cdnv2.onnx")
    out = onnx_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), converted(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("v2", [False, True])
def test_conversion_keeps_the_models_dtype_and_device(v2):
    from dyncnn.models.condensenet import CondenseNet, cifar_cfg
    model = tiny_v2() if v2 else CondenseNet(cifar_cfg(14), num_classes=10)
    model = model.double().eval()
    randomize_norm(model, torch.Generator().manual_seed(3))
    model.set_progress(1.0)
    converted = model.convert()
    assert {p.dtype for p in converted.parameters()} == {torch.float64}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-12)
