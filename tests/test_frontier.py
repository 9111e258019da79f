"""The accuracy-latency frontier: front arithmetic, selection on validation, latency budgets, the resolution
cascade and its bundle, gradient equilibrium, and a tiny end-to-end ``frontier`` run."""
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dyncnn
from dyncnn.cli import main
from dyncnn.dynamic.calibration import calibrate, check_latency_table
from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.errors import DyncnnError
from dyncnn.export import export_bundle, load_bundle
from dyncnn.export.runtime import BundleError, record_stage_latency, stage_latency_table
from dyncnn.frontier import (Point, best_on_validation, front_latency_at, paired_lower_bound, pareto_front,
                             select_on_validation, speedup_at_equal_accuracy)
from dyncnn.train.checkpoint import load_checkpoint, save_checkpoint


# -- front arithmetic -------------------------------------------------------------------------------------------

def test_pareto_front_drops_dominated_points_and_sorts_by_latency():
    pts = [Point(2.0, 0.90, "b"), Point(1.0, 0.80, "a"), Point(3.0, 0.85, "dominated"), Point(4.0, 0.95, "c"),
           Point(1.5, 0.80, "slower, same accuracy")]
    assert [p.label for p in pareto_front(pts)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="positive finite latency"):
        pareto_front([Point(0.0, 0.5)])
    with pytest.raises(ValueError, match="at least one"):
        pareto_front([])


def test_front_latency_is_log_linear_between_points_and_clamped_below():
    front = [Point(1.0, 0.80), Point(4.0, 0.90)]
    assert front_latency_at(front, 0.70) == 1.0                        # the cheapest static model already does
    assert front_latency_at(front, 0.80) == 1.0
    assert math.isclose(front_latency_at(front, 0.85), 2.0)            # geometric midpoint of 1 and 4
    assert math.isclose(front_latency_at(front, 0.90), 4.0)
    with pytest.raises(ValueError, match="above the best static accuracy"):
        front_latency_at(front, 0.91)


def test_speedup_compares_at_the_dynamic_accuracy_capped_at_the_best_static():
    front = [Point(1.0, 0.80), Point(4.0, 0.90)]
    sp = speedup_at_equal_accuracy(front, Point(1.0, 0.92))            # more accurate than A*: read at A*
    assert sp.speedup == 4.0 and sp.compared_at == 0.90 and math.isclose(sp.accuracy_gap, 0.02)
    sp = speedup_at_equal_accuracy(front, Point(1.0, 0.85))            # less accurate: the front at 0.85
    assert math.isclose(sp.speedup, 2.0) and math.isclose(sp.accuracy_gap, -0.05)
    assert speedup_at_equal_accuracy(front, Point(8.0, 0.90)).speedup == 0.5


def test_selection_reads_validation_figures_only():
    cands = [{"val_accuracy": 0.91, "val_cost": 3.0, "test_accuracy": 0.5},
             {"val_accuracy": 0.90, "val_cost": 2.0, "test_accuracy": 0.99},
             {"val_accuracy": 0.95, "val_cost": 5.0, "test_accuracy": 0.1},
             {"val_accuracy": 0.80, "val_cost": 1.0, "test_accuracy": 1.0}]
    assert select_on_validation(cands, 0.905)["val_cost"] == 3.0
    assert select_on_validation(cands, 0.90)["val_cost"] == 2.0
    assert select_on_validation(cands, 0.99)["val_accuracy"] == 0.95     # none reaches: the most accurate
    with pytest.raises(ValueError):
        select_on_validation([], 0.9)


def test_the_best_static_model_on_validation_breaks_an_accuracy_tie_by_the_lower_validation_loss():
    models = {"tiny-M": {"val_accuracy": 0.938, "val_loss": 0.2443, "test_accuracy": 0.99},
              "mnv3-small": {"val_accuracy": 0.938, "val_loss": 0.2391, "test_accuracy": 0.10},
              "tiny-XL /2": {"val_accuracy": 0.920, "val_loss": 0.1000}}
    assert best_on_validation(models) == "mnv3-small"          # the tie goes to the loss, never to test figures
    models["tiny-M"]["val_accuracy"] = 0.939                   # accuracy first: a lower loss does not outrank it
    assert best_on_validation(models) == "tiny-M"
    old = {"a": {"val_accuracy": 0.9}, "b": {"val_accuracy": 0.9}, "c": {"val_accuracy": 0.8}}
    assert best_on_validation(old) == "a"                      # results without losses: the first of the tied
    with pytest.raises(ValueError, match="no models"):
        best_on_validation({})


def test_paired_lower_bound_is_the_gap_less_z_standard_errors_of_the_discordant_pairs():
    # 50 wins, 30 losses on 1,000 images: gap 0.02, se^2 = (0.08 - 0.02^2) / 1000
    se = math.sqrt((0.08 - 0.0004) / 1000)
    assert math.isclose(paired_lower_bound(0.02, 50, 30, 1000, 1.5), 0.02 - 1.5 * se)
    assert paired_lower_bound(0.02, 50, 30, 1000, 0.0) == 0.02
    assert paired_lower_bound(0.0, 0, 0, 1000, 3.0) == 0.0          # agrees with the reference everywhere
    with pytest.raises(ValueError, match="wins"):
        paired_lower_bound(0.0, 600, 500, 1000, 1.0)
    with pytest.raises(ValueError, match="z must be >= 0"):
        paired_lower_bound(0.0, 1, 1, 1000, -1.0)
    with pytest.raises(ValueError, match="needs"):      # the paired rule needs the counts
        select_on_validation([{"val_accuracy": 0.9, "val_cost": 1.0}], 0.9, z=1.0)


def test_paired_rule_rejects_the_lucky_candidate_and_keeps_a_truly_better_one():
    """Two cascades ending with the reference (the best static model, 0.900 on 1,000 validation images): the
    cheap one's first member is right and wrong on other images than the reference, 50 won and 49 lost (0.901: a
    coin toss that came up above the target); the dearer one's first member fixes 30 of the reference's errors
    and adds 5 (0.925). The point rule takes the cheap lucky one; the paired bound takes the truly better one."""
    from dyncnn.dynamic.budget import exit_scores
    from dyncnn.frontier.search import with_paired_counts
    n = 1000
    y = torch.arange(n) % 10
    ref_right = torch.arange(n) < 900

    def logits_right_on(right):
        logits = torch.zeros(n, 10)
        logits[torch.arange(n), torch.where(right, y, (y + 1) % 10)] = 5.0
        return logits

    def first_member(wins, losses):
        right = ref_right.clone()
        right[:losses] = False                   # wrong where the reference is right
        right[900:900 + wins] = True             # right where the reference is wrong
        return logits_right_on(right)

    def cascade(first, cost_first):
        logits = torch.stack([first, logits_right_on(ref_right)])
        scores, correct = exit_scores(logits), logits.argmax(-1) == y
        cands = [{"thresholds": [0.0], "val_cost": cost_first},                    # every image leaves at once
                 {"thresholds": [math.inf], "val_cost": cost_first + 10.0}]        # none does: the reference
        for c in cands:
            c["val_accuracy"] = float(correct[0 if c["thresholds"][0] == 0.0 else 1].double().mean())
        return with_paired_counts(cands, scores, correct, ref_right)
    lucky, better = cascade(first_member(50, 49), 1.0), cascade(first_member(30, 5), 3.0)
    assert (lucky[0]["val_wins"], lucky[0]["val_losses"], lucky[0]["val_n"]) == (50, 49, 1000)
    assert (lucky[1]["val_wins"], lucky[1]["val_losses"]) == (0, 0)
    assert (better[0]["val_wins"], better[0]["val_losses"]) == (30, 5)
    target = 0.9
    assert select_on_validation(lucky + better, target, z=0.0) is lucky[0]     # the point rule: the lucky one
    assert select_on_validation(lucky + better, target, z=1.0) is better[0]    # the paired bound: the better one
    assert select_on_validation(lucky, target, z=1.0) is lucky[1]              # alone: full depth, never the coin
    assert select_on_validation(better, target, z=5.0) is better[1]     # 5 se (0.029) exceed its gap: full depth


# -- latency budgets --------------------------------------------------------------------------------------------

def _tiny_multi_exit():
    return dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", backbone_cfg={"widths": [8, 16, 32]},
                               num_classes=10, in_chans=1, example_size=32).eval()


def _val_set(n=120, size=32):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return list(zip(x, y.tolist()))


def test_latency_budget_solves_on_the_given_exit_latencies():
    net, val = _tiny_multi_exit(), _val_set()
    table = [1.0, 2.0, 4.0]           # ms of leaving at exits 0, 1, 2
    rec = calibrate(net, val, target_ms=2.5, latency_ms=table)
    assert rec["val_predicted_ms"] <= 2.5
    fractions = rec["val_exit_fractions"]
    assert math.isclose(rec["val_predicted_ms"], sum(f * t for f, t in zip(fractions, table)))
    assert rec["latency_ms"] == table and rec["target_ms"] == 2.5
    # a looser budget never predicts a slower operating point than it allows, and uses more of it
    loose = calibrate(net, val, target_ms=3.5, latency_ms=table)
    assert rec["val_predicted_ms"] <= loose["val_predicted_ms"] <= 3.5
    with pytest.raises(DyncnnError, match="feasible range"):
        calibrate(net, val, target_ms=0.5, latency_ms=table)
    with pytest.raises(DyncnnError, match="measured latency of each exit"):
        calibrate(net, val, target_ms=2.0)
    for bad in ([1.0, 2.0], [1.0, 0.5, 2.0], [1.0, float("nan"), 2.0], [0.0, 1.0, 2.0]):
        with pytest.raises(DyncnnError, match="non-decreasing"):
            check_latency_table(bad, 3)


def test_stage_latencies_are_measured_and_stored_in_the_manifest(tmp_path):
    net = _tiny_multi_exit()
    export_bundle(net, tmp_path / "b", (1, 32, 32))
    bundle = load_bundle(tmp_path / "b")
    ms = bundle.stage_latency_ms(np.random.rand(4, 1, 32, 32).astype(np.float32), repeats=1)
    assert len(ms) == 3 and all(t > 0 for t in ms)
    manifest = record_stage_latency(tmp_path / "b", ms, threads=1)
    assert stage_latency_table(manifest, 1) == pytest.approx(np.cumsum(ms).tolist())
    assert stage_latency_table(manifest, 2) is None
    load_bundle(tmp_path / "b")                   # the manifest stays valid
    with pytest.raises(BundleError, match="expected 3 stage latencies"):
        record_stage_latency(tmp_path / "b", ms[:2], threads=1)


def test_cli_calibrate_budget_ms_uses_the_bundle_latencies(tmp_path, capsys):
    out = tmp_path / "me"
    assert main(["train", "--model", "multi_exit", "--cfg", "backbone=tiny_mobilenet",
                 'backbone_cfg={"widths": [8, 16, 32]}', "--dataset", "mnist", "--epochs", "1",
                 "--out", str(out)]) == 0
    ckpt = str(out / "last.safetensors")
    model, _ = load_checkpoint(ckpt)
    export_bundle(model, tmp_path / "bundle", (1, 28, 28))
    record_stage_latency(tmp_path / "bundle", [0.1, 0.1, 0.2], threads=1)      # cumulative 0.1, 0.2, 0.4 ms
    capsys.readouterr()
    assert main(["calibrate", ckpt, "--budget-ms", "0.3", "--bundle", str(tmp_path / "bundle")]) == 0
    assert "exit latencies from" in capsys.readouterr().out
    rec = json.loads((out / "thresholds.json").read_text())
    assert rec["latency_ms"] == pytest.approx([0.1, 0.2, 0.4]) and rec["val_predicted_ms"] <= 0.3
    assert main(["calibrate", ckpt, "--budget-ms", "0.05", "--bundle", str(tmp_path / "bundle")]) == 2
    assert "feasible range" in capsys.readouterr().err
    assert main(["calibrate", ckpt, "--budget-ms", "-1"]) == 2


# -- resolution cascade -----------------------------------------------------------------------------------------

def test_resized_network_sees_the_area_downsampled_image():
    net = dyncnn.create_model("resized", backbone="tiny_mobilenet", factor=2, backbone_cfg={"widths": [8, 16]},
                              num_classes=10, in_chans=1).eval()
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(net(x), net.backbone(F.avg_pool2d(x, 2)))
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.rand(1, 1, 33, 33))
    with pytest.raises(ValueError, match="positive integer"):
        dyncnn.create_model("resized", factor=0)


def _cascade():
    return dyncnn.create_model("cascade", members=[
        {"name": "resized", "backbone": "tiny_mobilenet", "factor": 2, "backbone_cfg": {"widths": [8, 16]}},
        {"name": "tiny_mobilenet", "widths": [8, 16, 32]}], num_classes=10, in_chans=1).eval()


def test_resolution_cascade_checkpoint_round_trip(tmp_path):
    net = _cascade()
    save_checkpoint(tmp_path / "c.safetensors", net)
    again, _ = load_checkpoint(tmp_path / "c.safetensors")
    again.eval()
    x = torch.rand(4, 1, 32, 32)
    for a, b in zip(net(x), again(x)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="at least two members"):
        dyncnn.create_model("cascade", members=[{"name": "tiny_mobilenet"}])


def test_resolution_cascade_bundle_makes_eager_decisions(tmp_path):
    net = _cascade()
    x = torch.rand(64, 1, 32, 32)
    conf = torch.softmax(net(x)[0], 1).max(1).values
    policy = ExitPolicy([float(conf.median())], "max_prob", [1.0, 1.0])
    eager = net.infer(x, policy)
    assert 0 < int((eager.exit_index == 0).sum()) < 64          # both exits taken: the check is not trivial
    export_bundle(net, tmp_path / "b", (1, 32, 32))
    bundle = load_bundle(tmp_path / "b")
    res = bundle.run(x, policy)
    assert torch.equal(res.exit_index, eager.exit_index) and torch.equal(res.macs, eager.macs)
    torch.testing.assert_close(res.logits, eager.logits, rtol=1e-4, atol=1e-5)
    singles = [bundle.run(x[i:i + 1], policy) for i in range(8)]          # batch 1 takes the no-copy path
    assert [int(r.exit_index) for r in singles] == eager.exit_index[:8].tolist()
    # the small member costs a quarter of the input: its exit is much cheaper than the full network's
    cum = net.exit_macs(x[:1])
    assert cum[0] * 3 < cum[1] - cum[0]


# -- gradient equilibrium ---------------------------------------------------------------------------------------

def test_gradient_equilibrium_rescales_the_trunk_gradient():
    net = _tiny_multi_exit().train()
    for m in net.modules():                      # BatchNorm in eval: the same forward with and without GE
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x, y = torch.rand(4, 1, 32, 32), torch.randint(0, 10, (4,))
    trunk = next(net.stages[0].parameters())

    def grad(loss_of):
        net.zero_grad()
        loss_of(net(x)).backward()
        return trunk.grad.clone()
    g = [grad(lambda o, k=k: F.cross_entropy(o[k], y)) for k in range(3)]
    net.gradient_equilibrium = True
    got = grad(lambda o: sum(F.cross_entropy(z, y) for z in o))
    # K = 3 exits: stage 0's gradient is 1/3 from exit 0, and 2/3 of what comes back from later stages, where
    # stage 1 splits it again into 1/2 (exit 1) and 1/2 (exit 2)
    torch.testing.assert_close(got, g[0] / 3 + (2 / 3) * (g[1] / 2 + g[2] / 2))
    net.eval()
    with torch.no_grad():
        assert [o.shape for o in net(x)] == [(4, 10)] * 3       # inference is unchanged


# -- the whole run ----------------------------------------------------------------------------------------------

def _tiny_settings(out, **kw):
    from dyncnn.frontier.runner import FrontierSettings, _fused, _stagewise, _static, _trained
    models = {"static": [_static("small /2", "tiny_mobilenet", 2, widths=[8, 16]),
                         _static("big", "tiny_mobilenet", 1, widths=[8, 16, 32])],
              "dynamic": [{"label": "cascade", "kind": "cascade", "members": ["small /2", "big"]},
                          {"label": "searched", "kind": "searched", "max_members": 3},
                          # the searched members fused into one network, its laterals trained 1 epoch; and with
                          # members searched for the fused exits
                          _fused("fused"), _fused("fused, own search", own_search=True),
                          # a feature-reusing network trained in the run, with the IMTA recipe (2 exits)
                          _trained("ranet", "ranet_cifar", stem="imagenet", nChannels=4, growthRate=4, nBlocks=1,
                                   block_step=1, step=1, scale_list=[1, 2], grFactor=[2, 1], bnFactor=[2, 1],
                                   head_channels=8),
                          # the width-wise multi-stage network, trained one stage at a time
                          _stagewise("multi-stage", "multi_stage", widths=[[8, 16], [4, 8]], resolutions=[2, 1])]}
    return FrontierSettings(**{"out": out, "canvas": 32, "seeds": (0,), "epochs": 1, "train_repeats": 1,
                               "val_repeats": 1, "test_repeats": 1, "rounds": 3, "single_images": 8,
                               "batch_images": 32, "batch_sizes": (1, 16), "threads": (1,), "models": models,
                               "settle_s": 0.0, **kw})


@pytest.mark.slow
def test_tiny_frontier_run_writes_its_three_files(tmp_path):
    from dyncnn.frontier.runner import _slug, merge_runs, run_frontier
    s = _tiny_settings(tmp_path / "fr", threads=(1, "per-stage"))
    lines = []
    r = run_frontier(s, log=lines.append)
    # a line per model trained, prepared and timing condition: name, seconds, time left (issue 27)
    assert [ln.split(" in ")[0] for ln in lines if " s (" in ln and " of " in ln][:3] == \
        ["    small /2: trained", "    big: trained", "    ranet: trained"]
    assert sum(": exported and evaluated in" in ln or ": calibrated, exported and run on test in" in ln
               for ln in lines) == 8                                 # 2 static, 6 dynamic models
    # a line per batch size: runtime (1 thread and per stage, paired in the same rounds), eager
    assert sum("models timed in" in ln for ln in lines) == 2 + 2
    assert sum("ONNX Runtime batch 1, threads 1, per-stage: " in ln for ln in lines) == 1
    # the threads per stage of every bundle, measured together once all are exported (their rounds interleaved)
    assert sum("measuring threads per stage of 8 bundles" in ln for ln in lines) == 1
    for name in ("frontier.json", "frontier.md", "frontier.png"):
        assert (tmp_path / "fr" / name).stat().st_size > 500
    saved = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    seed = saved["seeds"][0]
    assert set(seed["static"]) == {"small /2", "big"}
    assert all(v["val_loss"] > 0 for v in seed["static"].values())
    assert seed["best_static_by_val"] == best_on_validation(seed["static"])
    assert saved["summary"]["selected"] in ("cascade", "searched", "fused", "fused, own search", "ranet",
                                            "multi-stage")
    points = seed["dynamic"]["cascade"]["points"]
    assert sum(p["chosen"] for p in points) == 1 and any(p.get("full_depth") for p in points)
    # the bundle driver's decisions on the test split equal the offline assignment from eager logits
    assert all(p["offline_agrees"] == p["n_test"] for p in points)
    # the searched cascade: members chosen on validation among the static models, then built and timed alike
    search = seed["cascade_search"]
    assert set(search["member_ms"]) == {"small /2", "big"} and search["candidates"] == 1
    by_cost = sorted(search["member_ms"], key=search["member_ms"].get)        # members run cheapest first
    assert seed["dynamic"]["searched"]["members"] == by_cost == search["ranking"][0]["members"]
    # the search's chains end with the best static model on validation, unless that one measured the cheapest
    best = seed["best_static_by_val"]
    assert search["last"] == (best if best == by_cost[-1] else None)
    assert seed["dynamic"]["searched"]["kind"] == "searched"
    assert all(p["offline_agrees"] == p["n_test"] for p in seed["dynamic"]["searched"]["points"])
    assert "Cascade search (validation split only)" in (tmp_path / "fr" / "frontier.md").read_text()
    # the cascade's members fused into one network, its laterals trained (checkpointed under the members' names);
    # with own_search, members searched for the fused exits on the same member latencies (one chain here)
    fused = seed["dynamic"]["fused"]
    assert fused["members"] == by_cost and fused["kind"] == "fused" and seed["training_seconds"]["fused"] > 0
    assert seed["fused_search"]["member_ms"] == search["member_ms"]
    assert seed["dynamic"]["fused, own search"]["members"] == seed["fused_search"]["ranking"][0]["members"]
    assert "Fused cascade search (validation split only)" in (tmp_path / "fr" / "frontier.md").read_text()
    assert len(fused["exit_macs"]) == len(by_cost)
    assert all(p["offline_agrees"] == p["n_test"] for p in fused["points"])
    assert (tmp_path / "fr" / "models" / "seed0" / _slug(f"fused {' '.join(by_cost)}") / "last.safetensors").exists()
    # the trained RANet: IMTA's forward transfer exported (exit 0's logits are a state leaf the next stage reads),
    # the driver's decisions equal the offline assignment, and the threshold grid searched its operating points
    ranet = seed["dynamic"]["ranet"]
    assert ranet["kind"] == "trained" and len(ranet["exit_macs"]) == 2 and seed["training_seconds"]["ranet"] > 0
    assert all(p["offline_agrees"] == p["n_test"] for p in ranet["points"])
    manifest = json.loads((tmp_path / "fr" / "bundles" / "seed0" / "ranet" / "manifest.json").read_text())
    assert manifest["stages"][0]["logits"]["source"] == "leaf"
    # the multi-stage network trained stage by stage: a checkpoint per stage, exported, decisions equal to eager
    ms = seed["dynamic"]["multi-stage"]
    assert ms["kind"] == "trained" and len(ms["exit_macs"]) == 2 and seed["training_seconds"]["multi-stage"] > 0
    assert all(p["offline_agrees"] == p["n_test"] for p in ms["points"])
    for k in range(2):
        assert (tmp_path / "fr" / "models" / "seed0" / "multi_stage" / f"stage{k}" / "last.safetensors").exists()
    merit = seed["merit"]["t1_b1"]["models"]["cascade"]
    assert merit["speedup"] > 0 and merit["dynamic_latency"] > 0
    assert re.search(r"x (faster|slower) than the static front", (tmp_path / "fr" / "frontier.md").read_text())
    # threads per stage: a column of its own, run by bundles that record their stages' thread counts
    assert seed["merit"]["tper-stage_b16"]["models"]["cascade"]["speedup"] > 0
    assert "ORT ms batch 16, threads per stage" in (tmp_path / "fr" / "frontier.md").read_text()
    for name in ("cascade", "big"):
        recorded = json.loads((tmp_path / "fr" / "bundles" / "seed0" / name / "manifest.json").read_text())
        assert sorted(recorded["stage_threads"]["batches"]) == ["1", "16"]
        # batch 1 of a multi-exit bundle: the plan that ran the whole bundle fastest under its chosen point
        plans = recorded["stage_threads"]["batches"]["1"].get("plan_ms")
        if name == "cascade":
            assert sorted(plans) == ["1-1"]         # the timed counts are the candidates: 1 thread alone here
            pick = "-".join(map(str, recorded["stage_threads"]["batches"]["1"]["threads"]))
            assert plans[pick] <= 1.05 * min(plans.values())
        else:
            assert plans is None
    # runs of other seeds (say, made in parallel) merge into one report, summarized over both
    other = tmp_path / "fr_seed1"
    other.mkdir()
    saved["seeds"][0]["seed"] = 1
    (other / "frontier.json").write_text(json.dumps(saved))
    merged = merge_runs([tmp_path / "fr", other], tmp_path / "merged")
    assert [sd["seed"] for sd in merged["seeds"]] == [0, 1]
    assert (tmp_path / "merged" / "frontier.png").exists() and "2 training seeds" in \
        (tmp_path / "merged" / "frontier.md").read_text()
    with pytest.raises(ValueError, match="share a seed"):
        merge_runs([tmp_path / "fr", tmp_path / "fr"], tmp_path / "bad")
    # a run that chose by another rule does not merge: the cascades searched differ
    saved["seeds"][0]["seed"] = 2
    saved["settings"]["cascade_last"] = "any"
    (other / "frontier.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="cascade_last"):
        merge_runs([tmp_path / "fr", other], tmp_path / "bad")
    # a second run reuses the finished checkpoints instead of training again
    again = run_frontier(s, log=lambda *a: None)
    assert all(v == 0.0 for v in again["seeds"][0]["training_seconds"].values())
    assert again["seeds"][0]["dynamic"]["ranet"]["anytime_test"] == r["seeds"][0]["dynamic"]["ranet"]["anytime_test"]
    assert r["seeds"][0]["static"]["big"]["test_accuracy"] == again["seeds"][0]["static"]["big"]["test_accuracy"]


def test_results_of_older_runs_are_upgraded_for_merging():
    from dyncnn.frontier.runner import upgrade_results
    timing = {"t1_b1": {"median_ms": 1.0, "p25_ms": 0.9, "p75_ms": 1.1, "rounds": 3}}
    old = {"settings": {"preset": "demo"},
           "seeds": [{"static": {"a": {"ort": dict(timing)}},
                      "dynamic": {"c": {"points": [{"ort": dict(timing)}, {"ort": dict(timing)}]}}}]}
    new = upgrade_results(old)
    assert new["settings"]["runtime"] == "onnxruntime"
    assert new["settings"]["cascade_last"] == "any"         # the cascade search took any last member then
    entries = [new["seeds"][0]["static"]["a"], *new["seeds"][0]["dynamic"]["c"]["points"]]
    assert all(e == {"rt": timing} for e in entries)


def test_frontier_refuses_an_unknown_runtime(tmp_path):
    with pytest.raises(ValueError, match="runtime must be one of"):
        _tiny_settings(tmp_path, runtime="tflite")
    with pytest.raises(ValueError, match="cascade_last must be one of"):
        _tiny_settings(tmp_path, cascade_last="cheapest")


def test_frontier_thread_settings_are_checked(tmp_path):
    from dyncnn.frontier.runner import FrontierSettings
    assert _tiny_settings(tmp_path, threads=(1, 2, "per-stage")).thread_counts == [1, 2]
    assert FrontierSettings().threads == (1, 2, "per-stage")
    assert FrontierSettings(runtime="executorch").threads == (1, 2)     # one thread pool per process
    for bad in (("per-stage",), (0, "per-stage"), (1, "two"), (1, True)):
        with pytest.raises(ValueError, match="threads must be counts >= 1"):
            _tiny_settings(tmp_path, threads=bad)
    with pytest.raises(ValueError, match="needs runtime onnxruntime"):
        _tiny_settings(tmp_path, threads=(1, "per-stage"), runtime="executorch")


@pytest.mark.slow
def test_tiny_frontier_timed_in_executorch(tmp_path):
    pytest.importorskip("executorch")
    from dyncnn.frontier.runner import run_frontier
    run_frontier(_tiny_settings(tmp_path / "fr", runtime="executorch", eager=False), log=lambda *a: None)
    saved = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    assert saved["settings"]["runtime"] == "executorch" and "executorch" in saved["machine"]
    manifest = json.loads((tmp_path / "fr" / "bundles" / "seed0" / "cascade" / "manifest.json").read_text())
    assert manifest["runtime"] == "executorch"
    points = saved["seeds"][0]["dynamic"]["cascade"]["points"]
    # the ExecuTorch driver's decisions on the test split equal the offline assignment from eager logits
    assert all(p["offline_agrees"] == p["n_test"] for p in points)
    assert all(p["rt"]["t1_b16"]["median_ms"] > 0 for p in points)
    md = (tmp_path / "fr" / "frontier.md").read_text()
    assert "ExecuTorch (XNNPACK)" in md and "ET ms batch 16, 1 thread" in md


# -- choosing on validation: threshold grid and cascade search ---------------------------------------------------

def _exits(n=300, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(k, n, generator=g, dtype=torch.float64)
    correct = torch.rand(k, n, generator=g) < torch.linspace(0.6, 0.9, k)[:, None]
    return scores, correct


@pytest.mark.parametrize("k", [2, 3])
def test_grid_candidates_equal_the_plain_threshold_evaluation(k):
    from dyncnn.dynamic.budget import evaluate_thresholds
    from dyncnn.frontier.search import grid_candidates
    scores, correct = _exits(k=k)
    cost = [1.0, 3.0, 7.0][:k]
    cands = grid_candidates(scores, correct, cost, [1.0] * k, points=11)
    assert len(cands) > 5
    for c in cands:       # each vectorized figure equals the one-sample-at-a-time assignment of its thresholds
        ref = evaluate_thresholds(scores, correct, torch.tensor([*c["thresholds"], -math.inf],
                                                                dtype=torch.float64), cost)
        assert math.isclose(c["val_accuracy"], ref.accuracy, abs_tol=1e-12)
        assert math.isclose(c["val_cost"], ref.mean_macs, abs_tol=1e-12)
        assert c["val_exit_fractions"] == pytest.approx(ref.exit_fractions, abs=1e-12)
    keys = {tuple(round(f * 300) for f in c["val_exit_fractions"]) for c in cands}
    assert len(keys) == len(cands)                                      # each split of the samples once
    assert any(c["val_exit_fractions"][-1] == 1.0 for c in cands)       # "never exit early" is a candidate
    assert grid_candidates(*_exits(k=4), [1, 2, 3, 4], [1.0] * 4) == []     # more exits: the q sweep's job


def test_cascade_search_picks_the_cheapest_cascade_that_reaches_the_target():
    from dyncnn.frontier.search import search_cascades
    g = torch.Generator().manual_seed(0)
    n, y = 400, torch.arange(400) % 10

    def model(acc, confident_when_right=True):
        # right on a fraction `acc` of the samples; confident (sharp logits) exactly on those it gets right
        logits = torch.randn(n, 10, generator=g) * 0.1
        right = torch.rand(n, generator=g) < acc
        pred = torch.where(right, y, (y + 1) % 10)
        logits[torch.arange(n), pred] += torch.where(right, 8.0, 0.5) if confident_when_right else 3.0
        return logits
    logits = {"tiny": model(0.7), "uninformative": model(0.7, confident_when_right=False), "big": model(0.95)}
    cost = {"tiny": 1.0, "uninformative": 1.0, "big": 10.0}
    target = float((logits["big"].argmax(1) == y).double().mean())
    ranking = search_cascades(logits, y, cost, target)
    # the tiny model's confidence says when it is right: most samples stop there, the big one takes the rest
    # (the best cascade may also spend the slack above the target on the uninformative model in between)
    assert ranking[0]["members"][0] == "tiny" and ranking[0]["members"][-1] == "big" and ranking[0]["reaches"]
    assert ranking[0]["val_cost"] < 5.0 and ranking[0]["val_accuracy"] >= target
    pair = {tuple(r["members"]): r for r in ranking if len(r["members"]) == 2}
    assert pair["tiny", "big"]["val_cost"] < 5.0
    # a first member whose confidence carries no information saves little at the target
    assert pair["uninformative", "big"]["val_cost"] > pair["tiny", "big"]["val_cost"] + 2.0
    assert len(ranking) == 4                                  # 3 pairs and 1 triple, members by increasing cost
    with pytest.raises(ValueError, match="need a cost"):
        search_cascades(logits, y, {"tiny": 1.0}, target)
    paired = search_cascades(logits, y, cost, target, z=1.0, reference="big")
    assert paired[0]["reaches"] and paired[0]["val_cost"] >= ranking[0]["val_cost"]   # the bound costs something
    with pytest.raises(ValueError, match="reference"):
        search_cascades(logits, y, cost, target, z=1.0)


def _complementary_models() -> tuple[dict, torch.Tensor, dict]:
    """Logits of two cheap models "a" and "b", each right on a different 70% of 400 images and as confident when
    wrong as when right (so no threshold can route between them), and of a costly "ref" right on 80%; their costs."""
    n, y = 400, torch.arange(400) % 10
    idx = torch.arange(n)

    def model(right, wrong_class):
        # its pick gets 2, the runner-up 1: the true class when wrong, another class when right
        logits = torch.zeros(n, 10)
        logits[idx, torch.where(right, y, (y + wrong_class) % 10)] = 2.0
        logits[idx, torch.where(right, (y + 5) % 10, y)] = 1.0
        return logits
    a_right, b_right = idx % 10 < 7, idx % 10 >= 3                   # both right on 40%, one of them on 60%
    logits = {"a": model(a_right, 1), "b": model(b_right, 2), "ref": model(idx % 10 < 8, 3)}
    return logits, y, {"a": 1.0, "b": 2.0, "ref": 10.0}


def test_committee_search_scores_chains_by_the_fused_exits():
    """``committee=True`` scores a chain by its fused exits (the members' summed log-probabilities): two models
    that are each right on a different 70% of the images reach together what neither reaches alone: the fused
    cascade's search finds the chain that the plain search cannot use."""
    from dyncnn.frontier.search import committee_logits, search_cascades
    logits, y, cost = _complementary_models()
    summed = committee_logits([logits["a"], logits["b"]])
    torch.testing.assert_close(summed[1], (logits["a"].double().log_softmax(1) + logits["b"].double().log_softmax(1)))
    assert float((summed[1].argmax(1) == y).double().mean()) == 1.0       # right wherever either is
    target = 0.9                                                        # above every single model (0.7, 0.7, 0.8)
    plain = {tuple(r["members"]): r for r in search_cascades(logits, y, cost, target)}
    fused = {tuple(r["members"]): r for r in search_cascades(logits, y, cost, target, committee=True)}
    assert not plain["a", "b"]["reaches"] and fused["a", "b"]["reaches"]
    assert search_cascades(logits, y, cost, target, committee=True)[0]["members"] == ["a", "b"]


def test_cascade_search_with_last_scores_only_the_chains_that_end_with_that_model():
    """``last`` (the frontier passes the best static model): the pair ``a -> b`` that wins the fused search above
    does not end with the reference and is not scored; every chain scored ends with it, each with the operating
    point it has without the rule."""
    from dyncnn.frontier.search import search_cascades
    logits, y, cost = _complementary_models()
    target = 0.75
    for committee in (False, True):
        every = {tuple(r["members"]): r for r in search_cascades(logits, y, cost, target, committee=committee)}
        ending = search_cascades(logits, y, cost, target, committee=committee, last="ref")
        assert [tuple(r["members"]) for r in ending] != [] and all(r["members"][-1] == "ref" for r in ending)
        assert {tuple(r["members"]) for r in ending} == {("a", "ref"), ("b", "ref"), ("a", "b", "ref")}
        assert all(r == every[tuple(r["members"])] for r in ending)
    assert search_cascades(logits, y, cost, target, committee=True)[0]["members"] == ["a", "b"]
    with pytest.raises(ValueError, match="names none"):
        search_cascades(logits, y, cost, target, last="nope")
    with pytest.raises(ValueError, match="cheapest"):          # a cascade's members run cheapest first
        search_cascades(logits, y, cost, target, last="a")


def test_the_frontier_searches_every_chain_when_its_reference_measured_the_cheapest():
    """``_search_members(last=...)`` on measured costs: with the reference costliest, every chain ends with it;
    where the reference measured the cheapest (no chain can end with it), the run says so and searches every
    chain instead of failing."""
    from dyncnn.frontier.runner import _search_members
    logits, y, cost = _complementary_models()
    lines = []

    def search(last):
        return _search_members(logits, y, None, None, 0.75, 1, 3, lines.append, 0, cost=cost, last=last)
    ending = search("ref")
    assert ending["last"] == "ref" and all(r["members"][-1] == "ref" for r in ending["ranking"])
    assert ending["candidates"] == 3 and not any("cheapest" in ln for ln in lines)
    fallback = search("a")
    assert fallback["last"] is None and fallback["candidates"] == 4          # 3 pairs and 1 triple
    assert any(r["members"][-1] != "ref" for r in fallback["ranking"])
    assert any("a measured the cheapest model" in ln for ln in lines)


def test_temperatures_fit_on_logits_made_in_inference_mode():
    """Logits collected under torch.inference_mode (as a user's evaluation loop makes them) used to fail in the
    LBFGS fit ("Inference tensors cannot be saved for backward"); they give the same temperatures as plain ones."""
    from dyncnn.dynamic.budget import fit_temperatures
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (200,), generator=g)
    logits = torch.randn(2, 200, 10, generator=g) * 3
    logits[0, torch.arange(200), y] += 4.0            # exit 0 over-confident where right: T > 1 expected
    want = fit_temperatures(logits, y)
    with torch.inference_mode():
        frozen = logits.clone()
        got = fit_temperatures(frozen, y)
    assert got == pytest.approx(want, rel=1e-6) and want[0] > 1.0


def test_cli_frontier_threads_take_counts_and_per_stage(capsys):
    from dyncnn.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["frontier", "--threads", "1", "per-stage"]).threads == [1, "per-stage"]
    assert parser.parse_args(["frontier"]).threads is None          # FrontierSettings' default for the runtime
    with pytest.raises(SystemExit):
        parser.parse_args(["frontier", "--threads", "two"])
    assert "expected a thread count or per-stage, got 'two'" in capsys.readouterr().err


def test_headline_preset_and_exclude(tmp_path, capsys):
    """The headline preset: the phone preset's static networks of up to ~20M MACs, the
    cascade search, its members fused (as in full and phone) and the multi-stage network; ``exclude`` leaves out dynamic models by label, and a label that
    names none is refused with the preset's labels."""
    from dyncnn.cli import build_parser
    from dyncnn.frontier.runner import FrontierSettings, presets
    models = presets(128)["headline"]
    assert [m["label"] for m in models["static"]] == ["tiny-M /4", "tiny-M /2", "tiny-XL /2", "tiny-M",
                                                       "mnv3-small /2", "mnv3-small"]
    labels = [m["label"] for m in models["dynamic"]]
    assert "cascade searched on validation" in labels and any(m.get("name") == "multi_stage"
                                                               for m in models["dynamic"])
    for preset in ("headline", "full", "phone"):
        assert [m["laterals"] for m in presets(128)[preset]["dynamic"] if m["kind"] == "fused"] == ["pooled"]
    s = FrontierSettings(preset="headline", canvas=128, exclude=[labels[-1]])
    assert [m["label"] for m in s.model_set()["dynamic"]] == labels[:-1]
    assert s.model_set()["static"] == models["static"]
    with pytest.raises(ValueError, match="exclude names no dynamic model of the preset: \\['tiny-M'\\]"):
        FrontierSettings(preset="headline", canvas=128, exclude=["tiny-M"])
    args = build_parser().parse_args(["frontier", "--preset", "headline", "--exclude", labels[-1]])
    assert args.exclude == [labels[-1]]


def test_tiny_frontier_on_an_image_folder(tmp_path, write_image_tree):
    """The frontier on the user's data: a generated ImageFolder tree, 3 channels at the chosen side."""
    from dyncnn.frontier.runner import FrontierSettings, load_data, run_frontier
    root = write_image_tree(tmp_path / "images", per_class=16, size=20)
    s = _tiny_settings(tmp_path / "fr", dataset="folder", data_root=str(root), canvas=16, batch_size=8,
                       batch_sizes=(1, 4))
    data = load_data(s)
    assert (data["num_classes"], data["in_chans"], data["train"].input_size) == (3, 3, 16)
    assert [len(data[k]) for k in ("train", "val", "test")] == [38, 5, 5]
    r = run_frontier(s, log=lambda *a: None)
    seed = r["seeds"][0]
    assert set(seed["static"]) == {"small /2", "big"}
    assert all(p["offline_agrees"] == p["n_test"] == 5 for p in seed["dynamic"]["cascade"]["points"])
    manifest = json.loads((tmp_path / "fr" / "bundles" / "seed0" / "big" / "manifest.json").read_text())
    assert "3, 16, 16" in json.dumps(manifest).replace("[", "").replace("]", "")
    assert "folder" in (tmp_path / "fr" / "frontier.md").read_text()
    with pytest.raises(ValueError, match="give data_root"):
        FrontierSettings(dataset="folder")
    with pytest.raises(ValueError, match="must be 32"):
        FrontierSettings(dataset="cifar10", data_root="x", canvas=64)
    with pytest.raises(ValueError, match="dataset must be one of"):
        FrontierSettings(dataset="imagenet")


def test_preset_multi_exit_networks_train_with_the_public_imta_recipe():
    """Every trained dynamic entry of ``full`` and ``phone`` builds through ``create_model`` with the IMTA recipe
    (the model owns its loss: the trainer needs nothing from the frontier), and the new candidates are there with
    three exits each: RANet, and exits placed for latency on MobileNetV3-Small and tiny-XL."""
    from dyncnn.dynamic import IMTA
    from dyncnn.dynamic.protocols import OwnTrainingLoss
    from dyncnn.frontier.runner import IMTA_RECIPE, build_dynamic, presets
    for preset, canvas in (("full", 64), ("phone", 128)):
        trained = {spec["label"]: spec for spec in presets(canvas)[preset]["dynamic"] if spec["kind"] == "trained"}
        assert any(s["name"] == "ranet_cifar" for s in trained.values())
        assert any(s["cfg"].get("backbone") == "mobilenet_v3_small" for s in trained.values())
        for label, spec in trained.items():
            net = build_dynamic(spec, {}, {})
            if net.stagewise:       # trained one stage at a time: no joint loss
                assert spec["name"] == "multi_stage" and "imta" not in spec["cfg"], label
                continue
            assert isinstance(net, OwnTrainingLoss) and net.imta == IMTA.of(spec["cfg"]["imta"]), label
            assert net.training_loss.label_smoothing == 0.05, label
            new = spec["name"] == "ranet_cifar" or spec["cfg"].get("backbone") == "mobilenet_v3_small" or \
                spec["cfg"].get("backbone_cfg", {}).get("widths") == [64, 192, 384, 768]
            if new or spec["cfg"]["imta"] == IMTA_RECIPE:    # (the multi-stage network: the plain loss, measured)
                assert net.forward_transfer and net.gradient_equilibrium and net.training_loss.teacher == "next"
            # the new candidates: three exits (more than one early exit), so that the threshold grid searches them
            assert net.num_exits == 3 if new else net.num_exits >= 2, (label, net.num_exits)
    with pytest.raises(ValueError, match="not a 'recipe' key"):
        build_dynamic({"label": "old", "kind": "trained", "name": "msdnet_cifar", "recipe": {"distill": 1.0},
                       "cfg": {}}, {}, {})


def test_bundle_runs_in_chunks_as_in_one_call(tmp_path):
    """The frontier runs a bundle on the test split in chunks (a multi-stage network's kept features for 3,000
    128x128 images took 24 GB): the same logits, exits and MACs as one call."""
    import dyncnn
    from dyncnn.dynamic import ExitPolicy
    from dyncnn.export import export_bundle, load_bundle
    from dyncnn.frontier.runner import _run_in_chunks
    torch.manual_seed(0)
    net = dyncnn.create_model("multi_stage", num_classes=10, in_chans=1, widths=[[4, 8], [4, 8]],
                              resolutions=[2, 1]).eval()
    x = torch.rand(23, 1, 16, 16)
    with torch.no_grad():
        conf = torch.softmax(net(x)[0], 1).max(1).values
    policy = ExitPolicy([float(conf.median())])
    export_bundle(net, tmp_path / "b", (1, 16, 16))
    bundle = load_bundle(tmp_path / "b", threads=1)
    whole, chunked = bundle.run(x, policy), _run_in_chunks(bundle, x, policy, chunk=5)
    assert 0 < int(whole.exit_index.sum()) < len(x)          # both exits taken: the check is not trivial
    for f in ("logits", "exit_index", "macs"):
        assert torch.equal(getattr(whole, f), getattr(chunked, f)), f


def test_timing_pauses_before_each_turn_with_more_than_one_thread(tmp_path, monkeypatch):
    # a pool that spun on after the turn before would take the cores: with 2 threads (or per stage) among the
    # conditions every turn waits settle_s, then runs one untimed call, before its timed pass; with one thread
    # alone there is no pool and no pause
    import dyncnn.frontier.runner as runner
    slept, calls, turns = [], {}, []
    monkeypatch.setattr(runner.time, "sleep", slept.append)

    def make(key):
        def maker(threads):
            def run(x):
                calls[key, threads] = calls.get((key, threads), 0) + 1
                if len(x) == 1 and x[0, 0, 0, 0] == 4:      # the last image: one turn's timed pass ends
                    turns.append((key, threads))
            return run
        return maker
    x = np.zeros((5, 1, 4, 4), np.float32)
    x[:, 0, 0, 0] = np.arange(5)
    items = [runner.Timed("a", make("a")), runner.Timed("b", make("b"))]
    s = runner.FrontierSettings(out=tmp_path, threads=(1, 2), batch_sizes=(1,), rounds=3, single_images=5,
                                settle_s=0.05)
    out = runner.time_interleaved(items, x, s)
    assert slept == [0.05] * (2 * 2 * 3)                  # 2 items x 2 thread counts x 3 rounds
    # per (item, threads): 4 warm-up calls, then per round one untimed call and the timed pass of 5 images
    assert calls == {(k, t): 4 + 3 * 6 for k in "ab" for t in (1, 2)}
    # paired: each item runs under both thread counts back to back; items and counts rotate between rounds
    assert turns == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 2), ("b", 1), ("a", 2), ("a", 1),
                     ("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert set(out["a"]) == {"t1_b1", "t2_b1"}
    slept.clear()
    runner.time_interleaved(items, x, runner.FrontierSettings(out=tmp_path, threads=(1,), batch_sizes=(1,),
                                                              rounds=3, single_images=5, settle_s=0.05))
    assert slept == []
    with pytest.raises(ValueError, match="settle_s must be >= 0"):
        runner.FrontierSettings(out=tmp_path, settle_s=-1)


def test_search_member_latencies_are_interleaved_rounds_and_their_median(monkeypatch):
    # the cascade search ranks by these: every member times its images once per round (after one untimed call),
    # the order rotated between rounds; a slow call or a round slowed for everyone does not decide the figure
    import dyncnn.frontier.runner as runner
    order, clock = [], [0.0]
    slow = {("a", 3), ("b", 3)}     # image-0 calls: warm-up, untimed, then the first round's pass: 10x slower

    class Fake:
        def __init__(self, key, ms):
            self.key, self.ms, self.passes, self.calls = key, ms, 0, 0

        def run_numpy(self, x):
            self.calls += 1
            if x[0, 0, 0, 0] == 0:
                self.passes += 1
                order.append(self.key)
            factor = 10 if (self.key, self.passes) in slow else 1
            if self.calls == 12:        # 4 warm-up, 5 round 1 (untimed + 4), untimed: the second timed call, 100x
                factor = 100
            clock[0] += self.ms * factor / 1e3
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    x = np.zeros((4, 1, 2, 2), np.float32)
    x[:, 0, 0, 0] = np.arange(4)
    ms = runner._members_ms({"a": Fake("a", 0.5), "b": Fake("b", 2.0)}, x, rounds=3)
    # warm-up passes, then per round each member's untimed call (image 0) and its pass (image 0 first again)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert ms == pytest.approx({"a": 0.5, "b": 2.0})


def test_threads_per_stage_on_the_sessions_of_one_count_are_that_count_timed_once(tmp_path, monkeypatch):
    # an item whose per-stage runner is, at a batch size, the same sessions as a timed count is not timed a second
    # time there (two timings of one configuration differ by noise alone): its entry is that count's, marked
    import dyncnn.frontier.report as report
    import dyncnn.frontier.runner as runner
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    calls = {}

    def maker(key):
        def make(threads):
            def run(x):
                calls[key, threads, len(x)] = calls.get((key, threads, len(x)), 0) + 1
            return run
        return make
    same = {1: 1, 4: None}                       # "a": per stage runs 1-thread sessions at batch 1, mixes at 4
    items = [runner.Timed("a", maker("a"), same.get), runner.Timed("b", maker("b"))]
    s = runner.FrontierSettings(out=tmp_path, threads=(1, 2, "per-stage"), batch_sizes=(1, 4), rounds=3,
                                single_images=4, batch_images=8, settle_s=0.0)
    out = runner.time_interleaved(items, np.zeros((8, 1, 4, 4), np.float32), s)
    assert ("a", "per-stage", 1) not in calls and calls["a", "per-stage", 4] > 0       # timed where it mixes
    assert calls["b", "per-stage", 1] > 0 and calls["a", 1, 1] == calls["b", 1, 1]    # no same: timed as before
    assert out["a"]["tper-stage_b1"] == {**out["a"]["t1_b1"], "same_as": "t1_b1"}
    assert "same_as" not in out["a"]["tper-stage_b4"] and "same_as" not in out["b"]["tper-stage_b1"]
    assert report._ms(out["a"]["tper-stage_b1"]).endswith("(= 1 thread)")
    assert "(=" not in report._ms(out["a"]["t1_b1"])
    # a per-stage runner that no batch size times is never made (its sessions never loaded)
    made = []
    items = [runner.Timed("a", lambda t: made.append(t) or maker("a")(t), {1: 1, 4: 2}.get)]
    out = runner.time_interleaved(items, np.zeros((8, 1, 4, 4), np.float32), s)
    assert sorted(made) == [1, 2] and out["a"]["tper-stage_b4"]["same_as"] == "t2_b4"


def test_distilled_static_networks_train_after_their_teacher_and_record_it(tmp_path):
    from dyncnn.frontier.runner import FrontierSettings, _static, run_frontier
    from dyncnn.train.checkpoint import read_checkpoint
    models = {"static": [_static("small /2", "tiny_mobilenet", 2, widths=[8, 16]),
                         _static("big", "tiny_mobilenet", 1, widths=[8, 16])], "dynamic": []}
    kw = {"canvas": 32, "seeds": (0,), "epochs": 1, "train_repeats": 1, "val_repeats": 1, "test_repeats": 1,
          "models": models, "only_train": True}
    lines = []
    run_frontier(FrontierSettings(out=tmp_path, distill_from="big", distill_weight=0.7, **kw), log=lines.append)
    assert lines[0].endswith("; the other static networks also learn from big's logits (knowledge distillation, "
                             "weight 0.7, temperature 4.0)")
    trained = [ln.strip() for ln in lines if "training static" in ln]
    assert trained == ["seed 0: training static big", "seed 0: training static small /2 (distilled from big)"]
    metas = {m: read_checkpoint(tmp_path / "models" / "seed0" / m / "last.safetensors")[1] for m in ("big", "small__2")}
    assert metas["big"].get("distilled") is None
    assert metas["small__2"]["distilled"] == {"teacher": "big", "weight": 0.7, "temperature": 4.0}
    # the same run again reuses both; without distillation (or another weight) the student is refused, not reused
    lines.clear()
    run_frontier(FrontierSettings(out=tmp_path, distill_from="big", distill_weight=0.7, **kw), log=lines.append)
    assert sum("reused" in ln for ln in lines) == 2
    for other in ({}, {"distill_from": "big", "distill_weight": 0.5}):
        with pytest.raises(DyncnnError, match="distilled from big .weight 0.7.*give another --out"):
            run_frontier(FrontierSettings(out=tmp_path, **other, **kw), log=lambda m: None)
    with pytest.raises(ValueError, match="distill_from names no static model"):
        FrontierSettings(out=tmp_path, distill_from="huge", **kw)
    with pytest.raises(ValueError, match="distill_weight"):
        FrontierSettings(out=tmp_path, distill_from="big", distill_weight=0, **kw)


def test_time_left_is_priced_by_each_steps_work_and_skips_reused_steps(monkeypatch):
    from dyncnn.frontier import runner
    clock = iter([0.0, 0.0, 10.0, 40.0])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    lines = []
    p = runner._Progress(4, lines.append, weights=[5.0, 1.0, 3.0, 6.0])
    p.step("teacher: reused", reused=True)             # done at t=0: no rate yet, so no estimate
    p.step("small: trained")                            # 10 s for 1 unit: 9 units left
    p.step("middle: trained")                           # 30 s more for 3 units: 40 s / 4 units, 6 left
    assert lines == ["    teacher: reused in 0.0 s (1 of 4)",
                     "    small: trained in 10.0 s (2 of 4, about 1 min 30 s left)",
                     "    middle: trained in 30.0 s (3 of 4, about 1 min 0 s left)"]
    with pytest.raises(ValueError, match="weights"):
        runner._Progress(2, lines.append, weights=[1.0])


def test_cli_frontier_passes_the_distillation_settings(monkeypatch):
    from dyncnn.frontier import runner
    got = []
    monkeypatch.setattr(runner, "run_frontier", got.append)
    assert main(["frontier", "--preset", "headline", "--distill-from", "mnv3-small", "--distill-weight", "0.6",
                 "--distill-temperature", "2", "--out", "unused"]) == 0
    s = got[0]
    assert (s.distill_from, s.distill_weight, s.distill_temperature, s.canvas) == ("mnv3-small", 0.6, 2.0, 128)
    assert s.distillation() == {"teacher": "mnv3-small", "weight": 0.6, "temperature": 2.0}
    assert main(["frontier", "--preset", "headline", "--out", "unused"]) == 0 and got[1].distillation() is None
