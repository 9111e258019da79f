"""GFNet (glance and focus): executed early exit between steps, per-sample crops, the PPO stage, the budget protocol,
the three training stages, the large-canvas data and bad inputs. Tiny widths, 64x64 canvas, 16x16 patches."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic.budget import collect_exit_logits
from dyncnn.dynamic.calibration import calibrate
from dyncnn.train.recipes import fit_model
from dyncnn.train.recipes.glance import GlanceStagesConfig, fit_glance_stages, ppo_step
from dyncnn.dynamic.patches import patch_corners
from dyncnn.dynamic.policy import ExitPolicy, confidence
from dyncnn.models import create_model, list_models
from dyncnn.train import TrainConfig, load_checkpoint

TINY = dict(backbone="tiny_mobilenet", backbone_cfg={"widths": [8, 16]}, input_size=64, glance_size=16,
            patch_size=16, num_steps=3, feature_dim=16, hidden_dim=16, policy_dim=8)


def tiny_gfnet(seed: int = 0, images: torch.Tensor | None = None):
    """A random tiny GFNet whose BatchNorm statistics are set on ``images`` and whose classifier and actor are
    scaled up, so that confidences and patch centres spread (no sample sits within rounding of a threshold)."""
    torch.manual_seed(seed)
    m = create_model("gfnet", num_classes=10, in_chans=1, **TINY)
    with torch.no_grad():
        m.classifier_fc.weight.mul_(8)
        m.policy.actor.weight.mul_(8)
    if images is not None:
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = None
                mod.reset_running_stats()
        m.train()
        with torch.no_grad():
            m(images)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 64, 64, generator=g) * (torch.rand(12, 1, 1, 1, generator=g) + 0.2)
    return x


@pytest.fixture(scope="module")
def model(images):
    return tiny_gfnet(0, images)


def median_thresholds(model, x):
    """Per-step thresholds half-way between the two middle confidences (all but the last step): a mix of exit
    steps, and no sample within float rounding of a threshold (ONNX Runtime's logits differ by ~1e-6)."""
    with torch.no_grad():
        outs = model(x)
    mids = [confidence(o).sort().values[len(x) // 2 - 1:len(x) // 2 + 1] for o in outs[:-1]]
    return [float(m.mean()) for m in mids]


def test_registered_names():
    names = list_models("gfnet_*")
    for n in ("gfnet_mobilenet_v3_large", "gfnet_resnet50", "gfnet_densenet121", "gfnet_tiny_mnist"):
        assert n in names
    m = create_model("gfnet_mobilenet_v3_large")
    assert (m.cfg.input_size, m.cfg.patch_size, m.num_exits) == (224, 96, 5)
    assert type(m.local_encoder.backbone).__name__ == "MobileNet" and m.num_classes == 1000


def test_init_encoders_from_static_backbone():
    m = create_model("gfnet", num_classes=10, in_chans=1, **TINY)
    static = create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 16])
    m.init_encoders_from(static)
    x = torch.rand(2, 1, 16, 16)
    static.eval(), m.eval()
    for enc in m.encoders():
        torch.testing.assert_close(enc.backbone.forward_features(x), static.forward_features(x))


def test_glance_plot(model, images, tmp_path):
    from dyncnn.viz.glance_plots import plot_glance_patches
    th = median_thresholds(model, images)
    path = plot_glance_patches(model, images[:3], tmp_path / "patches.png", policy=th, labels=[1, 2, 3])
    assert path.exists() and path.stat().st_size > 1000


def test_forward_per_step_logits_and_random_patches_in_stage1(model, images):
    model.train()
    try:
        a, b = model(images), model(images)
    finally:
        model.eval()
    assert len(a) == 3 and all(o.shape == (12, 10) for o in a)
    torch.testing.assert_close(a[0], b[0])              # the glance does not depend on the patches
    assert not torch.allclose(a[1], b[1])                # stage I: random patch centres each call
    e1, e2 = model(images), model(images)                # eval: the policy's mean, deterministic
    for u, v in zip(e1, e2):
        torch.testing.assert_close(u, v)


def test_batched_infer_equals_per_sample(model, images):
    th = median_thresholds(model, images)
    r = model.infer(images, th)
    assert len(set(r.exit_index.tolist())) >= 2
    for i in range(len(images)):
        one = model.infer(images[i:i + 1], th)
        assert int(one.exit_index) == int(r.exit_index[i])
        assert int(one.macs) == int(r.macs[i])
        torch.testing.assert_close(one.logits[0], r.logits[i], rtol=1e-5, atol=1e-5)


def test_ledger_equals_flop_counter(model, images):
    th = median_thresholds(model, images)
    with FlopCounterMode(display=False) as counter:
        r = model.infer(images, th)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    cum = model.exit_macs(images[:1])
    assert r.macs.tolist() == [cum[k] for k in r.exit_index.tolist()]
    assert cum == sorted(cum) and cum[0] > 0
    # later steps really run on fewer rows: cheaper than everyone at full depth
    assert int(r.macs.sum()) < cum[-1] * len(images)


def test_crops_are_per_sample(model, images):
    """Step 2 of every sample equals a hand-made crop of that sample at the policy's centre."""
    p = model.cfg.patch_size
    centers = model.patch_centers(images)
    assert centers.shape == (12, 2, 2) and len(set(map(tuple, patch_corners(centers[:, 0], 64, 64, p).tolist()))) > 1
    step2 = model(images)[1]
    with torch.no_grad():
        h = model.classify(model.glance_features(images), images.new_zeros(12, model.cfg.hidden_dim))[1]
        for i in range(len(images)):
            top, left = patch_corners(centers[i:i + 1, 0], 64, 64, p)[0].tolist()
            patch = images[i:i + 1, :, top:top + p, left:left + p]
            logits, _ = model.classify(model.focus_features(patch), h[i:i + 1])
            torch.testing.assert_close(logits[0], step2[i], rtol=1e-5, atol=1e-5)


def test_exit_thresholds(model, images):
    outs = model(images)
    cum = model.exit_macs(images[:1])
    first = model.infer(images, [-math.inf, -math.inf])
    assert first.exit_index.eq(0).all() and first.macs.eq(cum[0]).all()
    torch.testing.assert_close(first.logits, outs[0], rtol=1e-5, atol=1e-5)
    full = model.infer(images, [math.inf, math.inf])
    assert full.exit_index.eq(2).all() and full.macs.eq(cum[-1]).all()
    torch.testing.assert_close(full.logits, outs[-1], rtol=1e-5, atol=1e-5)
    th = median_thresholds(model, images)
    r = model.infer(images, ExitPolicy(th))
    conf = torch.stack([confidence(o) for o in outs[:-1]])          # (2, N)
    meets = conf >= torch.tensor(th)[:, None]
    want = torch.where(meets[0], 0, torch.where(meets[1], 1, 2))
    assert r.exit_index.tolist() == want.tolist()
    for k in range(3):
        rows = r.exit_index == k
        torch.testing.assert_close(r.logits[rows], outs[k][rows], rtol=1e-5, atol=1e-5)


def test_ppo_step_changes_only_the_policy(images):
    m = tiny_gfnet(2, images)
    m.set_train_stage(2)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.Adam(m.policy.parameters(), lr=1e-2)
    y = torch.randint(0, 10, (12,))
    stats = ppo_step(m, images, y, opt, GlanceStagesConfig())
    assert math.isfinite(stats["loss"])
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("policy.") for k in changed)
    assert any(k.startswith("policy.actor") for k in changed) and any(k.startswith("policy.critic") for k in changed)
    assert not any(p.requires_grad for n, p in m.named_parameters() if not n.startswith("policy."))


def test_budget_protocol_and_calibration(model, images):
    data = [(x, int(y)) for x, y in zip(images, torch.arange(12) % 10)]
    logits, targets = collect_exit_logits(model, data)
    assert logits.shape == (3, 12, 10)
    cum = model.exit_macs(images[:1])
    record = calibrate(model, data, target_fraction=0.8, temperature_scaling=False)
    assert record["num_exits"] == 3 and record["exit_macs"] == cum
    policy = ExitPolicy(record["thresholds"], record["criterion"], record["temperatures"])
    r = model.infer(images, policy)
    assert float(r.macs.double().mean()) == pytest.approx(record["val_mean_macs"])
    assert record["val_mean_macs"] <= 0.8 * cum[-1] + 1


def test_cli_calibrate_and_eval_budget(tmp_path, capsys):
    """`dyncnn calibrate` and `dyncnn eval --budget/--anytime` on a GFNet checkpoint, unchanged."""
    from dyncnn.cli import main
    from dyncnn.data import MNISTDigits
    from dyncnn.train import save_checkpoint
    val = MNISTDigits("val")          # 28x28 digits: the 16x16 patches fit, and nothing has to be rendered
    m = tiny_gfnet(3, torch.stack([val[i][0] for i in range(64)]))
    ckpt = tmp_path / "gf.safetensors"
    save_checkpoint(ckpt, m, extra={"data": {"name": "mnist", "seed": 0}})
    assert main(["calibrate", str(ckpt), "--budget", "0.8"]) == 0
    assert (tmp_path / "thresholds.json").exists()
    assert main(["eval", str(ckpt), "--split", "val", "--anytime", "--budget", str(tmp_path / "thresholds.json"),
                 "--json"]) == 0
    out = capsys.readouterr().out
    import json
    report = json.loads(out[out.index("{"):])
    assert len(report["anytime"]) == 3 and sum(report["budget"]["exit_histogram"]) == 500
    assert report["budget"]["mean_macs"] <= report["budget"]["full_macs"]


def test_fit_stages_checkpoints_and_resume(tmp_path, images):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, 1, 64, 64, generator=g)
    data = [(x[i], int(i % 10)) for i in range(32)]
    m = create_model("gfnet", num_classes=10, in_chans=1, **TINY)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2, optimizer="adamw", progress=False)
    extra = {"gfnet": {"ppo_epochs": 1, "finetune_epochs": 1}}
    r = fit_model(m, data, data[:16], cfg, tmp_path, extra=extra)
    assert r.steps == 6 and [h["stage"] for h in r.history] == [1, 2, 3]
    for sub in ("stage1", "stage2", "stage3"):
        assert (tmp_path / sub / "last.safetensors").exists()
    # stage III changed the classifier and the local encoder only: the global encoder and the policy are as
    # stage II left them
    s2, _ = load_checkpoint(tmp_path / "stage2" / "last.safetensors")
    final, meta = load_checkpoint(tmp_path / "last.safetensors")
    for (name, a), b in zip(s2.state_dict().items(), final.state_dict().values()):
        if not name.startswith(("classifier_", "local_encoder.")):
            assert torch.equal(a, b), name
    assert not torch.equal(s2.classifier_fc.weight, final.classifier_fc.weight)
    assert not torch.equal(s2.local_encoder.proj.weight, final.local_encoder.proj.weight)
    final.eval()
    torch.testing.assert_close(final.infer(x[:4]).logits, m.eval().infer(x[:4]).logits)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    again = fit_glance_stages(m, data, data[:16], cfg, tmp_path, resume=True, extra=extra)
    assert [h["stage"] for h in again.history] == [1, 2, 3]
    for k, v in m.state_dict().items():        # every stage had finished: resuming trains nothing
        assert torch.equal(v, weights[k]), k


def test_large_canvas_data():
    from dyncnn.data.canvas import LARGE_CANVAS, large_canvas_mnist
    ds = large_canvas_mnist("val", canvas=48, clutter=1)
    assert ds[0][0].shape == (1, 48, 48) and ds.config.min_scale == LARGE_CANVAS["min_scale"]
    with pytest.raises(ValueError, match="smaller than the patch size 64"):
        large_canvas_mnist("val", canvas=48, patch_size=64)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="patch_size 96 is larger than the 64x64 image"):
        create_model("gfnet", **{**TINY, "patch_size": 96})
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        create_model("gfnet", **{**TINY, "num_steps": 1})
    with pytest.raises(ValueError, match="unknown options"):
        create_model("gfnet", **TINY, patch=16)
    with pytest.raises(ValueError, match="patch size 16 is larger than the 8x8 input"):
        model.infer(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="expected 1 input channels"):
        model.infer(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="expected 2 thresholds"):
        model.infer(torch.rand(2, 1, 64, 64), [0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="train stage must be 1, 2 or 3"):
        model.set_train_stage(4)


def test_cli_export_and_bench_glance_bundle(tmp_path, capsys):
    """`dyncnn export` writes the glance bundle, `load_bundle` reads it, `dyncnn bench` times eager vs the driver.
    Issue 14, bug 2: both ignored --thresholds / --budget for GFNet (not a MultiExitNetwork), so the bundle always
    ran every step; now the bundle's decisions follow the given policy and equal eager ``infer`` under it."""
    import json

    from dyncnn.cli import main
    from dyncnn.data import MNISTDigits
    from dyncnn.dynamic.calibration import load_thresholds
    from dyncnn.export import load_bundle
    from dyncnn.train import save_checkpoint
    val = MNISTDigits("val")
    m = tiny_gfnet(4, torch.stack([val[i][0] for i in range(64)]))
    ckpt = tmp_path / "gf.safetensors"
    save_checkpoint(ckpt, m, extra={"data": {"name": "mnist", "seed": 0, "input_size": 28}})
    x = torch.stack([val[i][0] for i in range(64)])
    thresholds = tmp_path / "elsewhere" / "th.json"
    assert main(["calibrate", str(ckpt), "--budget", "0.6", "--out", str(thresholds)]) == 0
    # the same file with thresholds that no image sits within ONNX Runtime's rounding of (temperature 1)
    record = json.loads(thresholds.read_text())
    record.update(thresholds=median_thresholds(m.eval(), x), temperatures=[1.0] * 3)
    thresholds.write_text(json.dumps(record))
    policy, _ = load_thresholds(thresholds, m)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "bundle"), "--thresholds", str(thresholds)]) == 0
    assert "glance" in capsys.readouterr().out
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.policy.thresholds == pytest.approx(policy.thresholds)
    m.eval()
    eager, every_step = m.infer(x, policy), m.infer(x)
    r = bundle.run(x)
    assert torch.equal(r.exit_index, eager.exit_index) and torch.equal(r.macs, eager.macs)
    assert not torch.equal(r.exit_index, every_step.exit_index)      # the policy is really applied
    assert float(r.macs.double().mean()) < float(every_step.macs.double().mean())
    assert main(["bench", str(ckpt), "--budget", "0.6", "--images", "8", "--batch-sizes", "1", "4",
                 "--min-time", "0.01", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["kind"] == "glance" and report["dynamic"]["parity"]["same_exit"] == 8
    assert report["policy_source"].startswith("calibrated") and math.isfinite(
        report["dynamic"]["policy"]["thresholds"][0])
    assert report["dynamic"]["exit_histogram"][-1] < 8                 # some images leave before the last step
    assert {(s["backend"], s["batch"]) for s in report["dynamic"]["speedups"]} == {
        ("eager", 1), ("eager", 4), ("onnxruntime", 1), ("onnxruntime", 4)}


def test_policy_runs_only_for_rows_that_go_on(model, images):
    """The policy (GRU + actor) runs at the start of a focus step, after the exit decision: it sees only the rows
    that continue, and the glance's MACs do not include it."""
    th = median_thresholds(model, images)
    model.infer(images, th)              # the executor measures each stage's MACs once per shape: warm it up
    seen = []
    hook = model.policy.rnn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    try:
        r = model.infer(images, th)
    finally:
        hook.remove()
    assert seen == [int((r.exit_index >= k).sum()) for k in (1, 2)] and seen[0] < len(images)
    with FlopCounterMode(display=False) as counter:
        model.glance_step(images[:1], None)
    assert model.exit_macs(images[:1])[0] == counter.get_total_flops() // 2
    with FlopCounterMode(display=False) as counter:
        model.policy(torch.zeros(1, 16), torch.zeros(1, 2), torch.zeros(1, 8))
    assert counter.get_total_flops() > 0        # the policy has a cost, charged only to the rows that run it


def test_gru_is_one_onnx_op_and_counted():
    """GRUStep exports as a single ONNX GRU op and FlopCounterMode counts its two matrix products."""
    import io

    import onnx

    from dyncnn.models.gfnet import GRUStep
    cell = GRUStep(12, 8).eval()
    x, h = torch.rand(3, 12), torch.rand(3, 8)
    with FlopCounterMode(display=False) as counter:
        out = cell(x, h)
    assert counter.get_total_flops() // 2 == 3 * 3 * 8 * (12 + 8)
    ref = torch.nn.GRUCell(12, 8)
    ref.load_state_dict({k.replace("_l0", ""): v for k, v in cell.gru.state_dict().items()})
    torch.testing.assert_close(out, ref(x, h))
    buf = io.BytesIO()
    torch.onnx.export(cell, (x, h), buf, dynamo=False, input_names=["x", "h"], output_names=["o"])
    ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node]
    assert ops.count("GRU") == 1 and not {"Sigmoid", "Tanh"} & set(ops)


def test_locator_and_supervised_policy_warm_start(images):
    """``locate`` is a soft-argmax in image coordinates; ``locate_step`` trains only the policy (locator, GRU,
    actor, skip) towards known object centres."""
    from dyncnn.train.recipes.glance import locate_step
    m = tiny_gfnet(6, images)
    fmap = torch.full((2, 16, 3, 3), -30.0)
    fmap[0, :, 0, 2] = fmap[1, :, 2, 1] = 30.0                       # a single hot cell per sample
    with torch.no_grad():
        m.policy.saliency.weight.fill_(1.0)
        m.policy.saliency.bias.zero_()
        where = m.policy.locate(fmap, torch.tensor([[0.25, 0.5]] * 2), 0.5)
    torch.testing.assert_close(where, torch.tensor([[0.25 + 0.5 / 6, 0.5 + 2.5 / 6], [0.25 + 2.5 / 6, 0.5 + 0.25]]))
    m.set_train_stage(2)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.Adam(m.policy.parameters(), lr=1e-2)
    centers = torch.rand(12, 2)
    stats = locate_step(m, images, centers, opt)
    assert math.isfinite(stats["loss"]) and stats["pixel_error"] >= 0
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], m.state_dict()[k])}
    assert changed == {"saliency", "rnn", "actor", "skip"}       # not the critic, nothing outside the policy


def test_digit_centers_and_stage2_warm_start(tmp_path):
    from torch.utils.data import Subset

    from dyncnn.data.canvas import digit_centers, large_canvas_mnist
    ds = large_canvas_mnist("val", canvas=64, clutter=0)
    c = digit_centers(ds)
    assert c.shape == (len(ds), 2) and bool(((c > 0) & (c < 1)).all())
    for i in (0, 7):                       # the centre pixel lies inside the rendered digit's bounding box
        top, left = ds.positions[i].tolist()
        size = round(float(ds.scales[i]) * 64)
        assert top <= float(c[i, 0]) * 64 <= top + size and left <= float(c[i, 1]) * 64 <= left + size
        assert float(ds[i][0][0, top:top + size, left:left + size].sum()) > 0
    torch.testing.assert_close(digit_centers(Subset(ds, [7, 0])), c[[7, 0]])
    with pytest.raises(TypeError, match="ScaledMNIST"):
        digit_centers([(torch.zeros(1, 64, 64), 0)])
    m = create_model("gfnet", num_classes=10, in_chans=1, **TINY)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2, optimizer="adamw", progress=False)
    sub = Subset(ds, range(32))
    r = fit_model(m, sub, Subset(ds, range(16)), cfg, tmp_path, extra={"gfnet": {"ppo_epochs": 1,
                                                                                  "finetune_epochs": 1}})
    stage2 = [h for h in r.history if h["stage"] == 2]
    assert "locate_pixel_error" in stage2[0] and "train_prob_gain" in stage2[1]
