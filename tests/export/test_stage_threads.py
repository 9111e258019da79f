"""Threads per stage: the manifest's table of the fastest intra-op thread count of each stage (per batch size), its
validation, and the driver that runs each stage with its own session and count (``threads="per-stage"``)."""
import json
import math

import numpy as np
import pytest
import torch

import dyncnn
from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.export import BundleError, export_bundle, load_bundle
from dyncnn.export.bundle_format import write_manifest
from dyncnn.export.runtime import (measure_stage_threads, record_stage_threads, stage_threads_table,
                                   thread_plan)


def _intra(sess) -> int:
    return sess.get_session_options().intra_op_num_threads


def _stops_spinning(sess) -> bool:
    """Whether the session's pool stops spinning when a run ends (not set: ONNX Runtime's default, it spins on)."""
    try:
        return sess.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    except RuntimeError:
        return False


class _Recorder:
    def __init__(self, sess, log, key):
        self.sess, self.log, self.key = sess, log, key

    def run(self, names, feed):
        self.log.append((self.key, _intra(self.sess), next(iter(feed.values())).shape[0]))
        return self.sess.run(names, feed)


@pytest.fixture
def multi(tmp_path, tiny_multi_exit, spread_policy):
    model = tiny_multi_exit()
    policy = spread_policy(model, torch.rand(200, 1, 32, 32))
    export_bundle(model, tmp_path / "b", (1, 32, 32), policy=policy)
    return model, policy, tmp_path / "b"


def test_measured_thread_counts_are_recorded_and_run_by_the_driver(multi):
    model, policy, folder = multi
    images = np.random.rand(8, 1, 32, 32).astype(np.float32)
    measured = measure_stage_threads(folder, images, candidates=(1, 2), batch_sizes=(1, 16), rounds=1)
    assert sorted(measured) == [1, 16] and all(sorted(m) == [1, 2] for m in measured.values())
    assert all(len(v) == 3 and min(v) > 0 for m in measured.values() for v in m.values())
    manifest = record_stage_threads(folder, measured, machine="test")
    entry = manifest["stage_threads"]
    assert entry["candidates"] == [1, 2] and entry["machine"] == "test" and sorted(entry["batches"]) == ["1", "16"]
    for b, m in measured.items():       # the fastest count per stage, every candidate's times beside it
        want = [1 if m[1][k] <= 1.05 * min(m[1][k], m[2][k]) else 2 for k in range(3)]
        assert entry["batches"][str(b)]["threads"] == want
        assert entry["batches"][str(b)]["stage_ms"] == {str(t): pytest.approx(v) for t, v in m.items()}
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert stage_threads_table(on_disk) == {b: entry["batches"][str(b)]["threads"] for b in (1, 16)}
    bundle = load_bundle(folder, threads="per-stage")
    for k, step in enumerate(bundle._steps):     # each stage's sessions have the recorded counts
        sessions = [(0.0, step.sess), *step.more]
        assert [(lo, _intra(s)) for lo, s in sessions] == bundle.thread_plan[k]
        assert _intra(sessions[0][1]) == entry["batches"]["1"]["threads"][k]
        assert _intra(sessions[-1][1]) == entry["batches"]["16"]["threads"][k]
    x = torch.rand(40, 1, 32, 32)
    want = model.infer(x, policy)
    assert torch.equal(bundle.run(x).exit_index, want.exit_index)          # decisions as eager
    assert torch.equal(torch.cat([bundle.run(x[i:i + 1]).exit_index for i in range(40)]), want.exit_index)


def test_a_stage_runs_with_the_count_of_the_nearest_recorded_batch(multi):
    model, policy, folder = multi
    ms = {1: [0.1, 0.2, 0.3], 2: [0.2, 0.1, 0.1]}                  # batch 1: 1, 2, 2 threads
    big = {1: [1.0, 1.0, 1.0], 2: [2.0, 0.5, 2.0]}                 # batch 64: 1, 2, 1 threads
    record_stage_threads(folder, {1: ms, 64: big}, machine="test")
    bundle = load_bundle(folder, threads="per-stage")
    assert bundle.thread_plan == [[(0.0, 1)], [(0.0, 2)], [(0.0, 2), (8.0, 1)]]
    log = []
    for k, step in enumerate(bundle._steps):
        step.sess = _Recorder(step.sess, log, k)
        step.more = tuple((lo, _Recorder(s, log, k)) for lo, s in step.more)
    full = bundle.full_depth()
    bundle.run_numpy(np.random.rand(7, 1, 32, 32).astype(np.float32), full)
    bundle.run_numpy(np.random.rand(9, 1, 32, 32).astype(np.float32), full)
    assert log == [(0, 1, 7), (1, 2, 7), (2, 2, 7), (0, 1, 9), (1, 2, 9), (2, 1, 9)]
    # the run's batch size picks the counts of every stage, also of a later stage that gets fewer rows (the plan
    # measure_stage_plans timed for that batch size): 9 rows start, half leave at the first exit
    x = np.random.rand(9, 1, 32, 32).astype(np.float32)
    conf = bundle.exit_logits(x)[0]
    conf = np.exp(conf - conf.max(1, keepdims=True))
    conf = (conf / conf.sum(1, keepdims=True)).max(1)
    log.clear()
    out = bundle.run_numpy(x, ExitPolicy([float(np.median(conf)), math.inf], "max_prob"))
    assert 0 < (out[1] == 0).sum() < 9 and log[0] == (0, 1, 9)
    assert [(k, t) for k, t, _ in log[1:]] == [(1, 2), (2, 1)] and log[1][2] < 8
    # a 2-thread pool of a multi-exit bundle stops spinning when its run ends (a spinning one would take the next
    # stage's core), per stage and with one count; spin=True keeps ONNX Runtime's default
    assert _stops_spinning(bundle._steps[1].sess.sess)
    assert _stops_spinning(load_bundle(folder, threads=2)._steps[1].sess)
    assert not _stops_spinning(load_bundle(folder, threads=2, spin=True)._steps[1].sess)
    assert not _stops_spinning(load_bundle(folder, threads=1)._steps[1].sess)     # one thread: no pool to stop
    # an integer keeps one count everywhere, whatever the manifest records
    assert thread_plan(bundle.manifest, 3, 2) == [[(0.0, 2)]] * 3
    assert all(_intra(s.sess) == 2 and not s.more for s in load_bundle(folder, threads=2)._steps)


def test_static_bundle_per_stage_threads(tmp_path):
    net = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 16, 32]).eval()
    export_bundle(net, tmp_path / "s", (1, 32, 32))
    with pytest.raises(BundleError, match="records no thread count per stage"):
        load_bundle(tmp_path / "s", threads="per-stage")
    measured = measure_stage_threads(tmp_path / "s", np.random.rand(2, 1, 32, 32).astype(np.float32),
                                     batch_sizes=(1, 4), rounds=1)
    assert all(len(v) == 1 for m in measured.values() for v in m.values())      # a batch beyond the images
    record_stage_threads(tmp_path / "s", {1: {1: [0.2], 2: [0.3]}, 4: {1: [0.9], 2: [0.5]}}, machine="test")
    within = record_stage_threads(tmp_path / "s", {1: {1: [1.0], 2: [0.97]}}, machine="test")
    assert within["stage_threads"]["batches"] == {"1": {"threads": [1], "stage_ms": {"1": [1.0], "2": [0.97]}}}
    record_stage_threads(tmp_path / "s", {1: {1: [0.2], 2: [0.3]}, 4: {1: [0.9], 2: [0.5]}}, machine="test")
    bundle = load_bundle(tmp_path / "s", threads="per-stage")
    assert _intra(bundle.sess) == 1 and [(lo, _intra(s)) for lo, s in bundle._more] == [(2.0, 2)]
    # one graph: only one of its sessions has a pool, which spins on as ONNX Runtime's default, per stage too
    assert not _stops_spinning(bundle._more[0][1]) and not _stops_spinning(load_bundle(tmp_path / "s", threads=2).sess)
    assert _stops_spinning(load_bundle(tmp_path / "s", threads=2, spin=False).sess)
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(bundle.run_numpy(x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bundle.run_numpy(x[:1]), want[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    ({"candidates": [0, 2], "batches": {"1": {"threads": [2, 2, 2]}}}, "candidates must list thread counts"),
    ({"candidates": [1, 2], "batches": {}}, "batches must be a non-empty object"),
    ({"candidates": [1, 2], "batches": {"0": {"threads": [1, 1, 1]}}}, "batch size '0' must be a positive"),
    ({"candidates": [1, 2], "batches": {"b1": {"threads": [1, 1, 1]}}}, "batch size 'b1' must be a positive"),
    ({"candidates": [1, 2], "batches": {"1": {"threads": [1, 1]}}}, "threads must list 3 thread counts"),
    ({"candidates": [1, 2], "batches": {"1": {"threads": [1, 4, 1]}}}, "each one of the candidates"),
    ({"candidates": [1, 2], "batches": {"1": {"threads": [1, 1.0, 1]}}}, "each one of the candidates"),
    ({"candidates": [1, 2], "batches": {"1": {"threads": [1, True, 1]}}}, "each one of the candidates"),
    ({"candidates": [1, 2], "batches": {"1": {"threads": [1, 1, 1], "stage_ms": {"1": [0.1, float("nan"), 1]}}}},
     "stage_ms must map"),
    ({"candidates": [1, 2], "batches": {"1": {"threads": [1, 1, 1], "stage_ms": {"3": [0.1, 0.1, 0.1]}}}},
     "stage_ms must map"),
    ([1, 2], "stage_threads must be an object"),
])
def test_bad_thread_tables_are_refused_on_write_and_on_load(multi, bad, match):
    _, _, folder = multi
    manifest = json.loads((folder / "manifest.json").read_text())
    with pytest.raises(BundleError, match=match):
        write_manifest(folder, {**manifest, "stage_threads": bad})
    (folder / "manifest.json").write_text(json.dumps({**manifest, "stage_threads": bad}))
    with pytest.raises(BundleError, match=match):
        load_bundle(folder)


def test_bad_threads_arguments_are_refused(multi):
    _, _, folder = multi
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(BundleError, match="threads must be a positive integer, 'per-stage' or one count per stage"):
            load_bundle(folder, threads=bad)
    with pytest.raises(BundleError, match="expected 3 stage times per thread count"):
        record_stage_threads(folder, {1: {1: [0.1, 0.2]}})


def test_batch_one_takes_the_plan_that_ran_the_whole_bundle_fastest(multi, tmp_path):
    # stage by stage at full depth a 2-thread stage can look faster, yet lose once images leave early and the
    # second core idles between the calls that reach it: batch 1 takes the plan (a count per stage) whose whole
    # runs under the exit policy were fastest
    import itertools
    from dyncnn.export.runtime import measure_stage_plans
    model, policy, folder = multi
    images = np.random.rand(6, 1, 32, 32).astype(np.float32)
    plans = measure_stage_plans(folder, images, (2, 1), policy, rounds=1)
    assert sorted(plans) == sorted(itertools.product((1, 2), repeat=3)) and min(plans.values()) > 0
    stagewise = {1: {1: [0.1, 0.3, 0.3], 2: [0.2, 0.1, 0.1]}, 64: {1: [1.0] * 3, 2: [0.5] * 3}}   # [1, 2, 2]
    whole = {p: 2.0 + 0.1 * sum(p) for p in plans}
    whole[(1, 2, 1)], whole[(2, 2, 2)] = 1.0, 1.04                     # within 5%: the fewer threads win
    entry = record_stage_threads(folder, stagewise, machine="test", plans=whole)["stage_threads"]["batches"]
    assert entry["1"]["threads"] == [1, 2, 1] and entry["64"]["threads"] == [2, 2, 2]
    assert entry["1"]["plan_ms"]["1-2-1"] == pytest.approx(1.0) and len(entry["1"]["plan_ms"]) == 8
    assert entry["1"]["stage_ms"]["2"] == pytest.approx([0.2, 0.1, 0.1])     # the stage figures stay beside
    bundle = load_bundle(folder, threads="per-stage")
    assert [_intra(s.sess) for s in bundle._steps] == [1, 2, 1]
    # a count per stage, given directly
    given = load_bundle(folder, threads=[2, 1, 2])
    assert [_intra(s.sess) for s in given._steps] == [2, 1, 2] and given.thread_plan == [[(0.0, 2)], [(0.0, 1)],
                                                                                          [(0.0, 2)]]
    x = torch.rand(30, 1, 32, 32)
    assert torch.equal(given.run(x).exit_index, model.infer(x, policy).exit_index)
    with pytest.raises(BundleError, match="one count per stage"):
        load_bundle(folder, threads=[1, 2])
    with pytest.raises(BundleError, match="one positive thread count per stage"):
        load_bundle(folder, threads=[1, 0, 1])
    with pytest.raises(BundleError, match="plans must give one measured thread count per stage"):
        record_stage_threads(folder, stagewise, plans={(1, 2): 1.0})
    with pytest.raises(BundleError, match="plans must give one measured thread count per stage"):
        record_stage_threads(folder, stagewise, plans={(1, 1, 3): 1.0})
    # the manifest's plan table is validated on writing and on loading
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stage_threads"]["batches"]["1"]["plan_ms"] = {"1-2": 0.5}
    with pytest.raises(BundleError, match="plan_ms must map plans"):
        write_manifest(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="plan_ms must map plans"):
        load_bundle(folder)
    net = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 16, 32]).eval()
    export_bundle(net, tmp_path / "s", (1, 32, 32))
    with pytest.raises(BundleError, match="multi-exit bundles"):
        measure_stage_plans(tmp_path / "s", images)


def test_each_batch_size_takes_the_plan_of_its_own_whole_runs(multi):
    # at batch 64 the later stages get only the rows that did not leave: a plan measured there, with the batch's
    # exit pattern, replaces the stage-by-stage choice at full depth for that batch size (and batch 1 keeps its own)
    from dyncnn.export.runtime import measure_stage_plans
    model, policy, folder = multi
    images = np.random.rand(10, 1, 32, 32).astype(np.float32)
    timed = measure_stage_plans(folder, images, (1, 2), policy, rounds=1, batch=4)
    assert len(timed) == 8 and all(v > 0 for v in timed.values())
    # fewer images than the batch: they are repeated to fill it
    assert len(measure_stage_plans(folder, images[:3], (1,), policy, rounds=1, batch=8)) == 1
    with pytest.raises(dyncnn.errors.DyncnnError, match="batch must be a positive integer"):
        measure_stage_plans(folder, images, (1,), policy, batch=0)
    stagewise = {1: {1: [0.1, 0.1, 0.1], 2: [0.3, 0.3, 0.3]}, 64: {1: [1.0] * 3, 2: [0.5] * 3}}   # 1s / 2s
    at_64 = {p: 1.0 + 0.1 * sum(p) for p in timed}
    at_64[(2, 1, 1)] = 0.5                                                   # the first stage's full batch gains
    at_1 = {p: 1.0 + 0.1 * sum(p) for p in timed}
    entry = record_stage_threads(folder, stagewise, machine="test",
                                 batch_plans={1: at_1, 64: at_64})["stage_threads"]["batches"]
    assert entry["64"]["threads"] == [2, 1, 1] and entry["1"]["threads"] == [1, 1, 1]
    assert entry["64"]["plan_ms"]["2-1-1"] == pytest.approx(0.5) and entry["64"]["stage_ms"]["2"] == [0.5] * 3
    assert stage_threads_table(json.loads((folder / "manifest.json").read_text())) == {1: [1, 1, 1], 64: [2, 1, 1]}
    # the driver: 64 rows in the first stage on its 2-thread session, the rest on 1 thread
    per = load_bundle(folder, threads="per-stage")
    log = []
    for k, step in enumerate(per._steps):
        step.sess = _Recorder(step.sess, log, k)
        step.more = tuple((lo, _Recorder(s, log, k)) for lo, s in step.more)
    x = torch.rand(64, 1, 32, 32)
    assert torch.equal(per.run(x).exit_index, model.infer(x, policy).exit_index)
    assert log[0] == (0, 2, 64) and all(t == 1 for k, t, _ in log[1:])
    with pytest.raises(BundleError, match="for a positive batch size"):
        record_stage_threads(folder, stagewise, batch_plans={0: at_1})


def test_a_mixed_plan_timed_per_round_must_beat_the_better_uniform_plan_in_every_round():
    # the fastest median of many noisy plans favours a lucky one: timed per round (paired), a mixed plan is
    # recorded only where it beat the better plan of one count everywhere in every round, by the margin at the median
    from dyncnn.export.runtime import pick_plan
    one, two = (1, 1, 1), (2, 2, 2)
    base = [1.0, 1.1, 0.9, 1.0, 1.2]
    lucky = [0.7, 0.8, 0.6, 1.2, 0.9]                       # the lowest median (0.8), but lost round 4
    found = {one: base, two: [1.3 * v for v in base], (1, 2, 1): lucky, (2, 1, 1): [v * 0.97 for v in base]}
    assert pick_plan({p: float(np.median(v)) for p, v in found.items()}) == (1, 2, 1)   # medians: the lucky one
    assert pick_plan(found) == one            # (2, 1, 1) won every round, but by 3%: not enough for its thread
    found[(1, 1, 2)] = [v * 0.8 for v in base]                  # 20% faster in every round: earns its thread
    assert pick_plan(found) == (1, 1, 2)
    # between the uniform plans the median decides: 2 threads everywhere, 40% faster but for one slow round, is
    # the reference the mixed plans must beat, even one that beat 1 thread in every round
    found = {one: base, two: [0.6, 0.66, 0.54, 1.3, 0.72], (1, 2, 2): [v * 0.75 for v in base],
             (2, 1, 1): [v * 0.8 for v in base]}
    assert pick_plan(found) == two
    found[(1, 2, 2)] = [0.5, 0.55, 0.45, 0.5, 0.6]              # under the reference in every round: it wins
    assert pick_plan(found) == (1, 2, 2)
    found[two] = [v * 0.97 for v in base]                       # within 5% of 1 thread: the fewer threads
    found[(1, 2, 2)], found[(2, 1, 1)] = [v * 0.93 for v in base], [v * 1.1 for v in base]
    assert pick_plan(found) == (1, 2, 2)                         # 7% under the reference in every round
    found[(1, 2, 2)] = [v * 0.99 for v in base]
    assert pick_plan(found) == one
    with pytest.raises(dyncnn.errors.DyncnnError, match="the plans of one count everywhere"):
        pick_plan({(2, 1, 1): base, (1, 2, 2): base})
    with pytest.raises(dyncnn.errors.DyncnnError, match="the same number of rounds each"):
        pick_plan({one: base, two: base[:3]})
    with pytest.raises(dyncnn.errors.DyncnnError, match="not both"):
        pick_plan({one: base, two: 0.5})
    with pytest.raises(dyncnn.errors.DyncnnError, match="no measured plans"):
        pick_plan({})


def test_plans_timed_per_round_are_recorded_with_their_medians(multi):
    from dyncnn.export.runtime import measure_stage_plans
    _, policy, folder = multi
    images = np.random.rand(6, 1, 32, 32).astype(np.float32)
    timed = measure_stage_plans(folder, images, (1, 2), policy, rounds=2, per_round=True)
    assert len(timed) == 8 and all(len(v) == 2 and min(v) > 0 for v in timed.values())
    stagewise = {1: {1: [0.1, 0.1, 0.1], 2: [0.3, 0.3, 0.3]}}
    rounds = {p: [1.0 + 0.1 * sum(p), 1.2 + 0.1 * sum(p), 0.9 + 0.1 * sum(p)] for p in timed}
    rounds[(2, 1, 1)] = [0.5, 2.0, 0.5]                  # median 0.5, far the fastest, but lost round 2
    entry = record_stage_threads(folder, stagewise, machine="test", plans=rounds)["stage_threads"]["batches"]["1"]
    assert entry["threads"] == [1, 1, 1] and entry["plan_ms"]["2-1-1"] == pytest.approx(0.5)
    assert entry["plan_ms"]["1-1-1"] == pytest.approx(1.3)
    rounds[(2, 1, 1)] = [0.5, 0.6, 0.5]
    entry = record_stage_threads(folder, stagewise, machine="test", plans=rounds)["stage_threads"]["batches"]["1"]
    assert entry["threads"] == [2, 1, 1]
    assert [_intra(s.sess) for s in load_bundle(folder, threads="per-stage")._steps] == [2, 1, 1]
    with pytest.raises(BundleError, match="finite milliseconds"):
        record_stage_threads(folder, stagewise, plans={**rounds, (1, 1, 1): [1.0, float("nan"), 1.0]})
    with pytest.raises(BundleError, match="batch 1: plans timed per round need the same number of rounds"):
        record_stage_threads(folder, stagewise, plans={**rounds, (1, 1, 1): [1.0]})


def _recorded(kind: str, table: dict) -> dict:
    """A manifest holding only what per_stage_as_uniform reads: the kind, the stages and the recorded counts."""
    stages = len(next(iter(table.values())))
    return {"kind": kind, "num_exits": stages,
            "stage_threads": {"batches": {str(b): {"threads": t} for b, t in table.items()}}}


def test_per_stage_is_a_uniform_count_only_where_the_plan_of_the_batch_is_that_count_everywhere():
    from dyncnn.export.runtime import per_stage_as_uniform
    static = _recorded("static", {1: [1], 64: [2]})
    assert per_stage_as_uniform(static, 1) == 1 and per_stage_as_uniform(static, 64) == 2
    assert per_stage_as_uniform(static, 4) == 1 and per_stage_as_uniform(static, 16) == 2     # the nearest batch
    # a multi-exit run takes the plan of its batch size in every stage, also where later stages get fewer rows
    multi = _recorded("multi_exit", {1: [1, 1, 1], 64: [2, 2, 2]})
    assert per_stage_as_uniform(multi, 1) == 1 and per_stage_as_uniform(multi, 64) == 2
    mixed = _recorded("multi_exit", {1: [1, 2, 1], 64: [2, 2, 2]})
    assert per_stage_as_uniform(mixed, 1) is None and per_stage_as_uniform(mixed, 64) == 2
    # nothing recorded: no count to stand for
    assert per_stage_as_uniform({"kind": "static", "num_exits": 1}, 1) is None


def test_stage_threads_measured_as_the_frontier_times_pause_before_each_pass(tmp_path, monkeypatch):
    # with settle_s, every pass (each count, each round, each batch size) waits first and makes one untimed call,
    # as the frontier's timing turns do: a count that wins back to back can lose after the pause
    import dyncnn.export.runtime as rt
    net = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 16, 32]).eval()
    export_bundle(net, tmp_path / "s", (1, 32, 32))
    slept, passes = [], []
    monkeypatch.setattr(rt.time, "sleep", slept.append)
    real = rt.StaticBundle.stage_pass_ms
    monkeypatch.setattr(rt.StaticBundle, "stage_pass_ms",
                        lambda self, chunks: passes.append((self.threads, len(chunks))) or real(self, chunks))
    images = np.random.rand(3, 1, 32, 32).astype(np.float32)
    measure_stage_threads(tmp_path / "s", images, (1, 2), (1,), rounds=2, settle_s=0.05)
    assert slept == [0.05] * 4                                   # 2 counts x 2 rounds
    # warm-up (4 chunks each), then per round and count: the untimed call (1 chunk), the timed pass (3 chunks)
    assert passes == [(1, 3), (2, 3), (1, 1), (1, 3), (2, 1), (2, 3), (2, 1), (2, 3), (1, 1), (1, 3)]
    slept.clear()
    measure_stage_threads(tmp_path / "s", images, (1, 2), (1,), rounds=2)
    assert slept == []                                           # back to back by default


def test_several_bundles_measured_together_take_turns_in_every_round(tmp_path, multi, monkeypatch):
    # a slow phase of the machine lasts seconds: measured together, each bundle's rounds are spread over the whole
    # measurement (every bundle takes its turn in each round, their order rotated), instead of lying back to back
    import dyncnn.export.runtime as rt
    from dyncnn.export.runtime import measure_stage_plans, measure_stage_plans_many, measure_stage_threads_many
    model, policy, folder = multi
    net = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 16, 32]).eval()
    export_bundle(net, tmp_path / "s", (1, 32, 32))
    images = np.random.rand(4, 1, 32, 32).astype(np.float32)
    order = []
    for cls in (rt.StaticBundle, rt.DynamicBundle):
        real = cls.stage_pass_ms
        monkeypatch.setattr(cls, "stage_pass_ms", lambda self, chunks, real=real: order.append(
            (self.folder.name, self.threads, len(chunks))) or real(self, chunks))
    found = measure_stage_threads_many([tmp_path / "s", folder], images, (1, 2), (1,), rounds=2)
    assert [sorted(f[1]) for f in found] == [[1, 2], [1, 2]]
    assert len(found[0][1][1]) == 1 and len(found[1][1][1]) == 3        # the static graph; the three stages
    timed = [(name, t) for name, t, n in order if n == 4]                  # the timed passes (warm-up: 4 chunks too)
    assert timed[4:] == [("s", 1), ("s", 2), ("b", 1), ("b", 2),          # round 0: both bundles, in order
                         ("b", 2), ("b", 1), ("s", 2), ("s", 1)]          # round 1: both orders rotated
    # the plans of several multi-exit bundles: one result each, as measured alone
    other = tmp_path / "b2"
    export_bundle(model, other, (1, 32, 32), policy=policy)
    both = measure_stage_plans_many([(folder, policy, ()), (other, None, [(2, 1, 1)])], images, (1, 2), rounds=2,
                                    per_round=True)
    alone = measure_stage_plans(folder, images, (1, 2), policy, rounds=2, per_round=True)
    assert sorted(both[0]) == sorted(alone) and sorted(both[1]) == sorted(alone)     # (2, 1, 1) is among them
    assert all(len(v) == 2 and min(v) > 0 for f in both for v in f.values())
    with pytest.raises(BundleError, match="multi-exit bundles"):
        measure_stage_plans_many([(folder, policy, ()), (tmp_path / "s", None, ())], images)
    assert measure_stage_threads_many([], images) == []
