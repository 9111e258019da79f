import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic.executor import CostLedger, Executor, measure_macs
from dyncnn.layers import ConvNormAct
from dyncnn.layers.moe import ConvMoE, MoEConfig, capacity_keep
from dyncnn.models import create_model
from dyncnn.models.mobilenet import mobilenet_v2
from dyncnn.models.moe import MoENetwork, backbone_units
from dyncnn.models.resnet import resnet_cifar


def make_moe(num_experts=4, top_k=2, chs=8, shortcut=True, **cfg) -> ConvMoE:
    """Experts of different widths, so that a sample's cost depends on the experts it used."""
    experts = [nn.Sequential(ConvNormAct(chs, 4 * (e + 1), 1), ConvNormAct(4 * (e + 1), chs, 3, activation_layer=None))
               for e in range(num_experts)]
    moe = ConvMoE(experts, chs, MoEConfig(num_experts, top_k, **cfg), shortcut=nn.Identity() if shortcut else None)
    nn.init.normal_(moe.router.fc.weight, 0.0, 2.0)     # a router that sends different samples to different experts
    return moe.eval()


def flop_macs(fn, *args):
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops() // 2


def dense_reference(moe: ConvMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every sample, weighted by the top-k mask (computed here, independently of ConvMoE)."""
    logits = moe.router.fc(x.mean((2, 3)))
    top, idx = logits.topk(moe.cfg.top_k, dim=1)
    w = top.softmax(1) if moe.cfg.renormalized else logits.softmax(1).gather(1, idx)
    mask = torch.zeros_like(logits).scatter(1, idx, w)
    out = x.clone() if moe.shortcut is not None else 0
    for e, expert in enumerate(moe.experts):
        out = out + mask[:, e, None, None, None] * expert(x)
    return out


@pytest.mark.parametrize("top_k,renormalize", [(1, None), (2, None), (2, False), (4, None)])
def test_dispatch_equals_the_dense_masked_reference(top_k, renormalize):
    moe = make_moe(top_k=top_k, renormalize=renormalize)
    x = torch.randn(12, 8, 6, 6)
    out, routing = moe.dispatch(x)
    assert torch.allclose(out, dense_reference(moe, x), atol=1e-5)
    assert torch.allclose(moe.dense(x), out, atol=1e-5)
    assert len(set(routing.experts[:, 0].tolist())) > 1          # the test exercises several experts
    assert routing.used(4).sum(1).tolist() == [top_k] * 12


def test_each_expert_runs_only_on_its_samples_and_the_ledger_matches_flop_counter():
    moe = make_moe(top_k=2)
    x = torch.randn(10, 8, 6, 6)
    ex, ledger = Executor(), CostLedger(10)
    rows = torch.arange(10)
    (out, routing), counted = flop_macs(moe.dispatch, x, ex, rows, ledger)
    assert ledger.total == counted
    router = measure_macs(moe.router, x)
    expert_macs = torch.tensor([measure_macs(e, x) for e in moe.experts])
    assert len(set(expert_macs.tolist())) == 4
    used = routing.used(4)
    assert torch.equal(ledger.macs, router + (used.long() * expert_macs).sum(1))
    dense_macs = flop_macs(moe.dense, x)[1]
    assert counted < dense_macs                                  # half the experts per sample did not run
    assert dense_macs == 10 * (router + int(expert_macs.sum()))


def test_batched_equals_per_sample_without_capacity():
    moe = make_moe(top_k=2)
    x = torch.randn(9, 8, 5, 5)
    batched = moe(x)
    single = torch.cat([moe(x[i:i + 1]) for i in range(9)])
    assert torch.allclose(batched, single, atol=1e-6)


def routed_by_sign(num_experts=2, **cfg) -> ConvMoE:
    """A router whose choice we control: expert 0 when channel 0 is positive on average, else expert 1."""
    moe = make_moe(num_experts=num_experts, top_k=1, **cfg)
    with torch.no_grad():
        moe.router.fc.weight.zero_()
        moe.router.fc.bias.zero_()
        moe.router.fc.weight[0, 0] = 10.0
    return moe


def test_capacity_drops_exactly_the_overflow_and_makes_results_batch_dependent():
    moe = routed_by_sign(capacity_factor=1.0)            # capacity ceil(1.0 * 1 * 8 / 2) = 4 per expert
    free = copy.deepcopy(moe)
    free.cfg = MoEConfig(2, 1)
    x = torch.randn(8, 8, 4, 4)
    to_zero = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)   # 6 samples want expert 0
    x[:, 0] = torch.where(to_zero[:, None, None], x[:, 0].abs() + 0.1, -x[:, 0].abs() - 0.1)
    ex, ledger = Executor(), CostLedger(8)
    out, routing = moe.dispatch(x, ex, torch.arange(8), ledger)
    assert moe.cfg.capacity(8) == 4
    dropped = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)  # the 5th and 6th requests for expert 0
    assert torch.equal(~routing.kept[:, 0], dropped)
    assert torch.equal(out[dropped], x[dropped])                        # shortcut only, no expert
    reference = free(x)
    assert torch.allclose(out[~dropped], reference[~dropped], atol=1e-6)
    assert not torch.allclose(out[dropped], reference[dropped], atol=1e-3)
    router = measure_macs(moe.router, x)
    assert ledger.macs[dropped].tolist() == [router, router]           # dropped samples pay only the router
    # Per sample, nobody overflows: the result of a dropped sample depends on its batch.
    alone = torch.cat([moe(x[i:i + 1]) for i in range(8)])
    assert torch.allclose(alone, reference, atol=1e-6)


def test_capacity_serves_first_choices_before_second_choices():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    keep = capacity_keep(experts, 2, capacity=2)
    # expert 0: first choices of samples 0, 2, 3 -> 0 and 2 fit; sample 1's second choice comes last -> dropped
    # expert 1: first choice of sample 1, then second choices of 0, 2, 3 -> only sample 0's fits
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, False]]
    assert capacity_keep(experts, 2, None).all()
    assert MoEConfig(4, 2, capacity_factor=1.25).capacity(10) == math.ceil(1.25 * 2 * 10 / 4)


@pytest.mark.parametrize("top_k,renormalize", [(2, None), (1, None)])
def test_gradients_reach_router_and_experts(top_k, renormalize):
    moe = make_moe(top_k=top_k, renormalize=renormalize).train()
    x = torch.randn(16, 8, 5, 5)
    out = moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.item() >= 1.0 - 1e-5   # Switch loss is >= 1
    (out.square().mean() + moe.aux_loss).backward()
    assert moe.router.fc.weight.grad.abs().sum() > 0
    assert moe.noise.weight.grad is not None
    for e, expert in enumerate(moe.experts):
        grad = expert[0][0].weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"expert {e} got no gradient"


def test_task_gradient_alone_reaches_the_router_in_every_gate_form():
    for top_k, st in ((1, False), (2, False), (1, True)):
        moe = make_moe(top_k=top_k, straight_through=st).train()
        moe(torch.randn(8, 8, 4, 4)).square().mean().backward()
        assert moe.router.fc.weight.grad.abs().sum() > 0


def test_straight_through_gate_keeps_the_renormalised_forward_weights():
    moe = make_moe(top_k=1, straight_through=True)
    routing = moe.route(torch.randn(5, 8, 4, 4))
    assert torch.equal(routing.weights, torch.ones(5, 1))


def test_importance_loss_is_zero_when_balanced_and_positive_otherwise():
    moe = make_moe(num_experts=2, top_k=2, balance="importance", renormalize=True)
    nn.init.zeros_(moe.router.fc.weight)                              # equal logits: weight 1/2 each
    x = torch.randn(6, 8, 4, 4)
    assert moe.balance_loss(moe.route(x)) < 1e-10                     # equal importance per expert
    moe1 = routed_by_sign(balance="importance")
    x[:, 0] = x[:, 0].abs() + 0.1                                     # everyone to expert 0
    assert moe1.balance_loss(moe1.route(x)) > 0.5


def test_every_expert_a_copy_of_the_block_with_weights_summing_to_one_equals_the_block():
    torch.manual_seed(1)
    backbone = resnet_cifar(8, in_chans=1, width_mult=0.5)
    x = torch.randn(3, 1, 32, 32)
    calibrate_norms(backbone, x.shape)
    static = backbone(x)
    assert static.abs().max() > 0.1
    blocks = [p for p, _ in backbone_units(backbone) if p.startswith("stages.")]
    for cfg, exact in [(MoEConfig(1, 1), True), (MoEConfig(3, 1, straight_through=True), True),
                       (MoEConfig(3, 3), False), (MoEConfig(3, 2, renormalize=True), False)]:
        model = MoENetwork(copy.deepcopy(backbone), blocks, cfg, upcycle=True).eval()
        for m in model.moe_layers():
            nn.init.normal_(m.router.fc.weight, 0.0, 1.0)
        logits = model.infer(x).logits
        assert torch.equal(logits, static) if exact else torch.allclose(logits, static, atol=1e-4, rtol=1e-4)


def calibrate_norms(model: nn.Module, shape) -> None:
    """Running statistics of one random batch, so that eval-mode activations keep their scale."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape[1:]))
    model.eval()


@pytest.mark.parametrize("family", ["resnet", "mobilenet"])
def test_forced_expert_equals_the_static_backbone_exactly(family):
    torch.manual_seed(2)
    if family == "resnet":
        backbone, stages, x = resnet_cifar(8, in_chans=1, width_mult=0.5), (1, 2), torch.randn(2, 1, 32, 32)
    else:
        backbone, stages, x = mobilenet_v2(num_classes=10, width_mult=0.35), (4, 5, 6), torch.randn(2, 3, 32, 32)
    head = backbone.fc if family == "resnet" else backbone.classifier
    nn.init.normal_(head.weight, 0.0, 1.0)      # logits of order 1, so that the comparisons below mean something
    calibrate_norms(backbone, x.shape)
    blocks = [p for p, _ in backbone_units(backbone) if p.startswith("stages.") and int(p.split(".")[1]) in stages]
    # capacity 0.5 would drop samples of a learned routing; a forced expert takes every sample
    model = MoENetwork(copy.deepcopy(backbone), blocks, MoEConfig(4, 2, capacity_factor=0.5), upcycle=True).eval()
    model.force(3)
    assert torch.equal(model.infer(x).logits, backbone(x))
    assert model.infer(x).choices.view(2, -1, 4)[:, :, 3].all()
    model.force(None)
    fresh = MoENetwork(copy.deepcopy(backbone), blocks, MoEConfig(4, 1), upcycle=False).eval()
    fresh.force(0)
    static = backbone(x)
    assert static.abs().max() > 1e-2
    gap = (fresh.infer(x).logits - static).abs().max()
    assert gap > 1e-2 * static.abs().max()                          # non-upcycled experts have their own weights


def test_upcycled_top1_straight_through_equals_the_backbone_and_slims_narrow_experts():
    """Fine-tuning from a trained backbone (the fix for MoE's accuracy) starts exactly at the backbone: top-1 with the
    straight-through gate has forward weight 1, so any learned routing over copies of a block is that block."""
    torch.manual_seed(4)
    backbone = resnet_cifar(8, in_chans=1, width_mult=0.5)
    x = torch.randn(6, 1, 32, 32) * torch.linspace(0.2, 4, 6).view(-1, 1, 1, 1)
    x = x + torch.linspace(2, -2, 6).view(-1, 1, 1, 1)                         # routers disagree between samples
    nn.init.normal_(backbone.fc.weight, 0.0, 1.0)
    calibrate_norms(backbone, x.shape)
    blocks = [p for p, _ in backbone_units(backbone) if p.startswith("stages.") and int(p.split(".")[1]) >= 1]
    model = MoENetwork(copy.deepcopy(backbone), blocks, MoEConfig(4, 1, straight_through=True), upcycle=True).eval()
    randomise_routers(model)
    result = model.infer(x)
    assert result.choices.view(6, -1, 4).sum(0).gt(0).sum() > len(blocks)     # samples spread over experts
    assert torch.allclose(result.logits, backbone(x), atol=1e-5, rtol=1e-5)
    half = MoENetwork(copy.deepcopy(backbone), blocks, MoEConfig(4, 1), expert_ratio=0.5, upcycle=True)
    block = dict(backbone_units(backbone))[blocks[0]]
    expert = half.moe_layers()[0].experts[2]
    conv1, conv2 = expert[0][0].weight, expert[1][0].weight
    assert conv1.shape[0] == block.branch[0][0].weight.shape[0] // 2
    assert torch.equal(conv1, block.branch[0][0].weight[:conv1.shape[0]])
    assert torch.equal(conv2, block.branch[1][0].weight[:, :conv2.shape[1]])
    assert torch.equal(expert[1][1].running_var, block.branch[1][1].running_var)


def randomise_routers(model: MoENetwork) -> None:
    for m in model.moe_layers():
        nn.init.normal_(m.router.fc.weight, 0.0, 3.0)


def test_model_infer_batched_equals_per_sample_and_ledger_equals_flop_counter():
    model = create_model("moe_resnet_tiny", top_k=2).eval()
    randomise_routers(model)
    x = torch.rand(6, 1, 32, 32)
    result, counted = flop_macs(model.infer, x)
    assert result.macs.sum().item() == counted
    assert result.choices.shape == (6, len(model.decision_names))
    assert len({tuple(c) for c in result.choices.tolist()}) > 1      # samples took different experts
    assert (result.exit_index == result.choices.sum(1)).all()
    for i in range(6):
        one = model.infer(x[i:i + 1])
        assert torch.allclose(one.logits, result.logits[i:i + 1], atol=1e-5, rtol=1e-5)
        assert one.macs.item() == result.macs[i].item()
        assert torch.equal(one.choices[0], result.choices[i])
    assert torch.allclose(model(x), result.logits)                  # eval forward = infer().logits
    full = model.full_macs(x)
    assert (result.macs < full).all()
    assert full == flop_macs(model.forward_dense, x[:1])[1]


def test_model_trains_with_balance_loss_and_gradients():
    model = create_model("moe_resnet_tiny", top_k=1, balance_weight=0.1).train()
    assert model.regularization_loss().item() == 0.0
    logits = model(torch.rand(8, 1, 32, 32))
    reg = model.regularization_loss()
    assert reg.item() >= 0.1 * len(model.moe_layers()) * (1 - 1e-5)
    (nn.functional.cross_entropy(logits, torch.arange(8) % 10) + reg).backward()
    for m in model.moe_layers():
        assert m.router.fc.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.experts.parameters())


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match=r"num_experts must be an integer >= 1"):
        MoEConfig(0, 1)
    with pytest.raises(ValueError, match=r"top_k must be an integer in 1\.\.4"):
        MoEConfig(4, 5)
    with pytest.raises(ValueError, match=r"top_k must be an integer in 1\.\.4"):
        create_model("moe_resnet_tiny", num_experts=4, top_k=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(4, 1, capacity_factor=0)
    with pytest.raises(ValueError, match="balance must be one of"):
        MoEConfig(4, 1, balance="gshard")
    with pytest.raises(ValueError, match="3 experts were given"):
        ConvMoE([nn.Identity()] * 3, 8, MoEConfig(4, 1))
    with pytest.raises(ValueError, match=r"stages\.9\.0.*available: stages\.0\.0"):
        create_model("moe_resnet_tiny", moe_blocks=["stages.9.0"])
    with pytest.raises(ValueError, match=r"expert index in 0\.\.3"):
        create_model("moe_resnet_tiny").force(4)
    with pytest.raises(ValueError, match="input channels"):
        create_model("moe_resnet_tiny").eval().infer(torch.rand(1, 3, 32, 32))
