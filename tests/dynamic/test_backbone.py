"""Reading and adapting any backbone: input channels, the stem for another channel count, suggested exits."""
import pytest
import torch
import torch.nn.functional as F

import dyncnn
from dyncnn.dynamic import attach_exits
from dyncnn.dynamic.backbone import adapt_input_weight, input_channels, set_input_channels, stage_ends


def test_adapted_stem_answers_grey_and_equal_channel_images_like_the_rgb_stem():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 3)
    x = torch.randn(2, 1, 9, 9)
    rgb = F.conv2d(x.expand(-1, 3, -1, -1), w)
    torch.testing.assert_close(F.conv2d(x, adapt_input_weight(w, 1)), rgb)                  # summed filters
    torch.testing.assert_close(F.conv2d(x.expand(-1, 6, -1, -1), adapt_input_weight(w, 6)), rgb)   # repeat, 3/6
    assert torch.equal(adapt_input_weight(w, 3), w)


def test_adapt_input_weight_matches_timm():
    timm_manipulate = pytest.importorskip("timm.models._manipulate")
    w = torch.randn(4, 3, 3, 3)
    for c in (1, 2, 4, 7):
        torch.testing.assert_close(adapt_input_weight(w, c), timm_manipulate.adapt_input_conv(c, w.clone()))


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_torchvision_models_take_in_chans(name):
    m = dyncnn.create_model(name, num_classes=10, in_chans=1).eval()
    assert input_channels(m) == 1 and m.dyncnn_spec == {"name": name, "cfg": {"in_chans": 1, "num_classes": 10}}
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 3, 32, 32))
    for bad in (0, -1, 1.5, "1", True):
        with pytest.raises(dyncnn.DyncnnError, match="in_chans must be a positive integer"):
            dyncnn.create_model(name, in_chans=bad)


def test_input_channels_reads_the_first_convolution():
    tv = dyncnn.create_model("torchvision:resnet18")
    assert not hasattr(tv, "in_chans") and input_channels(tv) == 3
    set_input_channels(tv, 4)
    assert tv.conv1.in_channels == 4 and input_channels(tv) == 4
    assert input_channels(torch.nn.Linear(3, 3), default=7) == 7
    with pytest.raises(dyncnn.DyncnnError, match="no in_chans and has no nn.Conv2d"):
        input_channels(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("name,expected", [
    ("torchvision:mobilenet_v2", ["features.6", "features.13", "features.18"]),
    ("torchvision:mobilenet_v3_small", ["features.3", "features.8", "features.12"]),
    ("torchvision:resnet18", ["layer2", "layer3", "layer4"]),
    ("timm:mobilenetv3_small_050", ["blocks.1", "blocks.3", "blocks.5"]),
])
def test_attach_exits_without_naming_layers(name, expected):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    base = dyncnn.create_model(name, num_classes=10, in_chans=1).eval()
    assert stage_ends(base) == expected
    net = attach_exits(base).eval()         # no stages, no in_chans set by hand
    assert net.exit_stages == expected and net.in_chans == 1
    x = torch.randn(2, 1, 64, 64)
    outs = net(x)
    assert len(outs) == net.num_exits >= 3
    torch.testing.assert_close(outs[-1], base(x))
    assert net.infer(x).logits.shape == (2, 10)


def test_stage_ends_refuses_a_network_without_strided_stages():
    with pytest.raises(dyncnn.DyncnnError, match="give the exit modules by name"):
        stage_ends(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()))
