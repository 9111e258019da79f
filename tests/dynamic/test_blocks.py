"""The block protocol the runtime reads (dyncnn.dynamic.blocks) and the model protocols of dyncnn.dynamic.protocols:
each block's published description reproduces its own forward, and the protocols sort the families as the
callers (trainer, export, evaluation, calibration) expect."""
import pytest
import torch

import dyncnn
from dyncnn.dynamic import (AuxLoss, DynamicModel, EarlyExitModel, HasExits, ProgressAware, ResidualBranchBlock,
                            is_gated)


@pytest.mark.parametrize("name,cfg", [("resnet20_cifar", {}), ("resnet50", {"width_mult": 0.25}),
                                      ("mobilenet_v2", {"width_mult": 0.25}),
                                      ("mobilenet_v3_small", {"width_mult": 0.5})])
def test_blocks_describe_their_own_forward(name, cfg):
    torch.manual_seed(0)
    try:
        net = dyncnn.create_model(name, num_classes=10, **cfg).eval()
    except TypeError:
        pytest.skip(f"{name} takes no width_mult")
    checked = plain = 0
    x0 = torch.randn(2, 3, 32, 32)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0]))
             for m in net.modules() if isinstance(m, ResidualBranchBlock)]
    with torch.no_grad():
        net(x0)
    for h in hooks:
        h.remove()
    assert inputs, f"{name} has no block that describes its branch"
    for block, x in inputs.items():
        with torch.no_grad():
            want = block(x)
            if block.plain_branch:
                plain += 1
                y = x
                for unit in block.branch_units():
                    y = unit(y)
                torch.testing.assert_close(block.merge(x, y), want)
                post = block.post_act
                if block.identity_skip:       # merge == post(branch + x): what DynConv's sparse path computes
                    out = y + x
                    torch.testing.assert_close(post(out) if post is not None else out, want)
            assert not block.channel_gateable or (block.plain_branch and len(block.branch_units()) >= 2)
            checked += 1
    assert checked == len(inputs) and plain > 0


def test_protocols_sort_the_families():
    exits = dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", backbone_cfg={"widths": [8, 16, 32]},
                                num_classes=10, in_chans=1, example_size=32)
    gated = dyncnn.create_model("skipnet_resnet20_cifar")
    routing = dyncnn.create_model("routing_supernet_tiny")
    static = dyncnn.create_model("resnet20_cifar")
    assert all(isinstance(exits, p) for p in (EarlyExitModel, HasExits, DynamicModel))
    assert not is_gated(exits) and is_gated(gated) and is_gated(routing)
    assert not isinstance(static, (DynamicModel, EarlyExitModel)) and not is_gated(static)
    assert isinstance(routing, AuxLoss) and isinstance(routing, ProgressAware)
    assert not isinstance(static, AuxLoss)


@pytest.mark.parametrize("name,value", [("skipnet_resnet20_cifar", True), ("channel_gated_resnet14_tiny", True),
                                        ("dynconv_tiny_resnet_mnist", True), ("moe_resnet_tiny", 0),
                                        ("routing_supernet_tiny", 0)])
def test_one_way_to_force_decisions(name, value):
    from dyncnn.dynamic import Forceable, forced
    torch.manual_seed(0)
    model = dyncnn.create_model(name).eval()
    assert isinstance(model, Forceable)
    chans = 3 if name.startswith("skipnet") else 1
    x = torch.randn(4, chans, 32, 32) * torch.linspace(0.2, 3, 4).view(-1, 1, 1, 1)
    free = model.infer(x)
    with forced(model, value):
        pinned = model.infer(x)
    if value is True:                 # every decision on, the same cost for every sample, at most the whole network
        assert (pinned.choices == 1).all() and len(set(pinned.macs.tolist())) == 1
        assert (pinned.macs <= model.full_macs(x[:1])).all()
        assert pinned.fractions is None or (pinned.fractions == 1).all()
    elif name.startswith("moe"):      # every sample of every MoE layer on expert `value`
        per = pinned.choices.view(4, -1, model.moe_layers()[0].num_experts)
        assert (per[:, :, value] == 1).all() and per.sum() == per[:, :, value].sum()
    else:                             # every cell on path `value`
        assert (model.paths_taken(pinned) == value).all()
    again = model.infer(x)            # the context manager let the model decide again
    assert torch.equal(again.macs, free.macs) and torch.equal(again.logits, free.logits)
    with pytest.raises(ValueError):
        model.force("on")
