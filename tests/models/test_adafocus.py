"""AdaFocus: executed frame-by-frame inference, its ledger, exits over time, PPO, baselines, bad inputs."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.data.video import MovingDigits
from dyncnn.dynamic.calibration import calibrate
from dyncnn.dynamic.executor import measure_macs
from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.train.recipes import fit_model
from dyncnn.train.recipes.temporal import AdaFocusStages, ppo_step
from dyncnn.models.registry import create_model, list_models
from dyncnn.train.checkpoint import load_checkpoint
from dyncnn.train.trainer import TrainConfig

T = 8
TINY = dict(num_classes=10, in_chans=1, frames=T, patch_size=16, glance_size=16, hidden=16, policy_hidden=8,
            global_cfg={"widths": [4, 8]}, local_cfg={"widths": [4, 8, 16]})


def model(**kw):
    torch.manual_seed(0)
    m = create_model("adafocus_tiny", **{**TINY, **kw})
    with torch.no_grad():       # a policy that moves: non-zero actor head
        m.actor.head.weight.normal_(0, 1.0)
    return m.eval()


def clips(n=6, seed=0):
    return torch.rand(n, T, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def median_thresholds(m, x):
    """Per-step thresholds between two samples' confidences, so that about half exit at each step."""
    with torch.no_grad():
        conf = torch.stack([torch.softmax(z, 1).max(1).values for z in m(x)])
    return [float(c.quantile(0.5)) for c in conf[:-1]]


def test_registered_names():
    names = list_models("adafocus_*")
    assert {"adafocus_tiny", "adafocus_mobilenet_v2", "adafocus_baseline_allframes",
            "adafocus_baseline_uniform"} <= set(names)


def test_training_forward_gives_logits_per_frame_and_eval_forward_is_the_executed_path():
    m = model()
    x = clips()
    m.train()
    out = m(x)
    assert len(out) == T and all(o.shape == (6, 10) for o in out)
    m.eval()
    with torch.no_grad():
        dense = m(x)
    r = m.infer(x)
    assert torch.allclose(r.logits, dense[-1], atol=1e-5)
    assert r.exit_index.tolist() == [T - 1] * 6 and bool((r.choices == 1).all())


def test_batched_infer_equals_per_sample_infer():
    m = model()
    x = clips()
    policy = median_thresholds(m, x)
    r = m.infer(x, policy)
    assert 0 < int((r.exit_index < T - 1).sum()) and len(set(r.exit_index.tolist())) > 1   # mixed exits
    for i in range(len(x)):
        s = m.infer(x[i:i + 1], policy)
        assert int(s.exit_index[0]) == int(r.exit_index[i]) and int(s.macs[0]) == int(r.macs[i])
        assert torch.allclose(s.logits[0], r.logits[i], atol=1e-5)
        assert torch.equal(s.choices[0], r.choices[i])
        assert torch.allclose(s.centers[0], r.centers[i], atol=1e-6, equal_nan=True)


def test_ledger_equals_flop_counter_of_the_same_call():
    m = model()
    x = clips()
    policy = median_thresholds(m, x)
    counter = FlopCounterMode(display=False)
    with counter:
        r = m.infer(x, policy)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    assert int((r.exit_index < T - 1).sum()) > 0


def test_exits_over_time():
    m = model()
    x = clips()
    cum = m.exit_macs(x[:1])
    step = cum[0]
    assert cum == [step * (k + 1) for k in range(T)] and m.num_exits == T
    # one step is the glance, the actor, the local network on the patch and the classifier: no full-frame pass
    frame = x[:1, 0]
    assert step < measure_macs(m.local, frame) + measure_macs(m.glance, frame)
    first = m.infer(x, [-math.inf] * (T - 1))
    assert first.exit_index.tolist() == [0] * 6 and first.macs.tolist() == [step] * 6
    r = m.infer(x, median_thresholds(m, x))
    assert r.macs.tolist() == [cum[k] for k in r.exit_index.tolist()]
    assert r.choices.sum(1).tolist() == (r.exit_index + 1).float().tolist()
    for i, k in enumerate(r.exit_index.tolist()):           # centres recorded for the frames read only
        assert not torch.isnan(r.centers[i, :k + 1]).any() and torch.isnan(r.centers[i, k + 1:]).all()
        assert bool(((r.centers[i, :k + 1] >= 0) & (r.centers[i, :k + 1] <= 1)).all())


def test_msdnet_protocol_calibrates_frames_as_exits():
    m = model()
    val = MovingDigits("val", frames=T, canvas=32, limit=24)
    record = calibrate(m, val, target_fraction=0.5)
    full = m.exit_macs(val[0][0][None])[-1]
    assert record["num_exits"] == T and record["val_mean_macs"] <= 0.5 * full
    policy = ExitPolicy(record["thresholds"], record["criterion"], record["temperatures"])
    x = torch.stack([val[i][0] for i in range(len(val))])
    r = m.infer(x, policy)                                    # the executed run reproduces the offline estimate
    assert float(r.macs.double().mean()) == pytest.approx(record["val_mean_macs"], rel=1e-6)


def test_ppo_step_changes_only_the_policy():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.Adam(m.policy_parameters(), lr=1e-2)
    for p in m.parameters():
        p.requires_grad_(False)
    for p in m.policy_parameters():
        p.requires_grad_(True)
    stats = ppo_step(m, opt, clips(), torch.arange(6) % 10, AdaFocusStages(ppo_updates=2))
    assert math.isfinite(stats["reward"]) and math.isfinite(stats["loss"])
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("actor.", "critic.")) for k in changed)
    assert any(k.startswith("actor.") for k in changed)


def test_differentiable_policy_gets_gradients_random_patches_do_not():
    m = model(policy="differentiable").train()
    assert m.train_mode == "differentiable"
    sum(o.sum() for o in m(clips(2))).backward()
    assert m.actor.head.weight.grad is not None and m.actor.head.weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    m.train_mode = "random"
    sum(o.sum() for o in m(clips(2))).backward()
    assert m.actor.head.weight.grad is None


def test_baselines_every_frame_and_uniform_sampling():
    torch.manual_seed(0)
    cfg = dict(num_classes=10, in_chans=1, frames=T, backbone_cfg={"widths": [4, 8, 16]})
    full = create_model("adafocus_baseline_allframes", **cfg).eval()
    uni = create_model("adafocus_baseline_uniform", sample_frames=2, **cfg).eval()
    uni.load_state_dict(full.state_dict())
    x = clips(3)
    bb = full.backbone
    with torch.no_grad():
        want = bb.forward_head(torch.stack([bb.forward_features(x[:, t]) for t in range(T)]).mean(0))
        assert torch.allclose(full(x), want, atol=1e-5)
        picked = uni.frame_index.tolist()
        assert picked == [2, 6]
        want_u = bb.forward_head(torch.stack([bb.forward_features(x[:, t]) for t in picked]).mean(0))
        assert torch.allclose(uni(x), want_u, atol=1e-5)
    per_frame = measure_macs(bb.forward_features, x[:1, 0])
    assert measure_macs(full, x[:1]) - measure_macs(uni, x[:1]) == (T - 2) * per_frame


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 1, 32, 32), "5-D"),
    (torch.rand(2, T + 1, 1, 32, 32), f"expected {T} frames"),
    (torch.rand(2, T, 3, 32, 32), "channels"),
    (torch.rand(2, T, 1, 12, 12), "patch"),
    (torch.rand(0, T, 1, 32, 32), "non-empty"),
    (torch.full((1, T, 1, 32, 32), float("nan")), "finite"),
])
def test_bad_inputs(bad, match):
    m = model()
    with pytest.raises(ValueError, match=match):
        m.infer(bad)
    with pytest.raises(ValueError, match=match):
        m(bad)
    base = create_model("adafocus_baseline_allframes", num_classes=10, frames=T,
                        backbone_cfg={"widths": [4, 8, 16]})
    if bad.shape[-1] >= 16:
        with pytest.raises(ValueError, match=match):
            base(bad)


def test_bad_configuration():
    with pytest.raises(ValueError, match="ppo"):
        model(policy="greedy")
    with pytest.raises(ValueError, match="thresholds"):
        model().infer(clips(1), [0.5] * 3)
    with pytest.raises(ValueError, match="sample_frames"):
        create_model("adafocus_baseline_uniform", frames=T, sample_frames=T + 1)


def test_fit_stages_writes_a_checkpoint_that_rebuilds(tmp_path):
    m = model()
    data = MovingDigits("train", frames=T, canvas=32, limit=16)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, optimizer="adamw", progress=False)
    result = fit_model(m, data, data, cfg, tmp_path, False, {"data": {"name": "moving_digits"}},
                       stages=AdaFocusStages(random_epochs=1, policy_epochs=1, finetune_epochs=1))
    assert [h["stage"] for h in result.history] == [1, 2, 3] and math.isfinite(result.final_val_acc)
    loaded, meta = load_checkpoint(tmp_path)
    x = clips(2)
    assert torch.equal(loaded.eval().infer(x).logits, m.eval().infer(x).logits)


def test_plots_of_frames_patches_and_usage(tmp_path):
    from dyncnn.viz.temporal_plots import plot_focus_strips, plot_frame_usage
    m = model()
    data = MovingDigits("val", frames=T, canvas=32, limit=3)
    x = torch.stack([data[i][0] for i in range(3)])
    r = m.infer(x, median_thresholds(m, x))
    p1 = plot_focus_strips(x, r, m.patch_size, tmp_path / "strips.png", data.targets, data.informative)
    p2 = plot_frame_usage(r, tmp_path / "usage.png")
    assert p1.stat().st_size > 1000 and p2.stat().st_size > 1000
    with pytest.raises(ValueError, match="choices"):
        plot_focus_strips(x[:2], r, m.patch_size, tmp_path / "bad.png")
