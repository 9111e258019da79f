"""IMTA (gradient equilibrium, forward knowledge transfer, inline distillation) as one public recipe: each loss
term against a hand computation, the gradient scaling against an independent autograd construction, the transfer
reading the previous exit's logits, the recipe from ``create_model`` and from ``dyncnn train``."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn import create_model
from dyncnn.dynamic import (IMTA, ExitLogits, ForwardTransfer, LinearHead, MultiExitLoss, MultiExitNetwork,
                            TransferStage, apply_imta)
from dyncnn.dynamic.protocols import OwnTrainingLoss
from dyncnn.errors import DyncnnError


def _log_softmax(z):          # by hand: z - log(sum(exp(z))), row-wise, in float64
    z = z.double()
    return z - z.exp().sum(1, keepdim=True).log()


def _ce(z, y):
    return -_log_softmax(z)[torch.arange(len(y)), y].mean()


def _kl(teacher, student, t):
    """KL(softmax(teacher / t) || softmax(student / t)), summed over classes, averaged over the batch."""
    p = _log_softmax(teacher / t).exp()
    return (p * (_log_softmax(teacher / t) - _log_softmax(student / t))).sum(1).mean()


@pytest.mark.parametrize("teacher", ["next", "last"])
def test_loss_terms_against_a_hand_computation(teacher):
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(5, 4, generator=g) * s for s in (1.0, 2.0, 3.0)]
    y = torch.tensor([0, 1, 2, 3, 1])
    t, alpha, w = 2.0, 0.7, [0.5, 1.0, 2.0]
    ce = sum(wk * _ce(z, y) for wk, z in zip(w, outs))
    teachers = outs[1:] if teacher == "next" else [outs[2], outs[2]]
    kd = sum(wk * _kl(zt, z, t) for wk, z, zt in zip(w[:2], outs[:2], teachers))
    got = MultiExitLoss(weights=w, distill=alpha, temperature=t, teacher=teacher)(outs, y)
    torch.testing.assert_close(got.double(), ce + alpha * t * t * kd, rtol=1e-5, atol=1e-6)
    # without distillation: the weighted cross-entropy alone
    torch.testing.assert_close(MultiExitLoss(weights=w)(outs, y).double(), ce, rtol=1e-5, atol=1e-6)
    # the two teachers differ for exit 0 (exit 1 is not the last)
    other = "last" if teacher == "next" else "next"
    assert not torch.isclose(got, MultiExitLoss(weights=w, distill=alpha, temperature=t, teacher=other)(outs, y))


def test_the_teacher_is_detached_and_only_the_students_learn_from_it():
    outs = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2])
    kd_only = MultiExitLoss(distill=1.0, teacher="next")(outs, y) - MultiExitLoss()(outs, y)
    kd_only.backward()
    assert outs[0].grad.abs().sum() > 0 and outs[1].grad.abs().sum() > 0
    assert outs[2].grad.abs().sum() == 0          # the last exit is only ever a teacher: no gradient from the KL


def test_loss_settings_are_checked():
    with pytest.raises(ValueError, match="teacher must be one of"):
        MultiExitLoss(teacher="first")
    with pytest.raises(ValueError, match="temperature must be"):
        MultiExitLoss(temperature=0)
    with pytest.raises(ValueError, match="imta has no setting 'temprature'"):
        IMTA.of({"temprature": 2})
    with pytest.raises(ValueError, match="imta expects true, false or a dict"):
        IMTA.of("yes")
    assert IMTA.of(False) is None and IMTA.of(True) == IMTA()


class _Toy(MultiExitNetwork):
    """Three small conv stages, a pooled linear exit after each."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__([nn.Conv2d(3, 6, 3, padding=1), nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Tanh()),
                          nn.Conv2d(6, 6, 1)], [LinearHead(6, 4) for _ in range(3)], num_classes=4)


def _scaled(t, s):
    """``t`` forward, gradient times ``s`` backward, without dyncnn's scale_grad: value from the detached copy."""
    return s * t + (1 - s) * t.detach()


def test_gradient_equilibrium_with_transfer_against_an_independent_construction():
    net = apply_imta(_Toy(), True).train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()                       # the same forward in both constructions
    x, y = torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 3, 0])
    net.zero_grad()
    net.training_loss(net(x), y).backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    # by hand: exit k of K gets 1/(K-k) of the gradient into the stage's output, the later exits (K-k-1)/(K-k)
    st = net.stages
    net.zero_grad()
    s, z, outs = x, None, []
    for k in range(3):
        s = st[k].stage(s)
        to_head, to_next = (_scaled(s, 1 / (3 - k)), _scaled(s, (2 - k) / (3 - k))) if k < 2 else (s, s)
        z = st[k].head(to_head) + (st[k].transfer(z) if k else 0)
        outs.append(z)
        s = to_next
    MultiExitLoss(distill=1.0, temperature=3.0, teacher="next")(outs, y).backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)
    # and the scaling matters: without it the trunk's gradient differs
    net.gradient_equilibrium = False
    net.zero_grad()
    net.training_loss(net(x), y).backward()
    assert not torch.allclose(net.stages[0].stage.weight.grad, got["stages.0.stage.weight"])


def test_forward_transfer_reads_the_previous_exit_logits():
    plain = _Toy().eval()
    net = apply_imta(_Toy(), {"transfer_hidden": 5}).eval()
    assert net.forward_transfer and isinstance(net.stages[1], TransferStage) and isinstance(net.heads[1], ExitLogits)
    assert net.stages[0].transfer is None and isinstance(net.stages[2].transfer, ForwardTransfer)
    tr = net.stages[1].transfer
    with torch.no_grad():                          # BatchNorm statistics that are not the identity
        tr.norm.running_mean.uniform_(-1, 1)
        tr.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        outs, ref = net(x), plain(x)
        torch.testing.assert_close(outs[0], ref[0])                  # exit 0 reads nothing before it
        # exit 1 = its own head + linear(relu(bn(linear(exit 0's logits)))), by hand
        h = outs[0] @ tr.embed.weight.T + tr.embed.bias
        h = (h - tr.norm.running_mean) / (tr.norm.running_var + tr.norm.eps).sqrt() * tr.norm.weight + tr.norm.bias
        torch.testing.assert_close(outs[1], ref[1] + h.clamp_min(0) @ tr.fc.weight.T)
        # what exit 0 says changes exit 1, and nothing else does
        net.stages[0].head.fc.bias += 3.0
        moved = net(x)
    torch.testing.assert_close(moved[0] - 3.0, outs[0])
    assert not torch.allclose(moved[1], outs[1])
    torch.testing.assert_close(moved[1] - ref[1], tr(moved[0]))


def test_transfer_keeps_inference_executed_and_the_ledger_exact():
    net = apply_imta(_Toy(), True).eval()
    x = torch.randn(8, 3, 4, 4) * torch.linspace(0.1, 4, 8).view(8, 1, 1, 1)
    with torch.no_grad():
        outs = net(x)
    conf = [torch.softmax(o, 1).max(1).values for o in outs]
    th = [float(conf[0].median()), 0.0]           # half the batch leaves at exit 0, the rest at exit 1
    ran = []
    hook = net.stages[2].register_forward_pre_hook(lambda m, a: ran.append(1))
    with FlopCounterMode(display=False) as counter:
        r = net.infer(x, th)
    hook.remove()
    assert not ran, "a sample that left before exit 2 must not run stage 2"
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    assert set(r.exit_index.tolist()) == {0, 1}
    torch.testing.assert_close(r.logits[r.exit_index == 1], outs[1][r.exit_index == 1])
    cum = net.exit_macs(x[:1])
    assert r.macs.tolist() == [cum[k] for k in r.exit_index.tolist()]
    # the transfer costs its two small linear layers at exits 1 and 2, nothing at exit 0
    plain = _Toy().exit_macs(x[:1])
    assert cum[0] == plain[0] and cum[1] - plain[1] == 4 * 128 + 128 * 4


@pytest.mark.parametrize("name,cfg", [
    ("msdnet_cifar", {"nBlocks": 3, "step": 1, "base": 1, "nChannels": 8, "growthRate": 4}),
    ("ranet_cifar", {"nChannels": 8, "growthRate": 4, "step": 1, "scale_list": [1, 2], "grFactor": [2, 1],
                     "bnFactor": [2, 1]}),
    ("multi_exit", {"backbone": "tiny_mobilenet", "backbone_cfg": {"widths": [8, 16, 32]}, "example_size": 32})])
def test_create_model_sets_the_recipe_and_checkpoints_rebuild_it(name, cfg, tmp_path):
    net = create_model(name, num_classes=10, imta={"temperature": 2.0, "label_smoothing": 0.1}, **cfg)
    assert isinstance(net, OwnTrainingLoss) and net.gradient_equilibrium and net.forward_transfer
    assert net.training_loss.temperature == 2.0 and net.training_loss.teacher == "next"
    assert not isinstance(create_model(name, num_classes=10, **cfg), OwnTrainingLoss)    # no recipe: no own loss
    from dyncnn.train.checkpoint import load_checkpoint, save_checkpoint
    save_checkpoint(tmp_path / "m.safetensors", net)
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.forward_transfer and loaded.imta == net.imta
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x)[-1], net.eval()(x)[-1])


def test_the_recipe_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="trains multi-exit networks"):
        apply_imta(create_model("tiny_mobilenet", num_classes=10, widths=[8, 16]), True)
    with pytest.raises(DyncnnError, match="no config key 'imta'"):
        create_model("tiny_mobilenet", num_classes=10, widths=[8, 16], imta=True)
    with pytest.raises(DyncnnError, match="imta weights: 2 for 3 exits"):
        create_model("msdnet_cifar", num_classes=10, nBlocks=3, step=1, base=1, nChannels=8, growthRate=4,
                     imta={"weights": [1, 1]})


def test_the_recipe_trains_from_the_cli(tmp_path, capsys):
    from dyncnn.cli import main
    out = tmp_path / "imta"
    assert main(["train", "--model", "msdnet_cifar", "--dataset", "scaled_mnist", "--canvas", "32", "--clutter", "0",
                 "--epochs", "1", "--batch-size", "64", "--cfg", "nBlocks=3", "step=1", "base=1", "nChannels=8",
                 "growthRate=4", 'imta={"label_smoothing": 0.05}', "--out", str(out)]) == 0
    assert "final val acc" in capsys.readouterr().out
    from dyncnn.train.checkpoint import load_checkpoint
    model, meta = load_checkpoint(out / "last.safetensors")
    assert model.forward_transfer and model.imta.label_smoothing == 0.05
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])


def test_bundle_of_a_transfer_network_equals_eager(tmp_path):
    from dyncnn.export import export_bundle, load_bundle
    net = apply_imta(_Toy(), True).eval()
    x = torch.randn(16, 3, 4, 4) * torch.linspace(0.1, 4, 16).view(16, 1, 1, 1)
    with torch.no_grad():
        conf = [torch.softmax(o, 1).max(1).values for o in net(x)]
    policy = [float(conf[0].quantile(0.6)), float(conf[1].median())]
    eager = net.infer(x, policy)
    assert len(set(eager.exit_index.tolist())) == 3              # every exit taken: the check is not trivial
    export_bundle(net, tmp_path / "b", (3, 4, 4), policy=policy)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    # the previous exit's logits are a state leaf that stage k reads; exits 0 and 1 take their logits from it
    assert [s["logits"]["source"] for s in manifest["stages"]] == ["leaf", "leaf", "graph"]
    bundle = load_bundle(tmp_path / "b")
    res = bundle.run(x.numpy())
    assert torch.equal(torch.as_tensor(res.exit_index), eager.exit_index)
    assert torch.equal(torch.as_tensor(res.macs), eager.macs)
    torch.testing.assert_close(torch.as_tensor(res.logits), eager.logits, rtol=1e-4, atol=1e-5)
    for i in range(4):                                           # batch 1 takes the driver's no-copy path
        one = bundle.run(x[i:i + 1].numpy())
        assert int(one.exit_index[0]) == int(eager.exit_index[i])
