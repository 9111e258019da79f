import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyncnn
from dyncnn.dynamic import Cascade, ExitPolicy, attach_exits
from dyncnn.dynamic.executor import CostLedger, select_rows


def _net(name="tiny_mobilenet", **kw):
    torch.manual_seed(0)
    return dyncnn.create_model("multi_exit", backbone=name, num_classes=10, **kw).eval()


def _median_policy(net, x):
    """Thresholds at each exit's median confidence: samples spread over all exits."""
    outs = net(x)
    conf = [torch.softmax(o, 1).max(1).values for o in outs[:-1]]
    return ExitPolicy([float(c.median()) for c in conf])


@pytest.mark.parametrize("backbone,kw,stages,shape", [
    ("tiny_mobilenet", {"in_chans": 1}, None, (1, 32, 32)),
    ("resnet20_cifar", {}, None, (3, 32, 32)),
    ("torchvision:mobilenet_v2", {}, ["features.3", "features.6", "features.13", "features.18"], (3, 32, 32)),
])
def test_last_exit_is_the_backbone(backbone, kw, stages, shape):
    torch.manual_seed(0)
    base = dyncnn.create_model(backbone, num_classes=10, **kw).eval()
    net = attach_exits(base, stages).eval()
    x = torch.randn(4, *shape)
    outs = net(x)
    assert len(outs) == net.num_exits >= 3 and all(o.shape == (4, 10) for o in outs)
    torch.testing.assert_close(outs[-1], base(x))               # the last segment ends with the own classifier
    # the exit heads are new modules; the backbone's parameters are shared, not copied
    assert {id(p) for p in base.parameters()} <= {id(p) for p in net.parameters()}
    n_heads = sum(p.numel() for h in net.heads[:-1] for p in h.parameters())
    assert dyncnn.count_params(net) == dyncnn.count_params(base) + n_heads > dyncnn.count_params(base)


def test_batched_infer_equals_one_sample_at_a_time():
    net = _net(in_chans=1)
    x = torch.randn(24, 1, 32, 32)
    policy = _median_policy(net, x)
    batched = net.infer(x, policy)
    assert len(set(batched.exit_index.tolist())) >= 3              # samples really spread over exits
    for i in range(len(x)):
        single = net.infer(x[i:i + 1], policy)
        assert int(single.exit_index) == int(batched.exit_index[i])
        assert int(single.macs) == int(batched.macs[i])
        torch.testing.assert_close(single.logits[0], batched.logits[i], rtol=1e-4, atol=1e-5)


def test_ledger_equals_flop_counter_and_exits_cost_what_they_account():
    net = _net(in_chans=1)
    x = torch.randn(32, 1, 32, 32)
    policy = _median_policy(net, x)
    with FlopCounterMode(display=False) as counter:
        result = net.infer(x, policy)
    assert result.macs.sum() == counter.get_total_flops() // 2
    cum = torch.tensor(net.exit_macs(x[:1]))
    assert torch.equal(result.macs, cum[result.exit_index])          # each sample paid exactly its exits
    # and the exited samples really left: the total is well below running everyone to the end
    assert result.macs.sum() < 0.9 * len(x) * cum[-1]


def test_never_is_inf_and_one_is_an_ordinary_threshold():
    """The rule of ExitPolicy's docstring: leave when confidence >= threshold; math.inf never leaves, and 1.0 lets
    a sample whose float32 confidence saturates to exactly 1.0 leave (it is not a spelling of "never")."""
    logits = torch.zeros(3, 10)
    logits[0, 3] = 40.0                          # softmax saturates: confidence exactly 1.0 in float32
    logits[1, 3] = 5.0                           # confident, below 1.0
    conf = torch.softmax(logits, 1).amax(1)
    assert conf[0].item() == 1.0 and conf[1].item() < 1.0
    for criterion in ("max_prob", "margin"):
        assert ExitPolicy([1.0], criterion)(0, logits).tolist() == [True, False, False]
    assert ExitPolicy([math.inf])(0, logits).tolist() == [False] * 3
    assert ExitPolicy.never(2).thresholds == [math.inf]
    assert ExitPolicy([-math.inf])(0, logits).tolist() == [True] * 3
    net = _net(in_chans=1)                       # a network: with math.inf every sample reaches the last exit
    x = torch.randn(4, 1, 32, 32) * 50
    full = net.infer(x, ExitPolicy([math.inf] * (net.num_exits - 1)))
    assert full.exit_index.tolist() == [net.num_exits - 1] * 4


def test_extreme_policies():
    net = _net(in_chans=1)
    x = torch.randn(6, 1, 32, 32)
    cum = net.exit_macs(x[:1])
    first = net.infer(x, ExitPolicy.always_first(net.num_exits))
    assert first.exit_index.tolist() == [0] * 6 and first.macs.tolist() == [cum[0]] * 6
    full = net.infer(x)
    assert full.exit_index.tolist() == [net.num_exits - 1] * 6 and full.macs.tolist() == [cum[-1]] * 6
    torch.testing.assert_close(full.logits, net(x)[-1])
    torch.testing.assert_close(first.logits, net(x)[0])


def test_bad_inputs():
    net = _net(in_chans=1)
    empty = net.infer(torch.zeros(0, 1, 32, 32), [0.5, 0.5, 0.5])
    assert empty.logits.shape == (0, 10) and empty.exit_index.numel() == 0
    with pytest.raises(ValueError, match="expected 3 thresholds"):
        net.infer(torch.randn(2, 1, 32, 32), [0.5])
    with pytest.raises(dyncnn.DyncnnError, match="finite"):
        net.infer(torch.full((2, 1, 32, 32), math.nan), [0.5, 0.5, 0.5])
    net.heads[0].head.fc.bias.data[0] = math.nan                      # a broken exit head
    with pytest.raises(FloatingPointError, match="NaN"):
        net.infer(torch.randn(2, 1, 32, 32), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="not called"):
        attach_exits(dyncnn.create_model("tiny_mobilenet"), ["stages.9"])


def test_cascade_runs_big_model_only_on_unsure_samples():
    torch.manual_seed(0)
    small = dyncnn.create_model("tiny_mobilenet", widths=(8, 16), num_classes=10).eval()
    big = dyncnn.create_model("tiny_mobilenet", widths=(32, 64, 128), num_classes=10).eval()
    cascade = Cascade([small, big], num_classes=10, in_chans=1).eval()
    x = torch.randn(16, 1, 32, 32)
    conf = torch.softmax(small(x), 1).max(1).values
    th = float(conf.median())
    r = cascade.infer(x, [th])
    small_macs = dyncnn.count_macs(small, x[:1]).total
    big_macs = dyncnn.count_macs(big, x[:1]).total
    sent_on = conf < th
    assert torch.equal(r.exit_index, sent_on.long())
    assert torch.equal(r.macs, small_macs + sent_on.long() * big_macs)
    torch.testing.assert_close(r.logits[sent_on], big(x[sent_on]))


def test_select_rows_on_pytrees_and_ledger():
    state = {"a": torch.arange(6).view(3, 2), "b": [torch.arange(3), torch.tensor(7)]}
    out = select_rows(state, torch.tensor([True, False, True]))
    assert out["a"].tolist() == [[0, 1], [4, 5]] and out["b"][0].tolist() == [0, 2] and int(out["b"][1]) == 7
    ledger = CostLedger(4)
    ledger.charge(torch.tensor([0, 2]), 5)
    ledger.charge(torch.tensor([2, 3]), torch.tensor([1, 2]))
    assert ledger.macs.tolist() == [5, 0, 6, 2] and ledger.total == 13


def test_exits_on_a_timm_model():
    pytest.importorskip("timm")
    base = dyncnn.create_model("timm:mobilenetv3_small_050", num_classes=10).eval()
    net = attach_exits(base, ["blocks.1", "blocks.3", "blocks.5"]).eval()
    assert net.num_exits == 3          # only timm's head (conv_head, pool, classifier) follows blocks.5
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(net(x)[-1], base(x))
    cum = net.exit_macs(x[:1])
    assert cum[0] < cum[1] < cum[2]
    r = net.infer(x, ExitPolicy.always_first(3))
    assert r.macs.tolist() == [cum[0]] * 3


def test_every_named_cut_gets_an_exit_when_more_network_follows():
    """Issue 14, bug 3: the last named cut was merged with the model's output, so layer1..layer3 of a ResNet gave
    3 exits (the one after layer3 was lost). A cut followed only by the head still is the model's output."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    net = attach_exits(base, ["layer1", "layer2", "layer3"]).eval()
    outs = net(x)
    assert net.num_exits == len(outs) == 4
    assert [h.head.fc.in_features for h in net.heads[:-1]] == [64, 128, 256]
    torch.testing.assert_close(outs[-1], base(x))
    cum = net.exit_macs(x[:1])
    assert cum[0] < cum[1] < cum[2] < cum[3]
    assert attach_exits(base, ["layer1", "layer2", "layer4"]).num_exits == 3   # only pool + fc after layer4


def test_exit_reads_the_stage_output_not_an_op_inside_it():
    """A cut ends after the module's last op, functional ones included: CondenseNetV2's dense stage ends with a
    concat after its last module call, and the exit used to read that layer's reactivation instead."""
    base = dyncnn.create_model("condensenetv2_cifar", num_classes=10).eval()
    net = attach_exits(base, example_size=32).eval()
    seen = []
    base.stages[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    base(torch.randn(1, 3, 32, 32))
    assert net.heads[0].head.fc.in_features == seen[0]


def test_exits_on_a_timm_vit():
    """timm's ViT forward has optional arguments (attn_mask, is_causal): it is traced with their defaults, and the
    exits after transformer blocks pool the tokens."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=10, pretrained=False).eval()
    with pytest.raises(ValueError, match="pass example_size"):
        attach_exits(base, ["blocks.0", "blocks.2"])              # the dummy pass at 64x64 does not fit
    net = attach_exits(base, ["blocks.0", "blocks.2"], example_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    outs = net(x)
    assert len(outs) == 3 and all(o.shape == (3, 10) for o in outs)
    torch.testing.assert_close(outs[-1], base(x))
    with pytest.raises(ValueError, match="tokens"):
        attach_exits(base, ["blocks.0"], head="conv", example_size=32)
    cum = net.exit_macs(x[:1])
    assert cum[0] < cum[1] < cum[2]
    r = net.infer(x, ExitPolicy.always_first(3))
    assert r.macs.tolist() == [cum[0]] * 3
    torch.testing.assert_close(r.logits, outs[0])


def test_default_exits_of_a_dyncnn_backbone_are_one_per_stage():
    base = dyncnn.create_model("tiny_mobilenet", num_classes=10, widths=[8, 16, 32]).eval()
    net = attach_exits(base).eval()
    assert net.num_exits == len(base.stage_info) == 3     # the last stage's exit is the model's own classifier
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(net(x)[-1], base(x))
