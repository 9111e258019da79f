import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic import ExitPolicy
from dyncnn.models import create_model, published_figures
from dyncnn.models.msdnet import MSDLayer, MSDNet, msdnet_cfg

# Cumulative MACs per exit (every block and every classifier up to that exit, one image) of the OFFICIAL code,
# kalviny/MSDNet-PyTorch @ f654595 (models/msdnet.py), measured with torch.utils.flop_counter.FlopCounterMode
# (conv + linear FLOPs / 2) block by block; parameter counts of the same models. Configurations: the README's
# command lines (CIFAR anytime: nBlocks 7, step 2, base 4, nChannels 16, stepmode even; CIFAR batch: nBlocks 5,
# step 1, base 1, lin_grow; ImageNet: nBlocks 5, step 4, base 4, nChannels 32, growthRate 16, grFactor and
# bnFactor 1-2-4-4) with args.py defaults for the rest (growthRate 6, grFactor/bnFactor 1-2-4, prune max,
# reduction 0.5, bottleneck True). The official ImageNet stem conv has a bias (followed by BN): +32 params.
OFFICIAL = {
    "cifar10_anytime": ("msdnet_cifar", {"num_classes": 10}, 32, 2_986_690,
                        [14_955_776, 25_235_968, 36_745_984, 45_926_400, 56_876_288, 66_460_160, 75_407_104]),
    "cifar100_anytime": ("msdnet_cifar", {"num_classes": 100}, 32, 3_067_960,
                         [14_967_296, 25_259_008, 36_780_544, 45_972_480, 56_933_888, 66_529_280, 75_487_744]),
    "cifar100_batch_lin_grow": ("msdnet_cifar", {"num_classes": 100, "nBlocks": 5, "stepmode": "lin_grow",
                                                 "step": 1, "base": 1}, 32, 2_078_924,
                                [6_792_704, 14_209_024, 27_278_848, 41_373_696, 58_087_936]),
    "cifar100_prune_min": ("msdnet_cifar", {"num_classes": 100, "prune": "min"}, 32, 2_819_862,
                           [14_967_296, 25_824_256, 34_358_784, 47_052_800, 55_108_096, 65_080_320, 74_717_696]),
    "imagenet": ("msdnet_imagenet", {}, 224, 23_958_440 - 32,
                 [337_214_464, 681_654_272, 1_003_659_008, 1_249_626_240, 1_355_606_016]),
}

SMALL = dict(nBlocks=4, step=1, base=1, nChannels=8, growthRate=4, num_classes=10, in_chans=1)


def _small(**kw) -> MSDNet:
    torch.manual_seed(0)
    return create_model("msdnet_cifar", **{**SMALL, **kw}).eval()


@pytest.mark.parametrize("key", list(OFFICIAL))
def test_exit_macs_and_params_match_the_official_code(key):
    name, kw, size, params, official = OFFICIAL[key]
    net = create_model(name, **kw)
    ours = net.exit_macs(torch.zeros(1, 3, size, size))
    assert len(ours) == len(official)
    for k, (a, b) in enumerate(zip(ours, official)):
        assert a == pytest.approx(b, rel=0.02), f"exit {k}: ours {a / 1e6:.2f}M, official {b / 1e6:.2f}M"
    assert sum(p.numel() for p in net.parameters()) == params


def test_paper_imagenet_curve_is_the_step7_model():
    pub = published_figures("msdnet_imagenet_step7")
    ours = create_model("msdnet_imagenet_step7").exit_macs(torch.zeros(1, 3, 224, 224))
    assert ours == pytest.approx(pub["exit_macs"], rel=0.02)      # 0.62 / 1.44 / 2.28 / 2.97 / 3.25 GMACs
    assert ours[-1] == pytest.approx(pub["macs"], rel=0.02)


def test_official_scale_schedule():
    # CIFAR anytime: 16 layers, 3 scales -> the finest scale is dropped after layers 6 and 12, a transition
    # (reduction 0.5) follows each drop (official _build_block with prune="max").
    cfg = msdnet_cfg()
    assert [len(b) for b in cfg.blocks] == [4, 2, 2, 2, 2, 2, 2]
    layers = [lc for b in cfg.blocks for lc in b]
    assert [lc.out_scales for lc in layers] == [3] * 6 + [2] * 6 + [1] * 4
    assert [i + 1 for i, lc in enumerate(layers) if lc.transition] == [7, 13]
    assert layers[6].transition == (16 + 7 * 6) // 2
    net = create_model("msdnet_cifar", num_classes=10).eval()
    state, scales = torch.zeros(1, 3, 32, 32), []
    with torch.no_grad():
        for stage in net.stages:
            state = stage(state)
            scales.append([tuple(t.shape[1:]) for t in state])
    assert [len(s) for s in scales] == [3, 3, 2, 2, 2, 1, 1]
    assert scales[0] == [(16 + 4 * 6, 32, 32), (2 * (16 + 4 * 6), 16, 16), (4 * (16 + 4 * 6), 8, 8)]
    # lin_grow: block i has step * i + 1 layers
    assert [len(b) for b in msdnet_cfg(nBlocks=5, stepmode="lin_grow", step=2, base=1).blocks] == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("kw,size", [({}, 32), ({"data": "imagenet", "grFactor": [1, 2, 4, 4],
                                                  "bnFactor": "1-2-4-4"}, 64),
                                     ({"data": "imagenet", "grFactor": [1, 2, 4, 4], "bnFactor": [1, 2, 4, 4]}, 32)])
def test_training_forward_gives_one_logit_per_block_and_trains_every_parameter(kw, size):
    net = _small(**kw).train()
    x = torch.randn(3, 1, size, size)
    outs = net(x)
    assert len(outs) == net.num_exits == 4 and all(o.shape == (3, 10) for o in outs)
    sum(torch.nn.functional.cross_entropy(o, torch.tensor([0, 1, 2])) for o in outs).backward()
    # Only the last layer's finer-scale outputs feed nothing (as in the official network, where prune="max"
    # can leave the last layer with more than one output scale; its MACs count them too).
    # A transition may follow that layer: its finer-scale convs are dead too.
    i = max(j for j, m in enumerate(net.stages[-1]) if isinstance(m, MSDLayer))
    per_scale = [m.units if isinstance(m, MSDLayer) else m.convs for m in list(net.stages[-1])[i:]]
    dead = {id(p) for mods in per_scale for u in mods[:-1] for p in u.parameters()}
    assert (len(per_scale[0]) > 1) == bool(dead)
    for name, p in net.named_parameters():
        trained = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert trained != (id(p) in dead), name


def _spread_policy(net, x):
    """Thresholds midway between two confidences of each exit, so that samples leave at different exits and no
    sample sits on a threshold (batched and single runs must take the same decision)."""
    with torch.no_grad():
        outs = net(x)
    th = []
    for k, o in enumerate(outs[:-1]):
        c = torch.softmax(o, 1).max(1).values.sort().values
        j = int(len(c) * (1 - 1 / (net.num_exits - k)))     # about 1/(exits left) leave here
        th.append(float(c[j - 1] + c[j]) / 2)
    return ExitPolicy(th)


def test_batched_infer_equals_one_sample_at_a_time():
    net = _small()
    x = torch.randn(16, 1, 32, 32)
    policy = _spread_policy(net, x)
    batched = net.infer(x, policy)
    assert len(set(batched.exit_index.tolist())) >= 3
    for i in range(len(x)):
        single = net.infer(x[i:i + 1], policy)
        assert int(single.exit_index) == int(batched.exit_index[i])
        assert int(single.macs) == int(batched.macs[i])
        torch.testing.assert_close(single.logits[0], batched.logits[i], rtol=1e-4, atol=1e-5)
    # and each sample left with the logits of the exit it took, in the training-mode forward too
    with torch.no_grad():
        outs = torch.stack(net(x))
    torch.testing.assert_close(batched.logits, outs[batched.exit_index, torch.arange(len(x))], rtol=1e-4,
                               atol=1e-5)


def test_ledger_equals_flop_counter_and_each_exit_costs_its_exit_macs():
    net = _small(data="imagenet", grFactor=[1, 2, 4, 4], bnFactor=[1, 2, 4, 4])
    x = torch.randn(12, 1, 64, 64)
    exit_macs = net.exit_macs(x)
    assert exit_macs == sorted(exit_macs) and len(set(exit_macs)) == len(exit_macs)
    policy = _spread_policy(net, x)
    with FlopCounterMode(display=False) as counter:
        res = net.infer(x, policy)
    assert len(set(res.exit_index.tolist())) >= 3
    assert int(res.macs.sum()) == counter.get_total_flops() // 2
    assert res.macs.tolist() == [exit_macs[int(k)] for k in res.exit_index]


def test_extreme_policies():
    net = _small()
    x = torch.randn(5, 1, 32, 32)
    exit_macs = net.exit_macs(x)
    first = net.infer(x, [-math.inf] * (net.num_exits - 1))
    assert first.exit_index.tolist() == [0] * 5 and first.macs.tolist() == [exit_macs[0]] * 5
    last = net.infer(x)
    assert last.exit_index.tolist() == [net.num_exits - 1] * 5 and last.macs.tolist() == [exit_macs[-1]] * 5
    with torch.no_grad():
        torch.testing.assert_close(last.logits, net(x)[-1], rtol=1e-4, atol=1e-5)


def test_config_strings_and_checkpoint_spec():
    a = create_model("msdnet_cifar", **{**SMALL, "grFactor": "1-2-4", "bnFactor": "1-2-4"})
    b = create_model("msdnet_cifar", **SMALL)
    assert a.cfg == b.cfg
    assert a.dyncnn_spec["name"] == "msdnet_cifar" and a.dyncnn_spec["cfg"]["nBlocks"] == 4


@pytest.mark.parametrize("kw,match", [
    ({"grFactor": [1, 2, 4], "bnFactor": [1, 2]}, "same length"),
    ({"stepmode": "linear"}, "even.*lin_grow"),
    ({"prune": "mid"}, "max.*min"),
    ({"data": "svhn"}, "cifar.*imagenet"),
    ({"nScales": 4}, "len\\(grFactor\\) = 3"),
    ({"growthRate": 5, "grFactor": [1, 1, 2], "bnFactor": [1, 1, 2]}, "even"),
    ({"grFactor": [1, 0, 4]}, "positive"),
    ({"grFactor": "1-x-4"}, "1-2-4"),
    ({"nBlocks": 0}, "nBlocks"),
    ({"reduction": 1.5}, "reduction"),
])
def test_bad_config_raises_naming_supported_values(kw, match):
    with pytest.raises(ValueError, match=match):
        create_model("msdnet_cifar", **kw)


def test_bad_input_is_refused():
    net = _small(data="imagenet", grFactor=[1, 2, 4, 4], bnFactor=[1, 2, 4, 4])
    with pytest.raises(ValueError, match="at least 32x32"):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="1 input channels"):
        net(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="1 input channels"):
        net.infer(torch.randn(1, 3, 32, 32))
