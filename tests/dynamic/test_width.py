"""Channel gating (dynamic width): executed sliced path vs dense masked path, ledger vs FlopCounterMode, all-on
equals the static backbone, gradients reach the gates, bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dyncnn
from dyncnn.dynamic.width import ChannelGatedNet
from dyncnn.models.mobilenet import mobilenet_v2
from dyncnn.models.resnet import resnet_cifar
from dyncnn.models.tiny import TinyMobileNet

TINY = {
    "channel_gated_resnet14_tiny": lambda: resnet_cifar(14, in_chans=1, width_mult=0.5),
    "channel_gated_mobilenet_v2_tiny": lambda: mobilenet_v2(num_classes=10, in_chans=1, width_mult=0.25),
}


def _inputs(n: int = 12) -> torch.Tensor:
    # per-sample scale and offset, so that the pooled gate inputs differ between samples
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 32, 32, generator=g) * torch.linspace(0.2, 3.0, n)[:, None, None, None] \
        + torch.linspace(-1, 1, n)[:, None, None, None]


def _spread_gates(model: ChannelGatedNet, x: torch.Tensor) -> None:
    """Put every gate's threshold at the median of its logits on ``x``, so that a batch mixes width levels."""
    model.eval().cost_table(x)          # measured first: its one-sample gate calls must not be seen below
    seen = []
    hooks = [g.register_forward_hook(lambda m, i, o: seen.append((m, o))) for g in model.gates]
    model.eval()
    with torch.no_grad():
        for g in model.gates:
            torch.nn.init.normal_(g.fc.weight, 0.0, 1.0)
        model.dense_forward(x)
        for gate, logits in seen:
            gate.fc.bias -= logits.median(0).values + torch.linspace(-0.3, 0.3, logits.shape[1])
    for h in hooks:
        h.remove()


@pytest.fixture(params=sorted(TINY))
def gated(request):
    torch.manual_seed(0)
    model = dyncnn.create_model(request.param)
    x = _inputs()
    _spread_gates(model, x)
    return request.param, model.eval(), x


def test_registered_names():
    names = set(dyncnn.list_models("channel_gated_*"))
    assert {"channel_gated_resnet32_cifar", "channel_gated_resnet110_cifar", "channel_gated_mobilenet_v2",
            "channel_gated_resnet14_tiny", "channel_gated_resnet20_tiny", "channel_gated_mobilenet_v2_tiny"} <= names


def test_batch_mixes_levels_and_equals_per_sample(gated):
    _, model, x = gated
    r = model.infer(x)
    levels = r.choices.view(len(x), len(model.gates), model.groups).sum(2)
    assert any(len(levels[:, b].unique()) > 1 for b in range(levels.shape[1])), "the test batch should mix levels"
    singles = [model.infer(x[i:i + 1]) for i in range(len(x))]
    assert torch.allclose(torch.cat([s.logits for s in singles]), r.logits, atol=1e-5)
    assert torch.equal(torch.cat([s.macs for s in singles]), r.macs)
    assert torch.equal(torch.cat([s.choices for s in singles]), r.choices)
    assert torch.equal(r.exit_index, levels.sum(1).long())
    assert r.choices.shape[1] == len(model.decision_names)
    assert len(r.macs.unique()) > 1 and (r.macs < model.full_macs(x)).any()


def test_ledger_equals_flop_counter(gated):
    name, model, x = gated
    model.infer(x)                       # costs are measured on the first call; count a later one too
    with FlopCounterMode(display=False) as counter:
        r = model.infer(x)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    fresh = dyncnn.create_model(name)
    fresh.load_state_dict(model.state_dict())
    with FlopCounterMode(display=False) as counter:    # first call: the measurement must stay invisible
        r2 = fresh.eval().infer(x)
    assert int(r2.macs.sum()) == counter.get_total_flops() // 2 == int(r.macs.sum())


def test_executed_path_equals_dense_masked_path(gated):
    _, model, x = gated
    r = model.infer(x)
    dense = model.dense_forward(x)          # eval mode: same thresholded decisions, dense convs times masks
    assert torch.allclose(dense, r.logits, atol=1e-5)
    used = model._last[0]                   # the differentiable MAC count of the training path ...
    assert torch.equal(used.double().round().long(), r.macs)   # ... equals the MACs that really ran
    assert torch.allclose(model(x), r.logits)                  # eval forward = infer().logits


def test_cut_weights_follow_in_place_updates(gated):
    """The cut convolution weights are dense copies: an in-place change of the block's weights (a training step)
    must reach the executed path, as it reaches the dense masked path."""
    _, model, x = gated
    model.infer(x)                                         # the cut copies are made
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(0.5)
    r = model.infer(x)
    assert torch.allclose(model.dense_forward(x), r.logits, atol=1e-5)


def test_all_on_reproduces_static_backbone(gated):
    name, model, x = gated
    static = TINY[name]().eval()
    static.load_state_dict(model.backbone.state_dict())
    model.force(True)
    r = model.infer(x)
    with torch.no_grad():
        ref = static(x)
        assert torch.equal(r.logits, ref)
        assert torch.equal(model.dense_forward(x), ref)
    gate_macs = sum(g.fc.in_features * g.fc.out_features for g in model.gates)
    static_macs = dyncnn.count_macs(static, x[:1]).total
    assert (r.macs == model.full_macs(x)).all() and model.full_macs(x) == static_macs + gate_macs
    model.force(False)                  # the narrowest level everywhere
    narrow = model.infer(x)
    assert (narrow.choices.view(len(x), -1, model.groups)[..., 1:] == 0).all()
    assert (narrow.macs < 0.6 * r.macs).all()
    model.force(None)


@pytest.mark.parametrize("name", sorted(TINY))
def test_gradients_reach_gates_and_budget_loss_lowers_macs(name):
    torch.manual_seed(0)
    model = dyncnn.create_model(name, budget=0.3, gate_init_bias=0.5).train()
    x, y = _inputs(8), torch.arange(8) % 10
    loss = F.cross_entropy(model(x), y) + model.regularization_loss()
    loss.backward()
    for g in model.gates:
        assert g.fc.weight.grad is not None and g.fc.weight.grad.abs().sum() > 0
    # the cost term alone moves the gates towards the budget
    opt = torch.optim.SGD([p for g in model.gates for p in g.parameters()], lr=2.0)
    fractions = []
    for _ in range(12):
        opt.zero_grad()
        model(x)
        fractions.append(model.mac_fraction())
        model.regularization_loss().backward()
        opt.step()
    assert sum(fractions[-3:]) / 3 < sum(fractions[:3]) / 3 - 0.05


def test_bounds_loss_and_progress():
    model = dyncnn.create_model("channel_gated_resnet14_tiny", bounds_weight=1.0, budget=0.5, gate_init_bias=5.0)
    model.train()
    model.set_progress(1.0)
    assert model.gates[0].gate.tau == pytest.approx(model.tau_end)
    model(_inputs(4))
    assert model.regularization_loss().item() > 0      # every block at full width, bounds closed at 0.5


def test_checkpoint_round_trip_and_large_models_all_on():
    model = dyncnn.create_model("channel_gated_resnet14_tiny").eval()
    copy = dyncnn.create_model("channel_gated_resnet14_tiny")
    copy.load_state_dict(model.state_dict())
    x = _inputs(3)
    assert torch.equal(copy.eval().infer(x).logits, model.infer(x).logits)
    # .to() replaces the tensors: the sliced views and measured costs must follow (float64 here)
    static = resnet_cifar(14, in_chans=1, width_mult=0.5).eval()
    static.load_state_dict(model.backbone.state_dict())
    model.force(True)
    assert torch.equal(model.double().infer(x.double()).logits, static.double()(x.double()))
    # the backbone's weights appear once, under their static names; the gates add one Linear per gated block
    assert set(model.state_dict()) == {f"backbone.{k}" for k in model.backbone.state_dict()} | \
        {f"gates.{i}.fc.{p}" for i in range(len(model.gates)) for p in ("weight", "bias")}
    for name, static in [("channel_gated_resnet32_cifar", resnet_cifar(32)),
                         ("channel_gated_mobilenet_v2", mobilenet_v2(num_classes=10))]:
        m = dyncnn.create_model(name, num_classes=10).eval()
        m.backbone.load_state_dict(static.state_dict())
        m.force(True)
        xs = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(m.infer(xs).logits, static.eval()(xs))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dyncnn.create_model("channel_gated_resnet14_tiny", budget=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dyncnn.create_model("channel_gated_resnet14_tiny", budget=0)
    for bad in (3, 1, 16, 2.0):
        with pytest.raises(ValueError, match=r"one of \[2, 4, 8\]"):
            dyncnn.create_model("channel_gated_resnet14_tiny", groups=bad)
    with pytest.raises(ValueError, match="no block"):
        ChannelGatedNet(TinyMobileNet())
    model = dyncnn.create_model("channel_gated_resnet14_tiny").eval()
    with pytest.raises(ValueError, match="1 input channels"):
        model.infer(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="finite"):
        model.infer(torch.full((1, 1, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="non-empty"):
        model.infer(torch.rand(0, 1, 32, 32))
    x = torch.rand(2, 1, 32, 32)
    want = model.infer(x)                       # in training mode: the eval-mode answer, the model left as it was
    assert torch.equal(model.train().infer(x).logits, want.logits) and model.training


def test_forced_levels_are_executed_and_charged_exactly():
    model = dyncnn.create_model("channel_gated_resnet14_tiny").eval()
    x = _inputs(6)
    costs = model.cost_table(x)
    levels = torch.tensor([[1, 2, 3, 4, 2, 1]] * 6).roll(1, 1)[:, :len(model.gates)]
    levels = (levels + torch.arange(6)[:, None]) % model.groups + 1
    r = model.infer(x, levels)
    gate_macs = sum(g.fc.in_features * g.fc.out_features for g in model.gates)
    expected = torch.tensor([costs.static + sum(int(costs.levels[b][lv - 1]) for b, lv in enumerate(row))
                             for row in levels.tolist()])
    assert torch.equal(r.macs, expected) and costs.static > gate_macs
    assert torch.equal(r.choices.view(6, -1, model.groups).sum(2).long(), levels)
    with FlopCounterMode(display=False) as counter:     # the gates run although ``levels`` overrides them
        r2 = model.infer(x, levels)
    assert int(r2.macs.sum()) == counter.get_total_flops() // 2 == int(r.macs.sum())
    with pytest.raises(ValueError, match=r"values in 1\.\.4"):
        model.infer(x, levels * 0)
    with pytest.raises(ValueError, match=r"shape \(6, 6\)"):
        model.infer(x, levels[:, :2])


def test_recalibrate_norms_uses_inference_decisions():
    from dyncnn.dynamic.width import recalibrate_norms
    model = dyncnn.create_model("channel_gated_resnet14_tiny").eval()
    x = _inputs(8)
    model.force(True)                   # full width: the statistics must be the static net's batch statistics
    recalibrate_norms(model, [x])
    static = resnet_cifar(14, in_chans=1, width_mult=0.5)
    static.load_state_dict(model.backbone.state_dict())
    for m in static.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        static.train()(x)
    for (k, a), b in zip(model.backbone.state_dict().items(), static.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-5), k
    assert not model.training and all(not g.training for g in model.gates)
    model.force(None)
    _spread_gates(model, x)                 # mixed widths: narrowed hidden channels leave later statistics changed
    recalibrate_norms(model, [(x, None)])
    last = model.backbone.stages[2][1].branch[1][1].running_mean
    assert not torch.allclose(last, static.stages[2][1].branch[1][1].running_mean)


def test_distillation_loss_and_gradient():
    from dyncnn.dynamic.width import distillation_loss
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 10, generator=g)
    assert distillation_loss(teacher.clone(), teacher).abs() < 1e-6          # identical logits: no loss
    student = torch.randn(6, 10, generator=g, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=2.0)
    p_t, p_s = F.softmax(teacher / 2, 1), F.softmax(student.detach() / 2, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * 4
    assert torch.allclose(loss, expected, atol=1e-5) and loss > 0
    loss.backward()
    # d/ds of T^2 KL / N = T (p_s - p_t) / N: the gradient pulls the student's distribution towards the teacher's
    assert torch.allclose(student.grad, 2 * (p_s - p_t) / 6, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, temperature=0)


def test_teacher_distillation_in_training_loss():
    torch.manual_seed(0)
    model = dyncnn.create_model("channel_gated_resnet14_tiny", gate_init_bias=0.5).train()
    teacher = resnet_cifar(14, in_chans=1, width_mult=0.5)
    teacher.load_state_dict(model.backbone.state_dict())
    x, y = _inputs(8), torch.arange(8) % 10
    out = model(x)
    ce = F.cross_entropy(out, y)
    assert torch.equal(model.training_loss(out, y), ce)                   # no teacher: plain cross-entropy
    model.set_teacher(teacher, weight=0.5, temperature=3.0)
    out = model(x)
    assert teacher.training                                               # its mode is restored
    with torch.no_grad():
        t = teacher.eval()(x)
    loss = model.training_loss(out, y)
    from dyncnn.dynamic.width import distillation_loss
    assert torch.allclose(loss, 0.5 * F.cross_entropy(out, y) + 0.5 * distillation_loss(out, t, 3.0), atol=1e-5)
    loss.backward()
    assert all(g.fc.weight.grad.abs().sum() > 0 for g in model.gates)
    assert all(p.grad is None for p in teacher.parameters())             # the teacher is not trained
    assert not any(k.startswith("_teacher") or "teacher" in k for k in model.state_dict())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.set_teacher(teacher, weight=1.5)
    model.set_teacher(None)
    out = model(x)
    assert torch.equal(model.training_loss(out, y), F.cross_entropy(out, y))


def test_budget_ramp():
    model = dyncnn.create_model("channel_gated_resnet20_tiny", budget=0.5, budget_ramp=0.4)
    assert len(model.gates) == 9
    got = []
    for p in (0.0, 0.2, 0.4, 0.9):
        model.set_progress(p)
        got.append(model.current_budget())
    assert got == pytest.approx([1.0, 0.75, 0.5, 0.5])
    # at progress 0 the all-on network meets the ramped target: no cost loss; at the end it does not
    model.train().force(True)
    model.set_progress(0.0)
    model(_inputs(4))
    full_loss = model.regularization_loss()
    assert full_loss.item() == pytest.approx(0.0, abs=1e-6)
    model.set_progress(1.0)
    assert model.regularization_loss().item() == pytest.approx(model.cost_weight * 0.25, rel=1e-4)
    with pytest.raises(ValueError, match=r"budget_ramp must be in \[0, 1\)"):
        dyncnn.create_model("channel_gated_resnet20_tiny", budget_ramp=1.0)
