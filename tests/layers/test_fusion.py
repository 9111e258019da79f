"""BatchNorm folding and channels-last weights (layers.fusion) against the unchanged model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dyncnn.errors import DyncnnError
from dyncnn.layers import ConvNormAct
from dyncnn.layers.fusion import fold_batchnorm, optimize_for_inference
from dyncnn.models import create_model


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that a fold that got them wrong shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet20_cifar", {"width_mult": 0.5}, (3, 32, 32)),
    ("mobilenet_v2", {"width_mult": 0.25}, (3, 64, 64)),
    ("mobilenet_v3_small", {"width_mult": 0.5}, (3, 64, 64)),
    ("shufflenet_v2_x0_5", {}, (3, 64, 64)),
    ("tiny_mobilenet", {"in_chans": 1}, (1, 32, 32)),
])
def test_optimized_static_model_matches(name, kw, shape):
    torch.manual_seed(0)
    model = _randomise_bn(create_model(name, num_classes=10, **kw))
    x = torch.randn(4, *shape)
    fast = optimize_for_inference(model)
    assert fast is not model and _count(model, nn.BatchNorm2d) > 0       # a copy; the original keeps its BNs
    assert _count(fast, nn.BatchNorm2d) == 0, "every conv -> BN pair of these backbones sits in a Sequential"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.dim() == 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-4)


def test_folds_inside_fx_graphs_of_a_split_backbone():
    """attach_exits cuts the backbone into fx GraphModules, whose submodules are no longer Sequentials: the pairs
    are read from the graph."""
    torch.manual_seed(0)
    net = _randomise_bn(create_model("multi_exit", backbone="mobilenet_v2", num_classes=10,
                                     stages=["stages.2", "stages.4"], backbone_cfg={"width_mult": 0.25}))
    x = torch.randn(4, 3, 64, 64)
    before = _count(net, nn.BatchNorm2d)
    fast = optimize_for_inference(net, channels_last=False)
    assert before > 0 and _count(fast, nn.BatchNorm2d) == 0
    with torch.no_grad():
        for a, b in zip(fast(x), net(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        conf = torch.softmax(net(x)[0], 1).max(1).values.sort().values
    policy = [float(conf[1] + conf[2]) / 2, 2.0]                # two samples leave at the first exit
    r, s = fast.infer(x, policy), net.infer(x, policy)
    assert s.exit_index.tolist().count(0) == 2
    assert torch.equal(r.exit_index, s.exit_index) and torch.equal(r.macs, s.macs)


def test_pairs_without_a_known_order_or_with_shared_modules_stay():
    bn = nn.BatchNorm2d(4)

    class Custom(nn.Conv2d):
        def forward(self, x):                  # not Conv2d's forward: folding into its weight could be wrong
            return super().forward(x) * 2

    class Unordered(nn.Module):                 # children registered conv then BN, but called the other way round
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(x))

    tied = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), bn, nn.Conv2d(4, 4, 1), bn)
    model = nn.Sequential(tied, Unordered(), nn.Sequential(Custom(4, 4, 1), nn.BatchNorm2d(4)),
                          ConvNormAct(4, 4, 3), ConvNormAct(4, 4, 1)).eval()
    model[4][1].train()                         # left in training mode: it normalises with batch statistics
    x = torch.randn(2, 4, 8, 8)
    want = model(x)
    assert fold_batchnorm(model) == 1                       # only the first ConvNormAct
    assert isinstance(model[3][1], nn.Identity) and model[0][1] is bn
    assert isinstance(model[4][1], nn.BatchNorm2d)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_a_training_model_is_refused():
    model = ConvNormAct(3, 8, 3)
    with pytest.raises(DyncnnError, match="eval"):
        optimize_for_inference(model)
    with pytest.raises(DyncnnError, match="eval"):
        fold_batchnorm(model)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_row_helpers_keep_the_layout_and_equal_index_select(layout):
    from dyncnn.layers.fusion import empty_rows, put_rows, take_rows
    x = torch.randn(5, 3, 4, 6).contiguous(memory_format=layout)
    idx = torch.tensor([4, 0, 2])
    rows = take_rows(x, idx)
    assert torch.equal(rows, x.index_select(0, idx))
    assert rows.is_contiguous(memory_format=layout)
    into = empty_rows(x, 5).zero_()
    assert into.shape == x.shape and into.is_contiguous(memory_format=layout)
    out = put_rows(into, idx, rows)
    assert out is into and torch.equal(out, torch.zeros_like(x).index_copy_(0, idx, x.index_select(0, idx)))
