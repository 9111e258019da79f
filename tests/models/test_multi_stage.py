"""The width-wise multi-stage network: later stages add channels and read the earlier stages' kept features,
an exited sample never runs the wider stages, and the cost is what ran."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dyncnn
from dyncnn.dynamic.losses import MultiExitLoss
from dyncnn.errors import DyncnnError
from dyncnn.models.multi_stage import MultiStageNetwork

WIDTHS = ((8, 16, 24, 32), (4, 8, 8, 16), (4, 8, 8, 16))


def _net(widths=WIDTHS, **kw) -> MultiStageNetwork:
    torch.manual_seed(0)
    return dyncnn.create_model("multi_stage", num_classes=10, in_chans=1, widths=widths, **kw).eval()


def _x(n=12, side=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, side, side, generator=g) * torch.linspace(0.3, 2.0, n).view(n, 1, 1, 1)


def test_forward_one_logits_per_exit_and_every_weight_learns():
    net = _net().train()
    outs = net(_x(4))
    assert net.num_exits == len(outs) == 3 and all(o.shape == (4, 10) for o in outs)
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_later_stage_adds_channels_reading_all_earlier_ones():
    net = _net()
    # stage k's pointwise conv at depth d reads the depthwise outputs of stages <= k at d: its own channels of the
    # depth before plus everything the stages before it keep
    for k, stage in enumerate(net.stages):
        own = [WIDTHS[k][0]] + list(WIDTHS[k][:-1])
        earlier = [sum(([WIDTHS[j][0]] + list(WIDTHS[j][:-1]))[d] for j in range(k)) for d in range(4)]
        assert [pw[0].in_channels for pw in stage.pw] == [o + e for o, e in zip(own, earlier)]
        assert [pw[0].out_channels for pw in stage.pw] == list(WIDTHS[k])
        assert [dw[0].groups for dw in stage.dw] == own                    # depthwise on its own channels only
    assert [h.fc.in_features for h in net.heads] == [32, 48, 64]            # pooled features of stages <= k


def test_one_stage_is_a_tiny_mobilenet_and_more_stages_cost_what_the_hand_count_says():
    """One stage is exactly tiny_mobilenet (same MACs and parameters). K stages are a tiny_mobilenet of the summed
    widths without the pointwise weights from a later stage's channels to an earlier stage's, plus the earlier exits'
    linear heads: counted by hand per depth (64x64 input: the stem halves it, depth d >= 1 halves it again)."""
    x = torch.zeros(1, 1, 64, 64)
    one = _net(widths=WIDTHS[:1])
    tiny = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=WIDTHS[0])
    assert one.exit_macs(x) == [dyncnn.count_macs(tiny, x).total]
    assert dyncnn.count_params(one) == dyncnn.count_params(tiny)

    net = _net()
    summed = [sum(w[d] for w in WIDTHS) for d in range(4)]
    dense = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=summed)
    ins = [[w[0]] + list(w[:-1]) for w in WIDTHS]           # each stage's depthwise channels per depth
    sides = [32, 16, 8, 4]
    missing_w = sum(WIDTHS[j][d] * ins[i][d] for d in range(4) for j in range(3) for i in range(j + 1, 3))
    missing_macs = sum(WIDTHS[j][d] * ins[i][d] * sides[d] ** 2 for d in range(4) for j in range(3)
                       for i in range(j + 1, 3))
    early_heads = (32 + 48) * 10
    assert net.full_macs(x) == dyncnn.count_macs(dense, x).total - missing_macs + early_heads
    assert dyncnn.count_params(net) == dyncnn.count_params(dense) - missing_w + early_heads + 2 * 10
    assert sum(net.stage_macs(x)) == net.full_macs(x)
    assert net.full_macs(x) < dyncnn.count_macs(dense, x).total


def test_an_exited_sample_never_runs_the_later_stages(check_later_stages_skipped):
    net = _net()
    check_later_stages_skipped(net, _x())


def test_earlier_stages_run_once_at_full_depth():
    """Nothing is recomputed: at full depth every conv of every stage runs once, on the whole batch."""
    net = _net()
    net.infer(_x(3))                # the executor's one-time cost measurement (per input shape) is not counted
    calls = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        net.infer(_x(3))
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 3 * 9 and set(calls.values()) == {1}      # stem + 4 depthwise + 4 pointwise per stage


@pytest.mark.parametrize("resolutions", [None, (2, 2, 1)])
def test_ledger_equals_flop_counter_and_batched_equals_one_at_a_time(resolutions, spread_policy):
    net = _net(resolutions=resolutions)
    x = _x()
    policy = spread_policy(net, x)
    with FlopCounterMode(display=False) as counter:
        r = net.infer(x, policy)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    cum = torch.tensor(net.exit_macs(x[:1]))
    assert torch.equal(r.macs, cum[r.exit_index]) and len(set(r.exit_index.tolist())) == 3
    for i in range(len(x)):
        one = net.infer(x[i:i + 1], policy)
        assert int(one.exit_index) == int(r.exit_index[i]) and int(one.macs) == int(r.macs[i])
        torch.testing.assert_close(one.logits[0], r.logits[i], rtol=1e-4, atol=1e-5)


def test_low_resolution_first_stage(spread_policy):
    net = _net(widths=WIDTHS[:2], resolutions=(2, 1))
    x = _x(4)
    # stage 0 is a network on the 2x downsampled image: the same as a one-stage network fed that image
    one = _net(widths=WIDTHS[:1])
    one.stages[0].load_state_dict(net.stages[0].state_dict(), strict=False)
    one.heads[0].load_state_dict(net.heads[0].state_dict())
    with torch.no_grad():
        outs = net(x)
        torch.testing.assert_close(outs[0], one(F.avg_pool2d(x, 2))[0])
    # its convolutions cost a quarter (the linear head the same)
    full_res = _net(widths=WIDTHS[:2])
    head = 32 * 10
    assert net.exit_macs(x[:1])[0] - head == (full_res.exit_macs(x[:1])[0] - head) // 4
    assert net.exit_macs(x[:1])[1] - net.exit_macs(x[:1])[0] == full_res.stage_macs(x[:1])[1]
    policy = spread_policy(net, _x())
    with FlopCounterMode(display=False) as counter:
        r = net.infer(_x(), policy)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2 and len(set(r.exit_index.tolist())) == 2
    with pytest.raises(DyncnnError, match="multiples of 32"):
        net.infer(torch.randn(1, 1, 48, 48))


@pytest.mark.parametrize("cfg, match", [
    ({"widths": [[8, 16], [8]]}, "same depth"),
    ({"widths": []}, "non-empty sequence of stages"),
    ({"widths": [[8, 0]]}, "positive ints"),
    ({"widths": [[8], [8]], "resolutions": [2]}, "one factor per stage"),
    ({"widths": [[8], [8]], "resolutions": [3, 2]}, "multiple of the next"),
])
def test_bad_config_says_what_is_expected(cfg, match):
    with pytest.raises(DyncnnError, match=match):
        dyncnn.create_model("multi_stage", **cfg)


@pytest.mark.parametrize("resolutions", [None, (2, 1, 1)])
def test_bundle_decides_as_eager(tmp_path, resolutions, spread_policy):
    from dyncnn.export import export_bundle, load_bundle
    net = _net(resolutions=resolutions)
    x = _x()
    policy = spread_policy(net, x)
    manifest = export_bundle(net, tmp_path / "b", (1, 32, 32), policy=policy)
    # the image reaches the later stages without a copy; each later stage takes the kept features as inputs
    assert manifest["stages"][0]["state_out"]["leaves"][0]["source"] == "input"
    assert len(manifest["stages"][1]["inputs"]) == 1 + 4 + 1           # image, kept features per depth, pooled
    got, want = load_bundle(tmp_path / "b").run(x.numpy()), net.infer(x, policy)
    assert torch.equal(got.exit_index, want.exit_index) and len(set(want.exit_index.tolist())) == 3
    assert torch.equal(got.macs, want.macs)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


def test_int8_bundle_of_a_low_resolution_first_stage(tmp_path):
    """The up-sampling of the earlier stages' features survives ONNX Runtime's shape inference (INT8 quantization
    runs it first): the quantized bundle is written and runs."""
    from dyncnn.export import export_bundle, load_bundle
    net = _net(widths=WIDTHS[:2], resolutions=(2, 1))
    manifest = export_bundle(net, tmp_path / "b", (1, 32, 32), policy=[0.5], quantize=True,
                             calibration=_x(32, seed=3))
    assert "int8" in manifest["stages"][1]["files"]
    got = load_bundle(tmp_path / "b", precision="int8").run(_x(4).numpy())
    assert got.logits.shape == (4, 10) and bool(torch.isfinite(got.logits).all())


def test_trains_with_the_multi_exit_loss(tmp_path):
    from dyncnn.train import TrainConfig, Trainer
    net = _net().train()
    net.gradient_equilibrium = True            # the frontier's recipe: distillation + gradient equilibrium
    before = copy.deepcopy(net.state_dict())
    ds = torch.utils.data.TensorDataset(torch.rand(16, 1, 32, 32), torch.arange(16) % 10)
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False)
    result = Trainer(net, ds, None, cfg, tmp_path, loss_fn=MultiExitLoss(distill=1.0)).fit()
    assert result.steps == 2 and math.isfinite(result.history[-1]["train_loss"])
    for k in range(3):     # every stage and exit was trained
        assert not torch.equal(before[f"stages.{k}.pw.0.0.weight"], net.state_dict()[f"stages.{k}.pw.0.0.weight"])
        assert not torch.equal(before[f"heads.{k}.fc.weight"], net.state_dict()[f"heads.{k}.fc.weight"])
    from dyncnn.train.checkpoint import load_checkpoint
    loaded, _ = load_checkpoint(tmp_path / "last.safetensors")
    assert isinstance(loaded, MultiStageNetwork) and loaded.widths == WIDTHS
