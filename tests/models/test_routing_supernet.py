import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic.executor import measure_macs
from dyncnn.models.routing import PathCfg, RoutingSuperNet, SuperNetCfg
from dyncnn.layers.gates import budget_loss
from dyncnn.models import create_model
from dyncnn.models.resnet import resnet_cifar


def flop_macs(fn, *args):
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops() // 2


def calibrate_norms(model: nn.Module, shape) -> None:
    """Running statistics of one random batch, so that eval-mode activations keep their scale."""
    was_forced = getattr(model, "forced", None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.rand(8, *shape[1:]))
    model.eval()
    return was_forced


def routed_net(**kw) -> RoutingSuperNet:
    net = create_model("routing_supernet_tiny", **kw)
    for cell in net.cells:
        nn.init.normal_(cell.router.fc.weight, 0.0, 3.0)    # routers that send different samples different ways
    calibrate_norms(net, (1, 1, 32, 32))
    return net


def test_forced_full_path_equals_the_resnet_it_is_built_from():
    torch.manual_seed(3)
    resnet = resnet_cifar(14, in_chans=1, width_mult=0.5)
    calibrate_norms(resnet, (1, 1, 32, 32))
    net = create_model("routing_supernet_tiny").eval()
    net.stem.load_state_dict(resnet.stem[0].state_dict())
    for cell, block in zip(net.cells, resnet.blocks(), strict=True):
        cell.paths[0].load_state_dict(block.state_dict())
    net.head[2].load_state_dict(resnet.fc.state_dict())
    x = torch.rand(3, 1, 32, 32)
    net.force(0)
    result = net.infer(x)
    assert torch.equal(result.logits, resnet(x))
    assert (net.paths_taken(result) == 0).all() and (result.exit_index == len(net.cells)).all()
    assert result.choices.shape == (3, len(net.cells) * net.num_paths) and (result.choices.sum(1) == len(net.cells)).all()
    routers = sum(measure_macs(c.router, torch.zeros(1, c.router.fc.in_features, 1, 1)) for c in net.cells)
    assert result.macs[0].item() == flop_macs(resnet, x[:1])[1] + routers == net.full_macs(x)


@pytest.mark.parametrize("path", [1, 2])
def test_forced_path_equals_the_static_network_of_that_path(path):
    net = routed_net()
    x = torch.rand(4, 1, 32, 32)
    net.force(path)
    result = net.infer(x)
    static = net.static_path(path)
    assert torch.equal(result.logits, static(x))
    assert (net.paths_taken(result) == path).all()
    assert result.macs[0].item() < net.full_macs(x)


def varied_batch(n: int) -> torch.Tensor:
    """Inputs of different contrast and offset, so that the (pooled-feature) routers disagree between samples."""
    return (torch.randn(n, 1, 32, 32) * torch.linspace(0.2, 4, n).view(-1, 1, 1, 1)
            + torch.linspace(-2, 2, n).flip(0).view(-1, 1, 1, 1))


def test_batched_equals_per_sample_and_ledger_equals_flop_counter():
    net = routed_net()
    x = varied_batch(8)
    result, counted = flop_macs(net.infer, x)
    assert result.macs.sum().item() == counted
    assert len({tuple(c) for c in result.choices.tolist()}) > 1          # samples took different routes
    fixed, table = net.cost_table(x)
    expected = fixed + table.gather(1, net.paths_taken(result).t()).sum(0)   # each sample: its own paths' MACs
    assert torch.equal(result.macs, expected.to(torch.int64))
    for i in range(8):
        one = net.infer(x[i:i + 1])
        assert torch.allclose(one.logits, result.logits[i:i + 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(one.choices[0], result.choices[i]) and one.macs.item() == result.macs[i].item()
    assert torch.allclose(net(x), result.logits)                        # eval forward = infer().logits


def test_training_gives_gradients_to_routers_from_task_and_cost_losses():
    net = routed_net(budget=0.3).train()
    x, y = torch.rand(8, 1, 32, 32), torch.arange(8) % 10
    logits = net(x)
    nn.functional.cross_entropy(logits, y).backward()
    for cell in net.cells:
        assert cell.router.fc.weight.grad.abs().sum() > 0                 # straight-through Gumbel gradient
    net.zero_grad()
    net(x)
    reg = net.regularization_loss()                                       # the cost term alone
    assert reg.item() > 0
    reg.backward()
    assert all(c.router.fc.weight.grad.abs().sum() > 0 for c in net.cells)
    # the cost reaches earlier paths only through later routers' inputs; the last cell's paths feed no router
    assert all(p.grad is None for path in net.cells[-1].paths for p in path.parameters())


def test_cost_loss_is_the_budget_loss_of_the_executed_route():
    net = routed_net().train()
    x = torch.rand(4, 1, 32, 32)
    net.force(2)
    net(x)
    fixed, table = net.cost_table(x)
    used = torch.full((4,), float(fixed + table[:, 2].sum()))       # every sample took path 2 everywhere
    assert torch.allclose(net.regularization_loss(),
                          net.cost_weight * budget_loss(used, net.full_macs(x), net.budget), rtol=1e-5)
    net.force(None)
    net(x)
    assert net.regularization_loss().requires_grad


def test_set_progress_anneals_the_temperature():
    net = create_model("routing_supernet_tiny", tau=(4.0, 0.25))
    net.set_progress(0.0)
    assert net.tau == pytest.approx(4.0)
    net.set_progress(1.0)
    assert net.tau == pytest.approx(0.25)
    net.set_progress(0.5)
    assert net.tau == pytest.approx(1.0)


def test_noise_and_cost_weight_schedules():
    net = create_model("routing_supernet_tiny", noise_until=0.5, cost_warmup=0.2, cost_weight=2.0)
    net.set_progress(0.0)
    assert net.noise_scale == 1.0 and net._cost_weight() == 0.0
    net.set_progress(0.1)
    assert net.noise_scale == pytest.approx(0.8) and net._cost_weight() == pytest.approx(1.0)
    net.set_progress(0.6)
    assert net.noise_scale == 0.0 and net._cost_weight() == pytest.approx(2.0)


def test_paths_of_a_cell_share_one_shortcut():
    """The bug that made routed training fail: each path had its own 1x1 projection at the stride-2 cells, so
    the features a cell emitted were in a different basis for each route."""
    net = create_model("routing_supernet_tiny")
    for cell in net.cells:
        assert all(p.shortcut is cell.paths[0].shortcut for p in cell.paths)
    assert any(not isinstance(c.paths[0].shortcut, nn.Identity) for c in net.cells)


def test_after_training_steps_the_noise_free_training_forward_equals_infer():
    """Train/eval consistency: once the Gumbel noise has faded, the training forward routes like ``infer`` and
    its output (BatchNorm on running statistics) is infer's logits, routes that differ between samples included."""
    torch.manual_seed(0)
    net = routed_net(budget=0.5).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = varied_batch(8), torch.arange(8) % 10
    for step in range(4):
        net.set_progress(step / 4)                     # noise on, then fading
        loss = nn.functional.cross_entropy(net(x), y) + net.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.set_progress(0.9)                              # past noise_until: no noise
    assert net.noise_scale == 0.0
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()                                   # running statistics, as at inference
    with torch.no_grad():
        train_logits = net(x)
    result = net.eval().infer(x)
    assert len({tuple(c) for c in result.choices.tolist()}) > 1
    assert torch.allclose(train_logits, result.logits, atol=1e-5, rtol=1e-5)


def test_load_backbone_starts_path_0_at_the_resnet_and_narrow_paths_at_its_leading_channels():
    torch.manual_seed(5)
    resnet = resnet_cifar(14, in_chans=1, width_mult=0.5)
    calibrate_norms(resnet, (1, 1, 32, 32))
    net = create_model("routing_supernet_tiny").load_backbone(resnet).eval()
    x = torch.rand(3, 1, 32, 32)
    net.force(0)
    assert torch.equal(net.infer(x).logits, resnet(x))
    block, half = resnet.blocks()[2], net.cells[2].paths[1]
    hidden = half.branch[0][0].weight.shape[0]
    assert hidden == block.branch[0][0].weight.shape[0] // 2
    assert torch.equal(half.branch[0][0].weight, block.branch[0][0].weight[:hidden])
    assert torch.equal(half.branch[1][0].weight, block.branch[1][0].weight[:, :hidden])
    with pytest.raises(ValueError, match="6 blocks"):
        net.load_backbone(resnet_cifar(20, in_chans=1))


def test_paths_from_checkpoint_style_dicts_and_cifar_variant():
    net = create_model("routing_supernet_tiny", paths=[{"kind": "basic"}, {"kind": "ds", "kernel": 5}])
    assert net.num_paths == 2 and isinstance(net.cfg.paths[1], PathCfg)
    assert len(create_model("routing_supernet_cifar").cells) == 9


def test_bad_inputs_raise_clear_errors():
    for budget in (0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            create_model("routing_supernet_tiny", budget=budget)
    net = create_model("routing_supernet_tiny")
    with pytest.raises(ValueError, match=r"path index in 0\.\.2"):
        net.force(3)
    with pytest.raises(ValueError, match="path kind must be one of"):
        PathCfg("wide")
    with pytest.raises(ValueError, match="cells_per_stage"):
        SuperNetCfg(cells_per_stage=0)
    with pytest.raises(ValueError, match="input channels"):
        net.eval().infer(torch.rand(2, 3, 32, 32))


def test_checkpoint_round_trip_keeps_the_shared_shortcuts(tmp_path):
    """Issue 14, bug 1: safetensors refused the shortcut tensors the paths share, so ``dyncnn train`` crashed at
    its first checkpoint. Save -> load (model rebuilt from the recorded spec) -> the same routes and logits, and
    the loaded paths still share one shortcut."""
    from dyncnn.train.checkpoint import load_checkpoint, save_checkpoint
    net = routed_net(widths=(4, 8, 8)).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = varied_batch(6)
    nn.functional.cross_entropy(net.train()(x), torch.arange(6)).backward()
    opt.step()
    net.eval()
    path = save_checkpoint(tmp_path / "last.safetensors", net, opt, {"epoch": 1})
    loaded, meta = load_checkpoint(path)
    assert meta["train_state"] == {"epoch": 1}
    assert all(p.shortcut is c.paths[0].shortcut for c in loaded.cells for p in c.paths)
    loaded.eval()
    ours, theirs = net.infer(x), loaded.infer(x)
    assert len({tuple(c) for c in ours.choices.tolist()}) > 1
    assert torch.equal(ours.choices, theirs.choices) and torch.equal(ours.logits, theirs.logits)
    opt2 = torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9)
    load_checkpoint(path, loaded, opt2)                # the optimizer state resumes too
    assert len(opt2.state_dict()["state"]) == len(opt.state_dict()["state"])


def test_evaluate_dynamic_reports_per_path_rates():
    """Issue 14, bug 5: ``choices`` of a routing network were path indices, which evaluate_dynamic averaged as if
    they were 0/1 decisions. They are now one-hot per cell (the one meaning of ``choices``), and the report gives,
    per cell, the share of samples that took each path."""
    from dyncnn.dynamic.evaluation import evaluate_dynamic, format_dynamic
    net = routed_net()
    x = varied_batch(12)
    r = evaluate_dynamic(net, list(zip(x, torch.zeros(12, dtype=torch.int64))), batch_size=5)
    choices = net.paths_taken(net.infer(x))
    cells, paths = len(net.cells), net.num_paths
    assert r["decision_names"][:paths] == ["cell0.path0", "cell0.path1", "cell0.path2"]
    assert len(r["choice_rate"]) == len(r["decision_names"]) == cells * paths
    rates = torch.tensor(r["choice_rate"]).view(cells, paths)
    expected = torch.stack([(choices == p).double().mean(0) for p in range(paths)], 1)
    assert torch.allclose(rates.double(), expected, atol=1e-4)
    assert torch.allclose(rates.sum(1).double(), torch.ones(cells, dtype=torch.float64), atol=1e-3)
    assert (rates > 0).sum() > cells                   # the routes really differ between samples
    assert "cell0.path0=" in format_dynamic(r)
