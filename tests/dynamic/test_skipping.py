"""Layer skipping (SkipNet gates, BlockDrop policy) executed for real: batched == per-sample, the ledger equals
FlopCounterMode, all-on reproduces the static backbone, gradients reach gates / policy, bad inputs are refused."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic.skipping import backbone_parts, is_skippable, resolve_gated_blocks
from dyncnn.models import create_model
from dyncnn.models.blockdrop import BlockDrop, BlockDropConfig
from dyncnn.models.mobilenet import mobilenet_v2
from dyncnn.models.resnet import resnet_cifar
from dyncnn.models.skipnet import SkipNet, SkipNetConfig
from dyncnn.train.recipes import fit_model
from dyncnn.train.recipes.skipnet import reinforce_finetune
from dyncnn.models.tiny import TinyMobileNet


def _spread(model: nn.Module) -> nn.Module:
    """Make the gate / policy logits large and of both signs, so that decisions are mixed and far from the
    threshold (batched and per-sample arithmetic then take the same decisions)."""
    torch.manual_seed(1)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in (1, model.num_gated)
             and m is not getattr(model.backbone, "fc", None)]
    for m in heads:
        nn.init.normal_(m.weight, 0.0, 3.0)
        nn.init.normal_(m.bias, 0.0, 1.0)
    for m in getattr(getattr(model, "gates", None), "embed", []):    # recurrent gate: varied hidden states
        nn.init.normal_(m.weight, 0.0, 3.0)
    return model.eval()


def _resnet_skipnet(gate="feedforward", hidden=0):
    torch.manual_seed(0)
    return _spread(SkipNet(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25),
                           SkipNetConfig(gate=gate, gate_hidden=hidden)))


def _mobilenet_skipnet():
    torch.manual_seed(0)
    return _spread(SkipNet(mobilenet_v2(num_classes=10, in_chans=3, width_mult=0.25)))


def _blockdrop():
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4))   # sees the 16x16 half-resolution image
    model = BlockDrop(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25), policy=policy)
    nn.init.normal_(policy[1].weight, 0.0, 0.3)
    return model.eval()


BUILDERS = {"skipnet_ff": (_resnet_skipnet, 1), "skipnet_rnn": (lambda: _resnet_skipnet("recurrent"), 1),
            "skipnet_mlp": (lambda: _resnet_skipnet(hidden=8), 1),
            "skipnet_mbv2": (_mobilenet_skipnet, 3), "blockdrop": (_blockdrop, 1)}


def _x(chans, n=6):
    return torch.randn(n, chans, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_batched_equals_per_sample_and_ledger_equals_flop_counter(name):
    build, chans = BUILDERS[name]
    model, x = build(), _x(chans)
    with FlopCounterMode(display=False) as counter:
        r = model.infer(x)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    rate = r.choices.float().mean()
    assert 0 < rate < 1, "the test needs mixed decisions"
    for i in range(len(x)):
        one = model.infer(x[i:i + 1])
        torch.testing.assert_close(one.logits, r.logits[i:i + 1], rtol=1e-4, atol=1e-5)
        assert torch.equal(one.choices, r.choices[i:i + 1])
        assert int(one.macs) == int(r.macs[i]) and int(one.exit_index) == int(r.exit_index[i])
    # per-sample MACs are what ran: fixed parts + the decision machinery + the blocks taken
    fixed, block_macs, decision = model.cost_table(x)
    expected = fixed + decision + r.choices.float() @ block_macs
    assert torch.equal(r.macs, expected.long())
    assert torch.equal(r.exit_index, r.choices.sum(1) + len(model._blocks) - model.num_gated)
    # eval-mode forward is the executed path
    assert torch.equal(model(x), r.logits)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_all_on_reproduces_static_backbone(name):
    build, chans = BUILDERS[name]
    model, x = build(), _x(chans)
    torch.manual_seed(5)
    static = (resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25) if chans == 1
              else mobilenet_v2(num_classes=10, width_mult=0.25)).eval()
    model.backbone.load_state_dict(static.state_dict())
    model.force(True)
    with FlopCounterMode(display=False) as counter:
        r = model.infer(x)
    assert torch.equal(r.logits, static(x))
    assert bool((r.choices == 1).all())
    assert int(r.macs[0]) == model.static_macs(x) == counter.get_total_flops() // 2 // len(x)
    assert model.full_macs(x) > model.static_macs(x)      # the gates / policy cost something
    model.force(False)                               # every gated block skipped: only fixed parts run
    fixed, _, _ = model.cost_table(x)
    assert bool((model.infer(x).macs == fixed).all())


def test_skipnet_gradients_reach_gates_and_budget_loss_pulls_towards_budget():
    torch.manual_seed(0)
    model = SkipNet(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25), SkipNetConfig(budget=0.3))
    model.train()
    x, y = _x(1, 8), torch.randint(0, 10, (8,))
    model.set_progress(0.5)
    assert model.hard.tau == pytest.approx((1.0 * 0.3) ** 0.5)
    out = model(x)
    reg = model.regularization_loss()
    assert float(reg.detach()) > 0                                  # gates start on: fraction ~1 > budget 0.3
    reg.backward()
    for gate in model.gates:
        assert gate.fc.bias.grad is not None and float(gate.fc.bias.grad) > 0   # pushes the gate towards off
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert sum(float(g.fc.weight.grad.abs().sum()) for g in model.gates) > 0
    assert out.shape == (8, 10)


def test_recurrent_gate_gradients():
    model = _resnet_skipnet("recurrent").train()
    out = model(_x(1, 4))
    (out.sum() + model.regularization_loss()).backward()
    assert float(model.gates.cell.weight_ih.grad.abs().sum()) > 0


def test_blockdrop_reinforce_reaches_policy_only_and_curriculum():
    model = _blockdrop().train()
    x = _x(1, 16)
    with torch.no_grad():
        y = model.backbone(x).argmax(1)                 # targets the full backbone gets right: rewards differ
    model.set_progress(0.0)
    assert model._free == 1
    model.set_progress(1.0)
    assert model._free == model.num_gated
    torch.manual_seed(0)
    out = model(x)
    loss = model.training_loss(out, y)
    loss.backward()
    assert float(model.policy[1].weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.backbone.parameters())   # frozen backbone
    assert not model.backbone.training                                  # keeps its BN statistics
    # curriculum: with one free block, the others are forced on in training
    model.set_progress(0.0)
    model(x)
    actions = model._saved[1]
    assert bool((actions[:, :-1] == 1).all())


def test_blockdrop_budget_loss_and_finetune_backbone():
    torch.manual_seed(0)
    model = BlockDrop(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25),
                      BlockDropConfig(budget=0.5, finetune_backbone=True, policy_widths=(8, 8))).train()
    x, y = _x(1, 8), torch.randint(0, 10, (8,))
    out = model(x)
    (model.training_loss(out, y) + model.regularization_loss()).backward()
    assert float(model.policy.fc.bias.grad.abs().sum()) > 0
    assert float(model.backbone.fc.weight.grad.abs().sum()) > 0


def test_skipnet_reinforce_finetune_updates_gates():
    model = _resnet_skipnet()
    data = TensorDataset(_x(1, 16), torch.randint(0, 10, (16,)))
    before = [p.detach().clone() for p in model.gates.parameters()]
    hist = reinforce_finetune(model, data, steps=2, batch_size=8, finetune_backbone=False)
    assert len(hist) == 2 and all(0 < h["macs_fraction"] <= 1 for h in hist)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.gates.parameters()))
    assert not model.training


def test_trainer_runs_gated_models():
    """The Trainer trains what each gated model learns (SkipNet: gates and backbone; BlockDrop's policy phase: the
    policy only, the backbone frozen), and the accuracy it reports is that of the executed ``infer``."""
    from dyncnn.train.trainer import TrainConfig, Trainer
    x, y = _x(1, 16), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(4))
    data = TensorDataset(x, y)
    learns = {"skipnet_resnet20_cifar": ("gates.", "backbone."), "blockdrop_resnet20_cifar": ("policy.",)}
    for name, trained in learns.items():
        model = create_model(name, in_chans=1, width_mult=0.25, budget=0.5)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        res = Trainer(model, data, data, TrainConfig(epochs=1, batch_size=8, lr=0.1, progress=False)).fit()
        assert res.steps == 2
        changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
        for prefix in trained:
            assert any(k.startswith(prefix) for k in changed), (name, prefix)
        assert all(k.startswith(trained) for k in changed), (name, sorted(changed)[:3])
        r = model.eval().infer(x)
        assert res.final_val_acc == pytest.approx(float((r.logits.argmax(1) == y).double().mean()))
        assert res.history[-1]["val_acc"] == res.final_val_acc


def test_skippable_blocks_and_names():
    net = resnet_cifar(14, width_mult=0.25)
    _, blocks, names, _ = backbone_parts(net)
    assert [is_skippable(b) for b in blocks] == [b.stride == 1 and b.in_chs == b.out_chs for b in blocks]
    model = SkipNet(net)
    assert model.decision_names == [names[i] for i in model.gated]
    mb = mobilenet_v2(width_mult=0.25)
    _, mblocks, _, _ = backbone_parts(mb)
    assert resolve_gated_blocks(mblocks, None) == [i for i, b in enumerate(mblocks) if b.has_skip]


def test_bad_inputs():
    net = resnet_cifar(14, in_chans=1, width_mult=0.25)   # blocks 0..5; 2 and 4 change shape
    for budget in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            SkipNetConfig(budget=budget)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            BlockDropConfig(budget=budget)
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.5"):
        SkipNet(net, SkipNetConfig(gated_blocks=(1, 9)))
    with pytest.raises(ValueError, match=r"skippable blocks are \[0, 1, 3, 5\]"):
        BlockDrop(net, BlockDropConfig(gated_blocks=(2,)))
    with pytest.raises(ValueError, match="feedforward"):
        SkipNetConfig(gate="lstm")
    with pytest.raises(ValueError, match="ResNet"):
        SkipNet(TinyMobileNet())
    with pytest.raises(ValueError, match="budget"):
        create_model("skipnet_resnet20_cifar", budget=2.0)
    model = SkipNet(net, SkipNetConfig(gated_blocks=(1, 3)))
    assert model.gated == [1, 3]
    with pytest.raises(ValueError, match="True, False or None"):
        model.force("on")
    with pytest.raises(ValueError, match="1 input channels"):
        model.infer(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="finite"):
        model.infer(torch.full((1, 1, 32, 32), float("nan")))


def test_noise_free_straight_through_gates_follow_the_threshold_and_get_gradients():
    torch.manual_seed(0)
    model = _spread(SkipNet(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25),
                            SkipNetConfig(gate_noise=False))).train()
    x = _x(1, 6)
    logits_of, seen = model.gate_logits(), []

    def decide(j, h):
        logit = logits_of(j, h)
        g = model._train_gate(logit)
        seen.append((g.detach(), (logit >= 0).float()))
        return g
    out, _, used = model._dense(x, decide)
    assert all(torch.equal(g, t) for g, t in seen)          # no noise: training decisions = inference rule
    (out.sum() + used.sum() / 1e6).backward()
    assert sum(float(g.fc.weight.grad.abs().sum()) for g in model.gates) > 0


def test_skipnet_cost_ramp_and_mlp_gate():
    torch.manual_seed(0)
    model = SkipNet(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25),
                    SkipNetConfig(budget=0.3, gate_hidden=8, cost_ramp=0.5)).train()
    assert all(isinstance(g.mlp[0], nn.Linear) and g.mlp[0].out_features == 8 for g in model.gates)
    x = _x(1, 4)
    losses = []
    for p in (0.0, 0.25, 0.5, 1.0):
        model.set_progress(p)
        model(x)
        losses.append(float(model.regularization_loss().detach()))
    full = losses[-1]
    assert full > 0 and losses[0] == 0.0
    assert losses[1] == pytest.approx(full / 2, rel=1e-5) and losses[2] == pytest.approx(full, rel=1e-5)
    model.regularization_loss().backward()
    assert sum(float(g.mlp[0].weight.grad.abs().sum()) for g in model.gates) > 0   # the hidden layer learns
    # the gate MLP's MACs are charged: per gate c*8 + 8*1 multiply-adds instead of c*1 (biases are not MACs)
    plain = SkipNet(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25))
    chans = [model._blocks[k].in_chs for k in model.gated]
    assert model.full_macs(x) - plain.full_macs(x) == sum(8 * c + 8 - c for c in chans)


def _snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_blockdrop_set_phase_freezes_what_it_should():
    torch.manual_seed(0)
    model = BlockDrop(resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.25),
                      BlockDropConfig(policy_widths=(8, 8), curriculum=0.5)).train()
    assert model.phase == "policy"
    model.set_phase("joint")
    assert model.phase == "joint" and model.backbone.training
    assert all(p.requires_grad for p in model.backbone.parameters())
    model.set_progress(0.0)
    assert model._free == model.num_gated                   # no curriculum in the joint phase
    x, y = _x(1, 8), torch.randint(0, 10, (8,))
    out = model(x)
    model.training_loss(out, y).backward()                  # cross-entropy included: the backbone gets gradients
    assert float(model.backbone.fc.weight.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)
    model.set_phase("policy")
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.backbone.training
    model.set_progress(0.0)
    assert model._free == 1                                 # the curriculum is back
    model.training_loss(model(x), y).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="'policy' or 'joint'"):
        model.set_phase("frozen")
    with pytest.raises(ValueError, match="joint_epochs"):
        BlockDropConfig(joint_epochs=-1)
    with pytest.raises(ValueError, match="cost_ramp"):
        SkipNetConfig(cost_ramp=1.5)
    with pytest.raises(ValueError, match="gate_hidden"):
        SkipNetConfig(gate_hidden=-1)


def test_blockdrop_two_phase_schedule(tmp_path):
    from dyncnn.train import load_checkpoint
    from dyncnn.train.trainer import TrainConfig
    torch.manual_seed(0)
    model = create_model("blockdrop_resnet20_cifar", in_chans=1, width_mult=0.25, budget=0.5,
                         policy_widths=(8, 8), joint_epochs=1)
    data = TensorDataset(_x(1, 16), torch.randint(0, 10, (16,)))
    backbone0, policy0, seen = _snapshot(model.backbone), _snapshot(model.policy), {}
    switch = model.set_phase

    def spy(phase):       # the state at each switch: what the previous phase trained
        seen[phase] = (_snapshot(model.backbone), _snapshot(model.policy))
        switch(phase)
    model.set_phase = spy
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, progress=False)
    result = fit_model(model, data, data, cfg, out_dir=tmp_path)
    assert list(seen) == ["policy", "joint"] and result.steps == 2
    backbone1, policy1 = seen["joint"]
    assert _same(backbone1, backbone0)                      # phase 1: the backbone is frozen (BN stats too)
    assert not _same(policy1, policy0)                      # ... and the policy trained
    assert not _same(_snapshot(model.backbone), backbone1)  # phase 2: the backbone trains jointly
    assert (tmp_path / "policy").is_dir() and (tmp_path / "joint").is_dir()
    loaded, _ = load_checkpoint(tmp_path / "last.safetensors")
    x = _x(1, 4)
    model.eval()
    assert torch.equal(loaded.eval().infer(x).logits, model.infer(x).logits)
