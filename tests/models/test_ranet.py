import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyncnn
from dyncnn.dynamic import ExitPolicy
from dyncnn.models.ranet import CIFAR_CFG, RANet, RANetBlock, ranet_plan

# A small RANet: 3 flows, 2 + 1 + 1 exits, fusion, down-sampling and transitions all present.
SMALL = dict(nChannels=8, growthRate=4, nBlocks=2, block_step=1, step=2, scale_list=(1, 2, 3), grFactor=(4, 2, 1),
             bnFactor=(4, 2, 1), head_channels=16)
SMALL_LG = dict(SMALL, stepmode="lg", step=1, scale_list=(1, 2, 3, 3), grFactor=(4, 2, 1, 1), bnFactor=(4, 2, 1, 1))

# Cumulative MACs per exit of the OFFICIAL RANet (yangle15/RANet-pytorch @ be0f25a, models/RANet.py), measured
# with FlopCounterMode (conv + linear, FLOPs / 2) on one zero image: one forward under the counter with a hook on
# each classifier reading the running total (earlier classifiers included). Parameter counts from the same models.
# - CIFAR: train_cifar.sh (args.py defaults + --step 4 --stepmode even --scale-list 1-2-3-3 --grFactor 4-2-1-1
#   --bnFactor 4-2-1-1), cifar10, 32x32.
# - ImageNet: train_imagenet.sh (args.py defaults + --growthRate 16 --step 8 --stepmode even --scale-list 1-2-3-4
#   --grFactor 4-2-1-1 --bnFactor 4-2-1-1), 1000 classes, 224x224. Its 7x7 stem conv has a bias (16 params) that
#   ours omits, since a norm follows.
OFFICIAL = {
    "ranet_cifar": (32, 10, [15738112, 31173120, 44462208, 50152832, 60314944, 63302208, 89522560, 94247040],
                    3261830),
    "ranet_imagenet": (224, 1000, [167270912, 519517184, 730608126, 902451354, 1050394926, 1116919182, 1585110795,
                                   1677046695], 87972617 - 16),
}


def _small(**kw):
    torch.manual_seed(0)
    return RANet(num_classes=10, in_chans=1, **{**SMALL, **kw}).eval()


def _spread_policy(net, x):
    """Thresholds halfway between the two middle confidences of each exit: samples spread over the exits, and no
    sample sits on a threshold (where float rounding of batched vs single runs could flip its decision)."""
    with torch.no_grad():
        outs = net(x)
    mids = [torch.softmax(o, 1).max(1).values.sort().values[len(x) // 2 - 1:len(x) // 2 + 1] for o in outs[:-1]]
    return ExitPolicy([float(m.mean()) for m in mids])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_exit_macs_and_params_match_official(name):
    size, classes, official, params = OFFICIAL[name]
    net = dyncnn.create_model(name, num_classes=classes)
    ours = net.exit_macs(torch.zeros(1, 3, size, size))
    assert len(ours) == len(official) == net.num_exits == 8
    for k, (a, b) in enumerate(zip(ours, official)):
        assert abs(a - b) <= 0.02 * b, f"exit {k}: ours {a} vs official {b}"
    assert dyncnn.count_params(net) == params


def test_plan_follows_the_official_layout():
    plan = ranet_plan(**{k: v for k, v in CIFAR_CFG.items()
                         if k not in ("stem", "head_channels")})
    flows = [[b for b in plan if b.flow == s] for s in range(4)]
    assert [len(f) for f in flows] == [2, 4, 6, 8]                        # nBlocks + s * block_step
    assert [sum(b.fuses for b in f) for f in flows] == [0, 2, 4, 6]         # one fusion block per lower block
    assert [sum(b.exit for b in f) for f in flows] == [2, 2, 2, 2]
    # flow s down-samples scale_list[s] - 1 times, where lower flows end; transitions at floor(i * n / scale)
    assert [[b.index + 1 for b in f if b.down] for f in flows] == [[], [2], [2, 4], [4, 6]]
    assert [[b.index + 1 for b in f if b.trans] for f in flows] == [[], [2], [2, 4], [2, 5]]
    assert [b.in_chs for b in flows[0]] == [64, 160] and flows[1][0].low_chs == (64, 88, 112, 136, 160)
    lg = ranet_plan(step=2, stepmode="lg")
    assert [b.layers for b in lg if b.flow == 2] == [2, 4, 6, 8, 10, 12]    # block j has j * step layers


@pytest.mark.parametrize("cfg,size", [(SMALL, 32), (SMALL, 64), (SMALL_LG, 32), (SMALL_LG, 64)])
def test_forward_one_logits_per_exit_and_backward(cfg, size):
    torch.manual_seed(0)
    net = RANet(num_classes=7, in_chans=1, **cfg)
    outs = net(torch.randn(2, 1, size, size))
    assert len(outs) == net.num_exits == sum(b.exit for b in net.plan) and net.num_exits >= 4
    assert all(o.shape == (2, 7) and torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_batched_infer_equals_one_sample_at_a_time():
    net = _small()
    x = torch.randn(16, 1, 32, 32)
    policy = _spread_policy(net, x)
    batched = net.infer(x, policy)
    assert len(set(batched.exit_index.tolist())) >= 3                      # samples really spread over exits
    for i in range(len(x)):
        single = net.infer(x[i:i + 1], policy)
        assert int(single.exit_index) == int(batched.exit_index[i])
        assert int(single.macs) == int(batched.macs[i])
        torch.testing.assert_close(single.logits[0], batched.logits[i], rtol=1e-4, atol=1e-5)


def test_ledger_equals_flop_counter_and_exits_skip_later_flows():
    net = _small()
    x = torch.randn(16, 1, 32, 32)
    policy = _spread_policy(net, x)
    with FlopCounterMode(display=False) as counter:
        result = net.infer(x, policy)
    assert int(result.macs.sum()) == counter.get_total_flops() // 2
    cum = torch.tensor(net.exit_macs(x[:1]))
    assert bool((cum[1:] > cum[:-1]).all())
    assert torch.equal(result.macs, cum[result.exit_index])                # each sample paid exactly its exits
    assert result.macs.sum() < 0.9 * len(x) * cum[-1]                      # exited samples skipped the rest


def test_extreme_policies():
    net = _small(nChannels=4, scale_list=(1, 2, 2))
    x = torch.randn(5, 1, 32, 32)
    cum = net.exit_macs(x[:1])
    with torch.no_grad():
        outs = net(x)
    first = net.infer(x, [-math.inf] * (net.num_exits - 1))
    assert first.exit_index.tolist() == [0] * 5 and first.macs.tolist() == [cum[0]] * 5
    torch.testing.assert_close(first.logits, outs[0])
    full = net.infer(x)
    assert full.exit_index.tolist() == [net.num_exits - 1] * 5 and full.macs.tolist() == [cum[-1]] * 5
    torch.testing.assert_close(full.logits, outs[-1])


def test_block_outputs_are_prefixes_of_the_kept_features():
    """The state keeps one tensor per block (two when it down-samples); the fused outputs are its prefixes."""
    net = _small()
    down = next(b for s in net.stages for b in s.blocks if b.cfg.down)
    plain = next(b for s in net.stages for b in s.blocks if not b.cfg.fuses)
    for block in (plain, down):
        cfg = block.cfg
        x = torch.randn(1, cfg.in_chs, 8, 8)
        low = [torch.randn(1, cfg.low_chs[-1], 4, 4)] if cfg.fuses else None
        with torch.no_grad():
            _, feats = block(x, low)
            outs, h = [x], x
            for i, layer in enumerate(block.layers):
                h = layer(h, low[0][:, :cfg.low_chs[i]]) if cfg.fuses else layer(h)
                outs.append(h)
        assert len(feats) == (2 if cfg.down else 1) and torch.equal(feats[-1], outs[-1])
        for i, out in enumerate(outs[:-1]):
            assert torch.equal(feats[0][:, :out.shape[1]], out)
    assert isinstance(down, RANetBlock) and feats[-1].shape[-1] == 4     # the down block halved the resolution


@pytest.mark.parametrize("kw,match", [
    ({"stepmode": "log"}, r"stepmode must be one of \('even', 'lg'\)"),
    ({"stem": "svhn"}, r"stem must be one of \('cifar', 'imagenet'\)"),
    ({"scale_list": (2, 3, 4)}, "scale_list must start at 1"),
    ({"scale_list": (1, 3, 4)}, "rise by 0 or 1"),
    ({"grFactor": (4, 2)}, "one entry per flow"),
    ({"block_step": 0}, "block_step must be an integer >= 1"),
    ({"growthRate": 2}, "compress_factor=0.25 gives flow 2"),
    ({"compress_factor": 1.5}, r"compress_factor must be in \(0, 1\)"),
    ({"reduction": 0}, r"reduction must be in \(0, 1\]"),
    ({"step": 0}, "step must be an integer >= 1"),
    ({"head_channels": 0}, "head_channels must be None"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        RANet(in_chans=1, **{**SMALL, **kw})


def test_bad_input_raises():
    net = _small()
    with pytest.raises(dyncnn.DyncnnError, match="expected 1 input channels"):
        net(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="expected 3 thresholds"):
        net.infer(torch.randn(2, 1, 32, 32), [0.5])
