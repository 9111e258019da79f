"""CondenseNet V1: condensing schedule, exact conversion, cost of the kept connections, published figures."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyncnn.errors import CheckpointError, DyncnnError
from dyncnn.layers.learned_group import ConversionError, LearnedGroupConv, LearnedLinear
from dyncnn.models import create_model, list_models, published_figures
from dyncnn.models.condensenet import CondenseNet, CondenseNetCfg, DenseStageCfg, cifar_cfg
from dyncnn.profile.macs import count_macs


def randomize_norm(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)


def tiny(**kwargs) -> CondenseNet:
    """CIFAR CondenseNet-14: two dense layers per stage, growth 8-16-32, G = C = 4."""
    return CondenseNet(cifar_cfg(14), num_classes=10, **kwargs)


def train_through_schedule(model: CondenseNet, steps: int = 8, seed: int = 0) -> None:
    """A few SGD steps with set_progress before each, as the trainer does, from 0 to the end of training."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(steps + 1):
        model.set_progress(step / steps)
        loss = F.cross_entropy(model(x), y) + 1e-4 * model.group_lasso_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained_pair():
    torch.manual_seed(0)
    model = tiny()
    train_through_schedule(model)
    randomize_norm(model, torch.Generator().manual_seed(1))
    model.eval()
    return model, model.convert()


def test_registered_names():
    expected = {"condensenet74_c4_g4", "condensenet74_c8_g8"} | {
        f"condensenet_cifar{d}" for d in (50, 74, 86, 98, 110, 122, 182)}
    assert expected <= set(list_models("condensenet*"))


def test_converted_model_gives_the_masked_models_output(trained_pair):
    model, converted = trained_pair
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = converted(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert converted.is_converted and not model.is_converted
    assert not any(isinstance(m, (LearnedGroupConv, LearnedLinear)) for m in converted.modules())
    # the masks matter: with every connection switched back on the output differs
    dense = tiny()
    dense.load_state_dict({k: (torch.ones_like(v) if k.endswith("keep") else v)
                           for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert (dense.eval()(x) - ref).abs().max() > 1e-3


def test_converted_macs_are_those_of_the_kept_connections_only(trained_pair):
    model, converted = trained_pair
    x = torch.randn(1, 3, 32, 32)
    pixels: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: pixels.__setitem__(mod, out.shape[-2] * out.shape[-1]))
             for m in model.modules() if isinstance(m, LearnedGroupConv)]
    dense = count_macs(model, x).total          # the masked model runs dense convolutions
    for h in hooks:
        h.remove()
    expected = dense
    for m, hw in pixels.items():
        expected -= hw * (m.in_channels * m.out_channels - int(m.weight_mask().sum()))
    head = model.classifier
    expected -= (head.in_features - int(head.keep.sum())) * head.out_features
    assert count_macs(converted, x).total == expected
    assert expected < 0.7 * dense


def test_set_progress_drops_one_cth_per_group_at_each_stage():
    model = tiny()
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupConv)]
    for stage, progress in [(0, 0.0), (0, 0.16), (1, 1 / 6), (2, 0.4), (3, 0.5), (3, 1.0)]:
        model.set_progress(progress)
        for m in layers:
            assert m.keep.sum(1).tolist() == [m.in_channels - stage * (m.in_channels // 4)] * m.groups
        assert int(model.classifier.keep.sum()) == (model.num_features // 2 if progress >= 0.5
                                                   else model.num_features)


def test_convert_refuses_unfinished_or_already_converted_models(trained_pair):
    model = tiny()
    model.set_progress(0.3)
    with pytest.raises(ConversionError, match=r"not finished.*0\.5"):
        model.convert()
    with pytest.raises(ConversionError, match="already converted"):
        trained_pair[1].convert()


def test_loading_another_configuration_names_the_mismatched_keys(trained_pair):
    model, converted = trained_pair
    deeper = CondenseNet(cifar_cfg(20), num_classes=10)                  # three layers per stage
    with pytest.raises(CheckpointError, match=r"missing keys: .*stages\.0\.layer3\."):
        deeper.load_state_dict(model.state_dict())
    wider_groups = CondenseNet(cifar_cfg(14, groups=8), num_classes=10)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*stages\.0\.layer1\.conv1\.keep"):
        wider_groups.load_state_dict(model.state_dict())
    with pytest.raises(CheckpointError, match="converted=True"):
        tiny().load_state_dict(converted.state_dict())


def test_mid_schedule_checkpoint_resumes_masks_and_stage():
    model = tiny()
    train_through_schedule(model, steps=3)           # progress 0, 1/3, 2/3, 1 -> finished
    resumed = tiny()
    resumed.load_state_dict(model.state_dict())
    layer = resumed.stages[0].layer1.conv1
    assert layer.stage == 3 and torch.equal(layer.keep, model.stages[0].layer1.conv1.keep)
    resumed.convert()                                 # finished schedule restored from the buffers alone


def test_create_model_converted_loads_a_converted_state_dict(trained_pair):
    _, converted = trained_pair
    rebuilt = CondenseNet(cifar_cfg(14), num_classes=10)
    rebuilt.set_progress(1.0)
    rebuilt = rebuilt.convert()
    rebuilt.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), converted(x))
    m = create_model("condensenet_cifar50", converted=True)
    assert m.is_converted and m.dyncnn_spec["cfg"]["converted"] is True
    trained = create_model("condensenet_cifar50")
    trained.set_progress(0.5)
    assert trained.convert().dyncnn_spec == {"name": "condensenet_cifar50", "cfg": {"converted": True}}


def test_group_lasso_and_regularization_loss():
    model = tiny(lasso_weight=1e-3)
    lasso = model.group_lasso_loss()
    assert lasso.item() > 0
    reg = model.regularization_loss()
    assert reg.item() == pytest.approx(1e-3 * lasso.item(), rel=1e-5)
    reg.backward()
    assert model.stages[0].layer1.conv1.conv.weight.grad is not None
    model.set_progress(0.5)
    assert model.group_lasso_loss().item() == 0.0
    assert tiny().regularization_loss().item() == 0.0


def test_set_progress_validates_its_argument():
    with pytest.raises(DyncnnError, match=r"\[0, 1\]"):
        tiny().set_progress(1.2)


def test_stage_info_matches_the_feature_maps_and_small_inputs_work():
    model = tiny().eval()
    shapes = {}
    for info in model.stage_info:
        model.get_submodule(info.module).register_forward_hook(
            lambda mod, inp, out, name=info.module: shapes.__setitem__(name, out.shape))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 40, 36)).shape == (2, 10)
    for info in model.stage_info:
        n, c, h, w = shapes[info.module]
        assert c == info.channels and (h, w) == (40 // info.stride, 36 // info.stride)
    assert [s.stride for s in model.stage_info] == [1, 2, 4]
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(DyncnnError, match="3 input channels"):
        model(torch.randn(1, 1, 32, 32))


def test_unsupported_configurations_name_the_supported_values():
    with pytest.raises(ValueError, match=r"6 n \+ 2.*86"):
        cifar_cfg(51)
    with pytest.raises(ValueError, match="multiples of 4"):
        CondenseNet(CondenseNetCfg((DenseStageCfg(2, 6),), stem_stride=1))


def _official_count(model: CondenseNet, size: int) -> float:
    """The official ``measure_model`` convention on the training model: learned 1x1 convs at 1/C, 3x3 and stem
    convs, ReLU (one op per element), pooling (one per input element), the classifier uncondensed with bias."""
    ops = []

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, LearnedGroupConv):
            ops.append(x.numel() + mod.in_channels * mod.out_channels * x.shape[-2] * x.shape[-1] / mod.condense_factor)
        elif isinstance(mod, nn.Conv2d):
            ops.append(mod.weight.numel() * out.shape[-2] * out.shape[-1])
        elif isinstance(mod, nn.ReLU):
            ops.append(x.numel())
        elif isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            ops.append(x.numel())
        elif isinstance(mod, LearnedLinear):
            ops.append(mod.linear.weight.numel() + mod.linear.bias.numel())
    inner = {id(c) for m in model.modules() if isinstance(m, (LearnedGroupConv, LearnedLinear))
             for c in m.modules() if c is not m}
    for m in model.modules():
        if id(m) not in inner:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return sum(ops)


def test_cifar86_matches_the_official_count_exactly():
    """Counted the way the official code counts, our CondenseNet-86 gives the published 65.8M."""
    assert round(_official_count(create_model("condensenet_cifar86"), 32) / 1e6, 1) == 65.8


@pytest.mark.parametrize("name", ["condensenet_cifar50", "condensenet_cifar86", "condensenet_cifar122"])
def test_cifar_published_figures(name):
    # conv + linear MACs of the converted model: the official count adds ReLU and pooling, 5.0-5.3% here.
    pub = published_figures(name)
    report = count_macs(create_model(name, converted=True), torch.randn(1, 3, 32, 32))
    assert 0.94 * pub["macs"] <= report.total <= pub["macs"]
    assert report.params == pytest.approx(pub["params"], rel=0.03)


@pytest.mark.parametrize("name", ["condensenet74_c4_g4", "condensenet74_c8_g8"])
def test_imagenet_published_figures_and_stages(name):
    pub = published_figures(name)
    model = create_model(name, converted=True)
    report = count_macs(model, torch.randn(1, 3, 224, 224))
    assert 0.95 * pub["macs"] <= report.total <= pub["macs"]
    assert report.params == pytest.approx(pub["params"], rel=0.03)
    assert [(s.channels, s.stride) for s in model.stage_info] == [
        (48, 2), (144, 4), (400, 8), (1040, 16), (2064, 32)]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)   # the 32x32 minimum
