"""The fused cascade: a cascade's members as the stages of one network whose exits add the earlier stages'
log-probabilities and whose laterals read the previous stage's features; exited samples never run the later
stages, untrained laterals change nothing, and training touches only the laterals."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dyncnn
from dyncnn.dynamic import ExitPolicy
from dyncnn.errors import DyncnnError
from dyncnn.models.fused_cascade import LATERALS, FusedCascade

MEMBERS = [{"name": "resized", "factor": 2, "backbone_cfg": {"widths": [8, 16, 32]}},
           {"name": "tiny_mobilenet", "widths": [8, 16, 32]},
           {"name": "mobilenet_v3_small", "width_mult": 0.5}]


def _net(laterals="pooled", members=MEMBERS, **kw) -> FusedCascade:
    torch.manual_seed(0)
    return dyncnn.create_model("fused_cascade", members=members, laterals=laterals, num_classes=10, in_chans=1,
                               **kw).eval()


def _x(n=12, side=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, side, side, generator=g) * torch.linspace(0.3, 2.0, n).view(n, 1, 1, 1)


def _perturb(net):
    """Non-zero laterals (trained ones are): the fused network then differs from its members' committee."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".member." not in name:
                p.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("laterals", LATERALS)
def test_untrained_laterals_give_the_members_committee(laterals):
    """Exit k is the sum of the members' log-probabilities up to k, computed by the members themselves."""
    net = _net(laterals)
    x = _x(5)
    with torch.no_grad():
        outs = net(x)
        want, total = [], 0
        for m in net.members():
            total = total + F.log_softmax(m(x), 1)
            want.append(total)
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref)


def test_laterals_cost_what_a_hand_count_says():
    """pooled: a Linear of the previous stage's pooled features per later exit (its features x 10 MACs);
    deepest: one 1x1 conv at the deepest output stride both stages share."""
    x = _x(1)
    none, pooled, deepest = (_net(lat).exit_macs(x) for lat in ("none", "pooled", "deepest"))
    assert none[0] == pooled[0] == deepest[0]
    # stage 1 reads stage 0's pooled 32 features, stage 2 stage 1's 32 (tiny widths [8, 16, 32])
    assert pooled[1] - none[1] == 32 * 10 and pooled[2] - none[2] == 2 * 32 * 10
    # tiny /2 (strides 4, 8, 16) and tiny (2, 4, 8) share 4 and 8; at 8 (4x4 pixels of a 32x32 input) tiny /2
    # has 16 channels, tiny 32
    assert deepest[1] - none[1] == 4 * 4 * 16 * 32


def test_an_exited_sample_never_runs_the_later_stages(check_later_stages_skipped):
    net = _perturb(_net())
    check_later_stages_skipped(net, _x())


@pytest.mark.parametrize("laterals", ["pooled", "deepest"])
def test_training_moves_only_the_laterals(laterals):
    """Frozen members keep their weights and BatchNorm statistics through a training step; the laterals learn."""
    net = _net(laterals, imta={"gradient_equilibrium": False, "forward_transfer": False, "distill": 0.0}).train()
    before = copy.deepcopy(net.state_dict())
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".member." not in n for n in trainable)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x, y = _x(8), torch.arange(8) % 10
    for _ in range(2):
        loss = net.training_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and moved == {k for k in trainable}          # running stats included: none of the members moved
    assert all(not m.training for m in net.members())


def test_load_members_copies_trained_weights_and_refuses_others():
    net = _net()
    torch.manual_seed(3)
    trained = [dyncnn.create_model(**{**m, "num_classes": 10, "in_chans": 1}) for m in MEMBERS]
    net.load_members(trained)
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], F.log_softmax(trained[0].eval()(x), 1))
    with pytest.raises(ValueError, match="expected 3 members"):
        net.load_members(trained[:2])
    with pytest.raises(ValueError, match="member 1's weights do not fit"):
        net.load_members([trained[0], trained[2], trained[1]])


@pytest.mark.parametrize("cfg, match", [
    ({"members": MEMBERS[:1]}, "at least two members"),
    ({"laterals": "every"}, "laterals must be one of"),
    ({"members": [MEMBERS[0], {"name": "msdnet_cifar"}]}, "stem, `stages`"),
    ({"members": [MEMBERS[0], "tiny_mobilenet"]}, "dict with a registered 'name'"),
    # a backbone whose features are not stem -> stages -> conv_head (DenseNet's final normalization)
    ({"members": [MEMBERS[0], {"name": "densenet121"}]}, "forward_features computes something else"),
])
def test_bad_config_says_what_is_expected(cfg, match):
    with pytest.raises(ValueError, match=match):
        dyncnn.create_model("fused_cascade", **cfg)


def test_input_side_must_line_up_the_fused_maps():
    net = _net("deepest")
    with pytest.raises(DyncnnError, match="multiples of 8"):
        net.infer(torch.randn(1, 1, 36, 36))


@pytest.mark.parametrize("laterals", ["pooled", "deepest"])
def test_bundle_decides_as_eager(tmp_path, laterals):
    from dyncnn.export import export_bundle, load_bundle
    net = _perturb(_net(laterals))
    x = _x(8)
    policy = ExitPolicy([0.3, 0.3])
    export_bundle(net, tmp_path / "b", (1, 32, 32), policy=policy)
    got, want = load_bundle(tmp_path / "b").run(x.numpy()), net.infer(x, policy)
    assert got.exit_index.tolist() == want.exit_index.tolist()
    torch.testing.assert_close(torch.as_tensor(got.logits), want.logits, rtol=1e-4, atol=1e-4)
    assert got.macs.tolist() == want.macs.tolist()
