"""Dynamic export: per-stage graphs + manifest, and the ONNX Runtime driver that keeps the exits."""
import json
import math

import numpy as np
import pytest
import torch

import dyncnn
from dyncnn.dynamic import Cascade, ExitPolicy
from dyncnn.dynamic.policy import confidence
from dyncnn.export import FORMAT, BundleError, confidence_np, export_bundle, load_bundle
from dyncnn.export.runtime import DynamicBundle, exit_test_one, row_values


class _Recorder:
    """Wraps an ONNX Runtime session and records the batch size of every call."""

    def __init__(self, sess, log, key):
        self.sess, self.log, self.key = sess, log, key

    def run(self, names, feed):
        self.log.append((self.key, next(iter(feed.values())).shape[0]))
        return self.sess.run(names, feed)


def _record(bundle: DynamicBundle) -> list:
    log = []
    for k, step in enumerate(bundle._steps):
        if step.sess is not None:
            step.sess = _Recorder(step.sess, log, k)
    return log


def test_decisions_equal_eager_on_whole_scaled_mnist_test_split(tmp_path, scaled_mnist, tiny_multi_exit,
                                                              spread_policy):
    xv, _ = scaled_mnist["val"]
    xt, _ = scaled_mnist["test"]
    model = tiny_multi_exit(bn_images=xv)
    policy = spread_policy(model, xv, "max_prob", [0.05, 0.05, 1.0])    # temperatures of an under-confident net
    manifest = export_bundle(model, tmp_path / "b", (1, 64, 64), policy=policy, check_inputs=[xv[:32]])
    assert manifest["check"]["max_rel_err"] < 1e-4 and manifest["check"]["real_batches"] == 1
    bundle = load_bundle(tmp_path / "b")
    got = bundle.run(xt)                                   # the 1000 test images in one call
    want = model.infer(xt, policy)
    hist = torch.bincount(want.exit_index, minlength=3)
    assert (hist >= 100).all(), hist                       # the thresholds really spread samples over exits
    assert torch.equal(got.exit_index, want.exit_index)    # every decision equal
    assert torch.equal(got.macs, want.macs)                # same per-sample ledger
    assert float((got.logits - want.logits).abs().max() / want.logits.abs().max()) < 1e-4
    assert got.logits.dtype == torch.float32 and got.exit_index.dtype == got.macs.dtype == torch.int64
    # the ledger is the manifest's cumulative cost of the exit taken, which equals eager's exit_macs
    assert manifest["exit_macs"] == model.exit_macs(xt[:1])
    assert torch.equal(got.macs, torch.tensor(manifest["exit_macs"])[got.exit_index])
    # in chunks of 64, and one sample at a time, the same answers
    chunks = [bundle.run(xt[i:i + 64]) for i in range(0, 1000, 64)]
    assert torch.equal(torch.cat([c.exit_index for c in chunks]), want.exit_index)
    ones = [bundle.run(xt[i:i + 1].numpy()) for i in range(1000)]      # numpy input works too
    assert torch.equal(torch.cat([o.exit_index for o in ones]), want.exit_index)     # batch-1 path: same decisions
    assert torch.equal(torch.cat([o.macs for o in ones]), want.macs)
    assert float((torch.cat([o.logits for o in ones]) - want.logits).abs().max() / want.logits.abs().max()) < 1e-4


def test_later_stages_see_only_the_active_rows(tmp_path, tiny_multi_exit, spread_policy):
    model = tiny_multi_exit()
    x = torch.rand(48, 1, 32, 32)
    policy = spread_policy(model, torch.rand(200, 1, 32, 32))
    export_bundle(model, tmp_path / "b", (1, 32, 32), policy=policy)
    bundle = load_bundle(tmp_path / "b")
    log = _record(bundle)
    res = bundle.run(x)
    hist = torch.bincount(res.exit_index, minlength=3).tolist()
    assert hist[0] > 0 and hist[1] > 0 and hist[2] > 0
    assert log == [(0, 48), (1, 48 - hist[0]), (2, 48 - hist[0] - hist[1])]   # one call per exit, active rows
    # forced to full depth, every stage sees the whole batch
    log.clear()
    full = bundle.run(x, bundle.full_depth())
    assert log == [(0, 48), (1, 48), (2, 48)] and (full.exit_index == 2).all()


def test_manifest_records_order_states_policy_and_costs(tmp_path, tiny_multi_exit):
    model = tiny_multi_exit()
    policy = ExitPolicy([0.3, 0.5], "entropy", [1.5, 0.8, 1.0])
    export_bundle(model, tmp_path / "b", (1, 32, 32), policy=policy)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["format"] == FORMAT and m["kind"] == "multi_exit" and m["num_exits"] == 3
    assert m["model"] == {"name": "multi_exit", "cfg": {"backbone": "tiny_mobilenet", "num_classes": 10,
                                                        "in_chans": 1, "backbone_cfg": {"widths": [8, 16, 32]}}}
    assert m["input"] == {"name": "input", "shape": ["batch", 1, 32, 32], "dtype": "float32"}
    assert m["policy"] == {"thresholds": [0.3, 0.5], "criterion": "entropy", "temperatures": [1.5, 0.8, 1.0]}
    assert [s["order"] for s in m["stages"]] == [0, 1, 2]
    assert [s["file"] for st in m["stages"] for s in st["files"].values()] == ["stage0.onnx", "stage1.onnx",
                                                                                "stage2.onnx"]
    cum = np.cumsum([s["stage_macs"] + s["head_macs"] for s in m["stages"]]).tolist()
    assert cum == m["exit_macs"] == model.exit_macs(torch.zeros(1, 1, 32, 32))
    # stages 0 and 1 pass their feature map on and compute their head's logits; the last computes logits only
    assert [(s["outputs"], s["logits"]["source"]) for s in m["stages"]] == [([0], "graph"), ([0], "graph"),
                                                                          ([], "graph")]
    # the state structure between stages: a dict of one named feature map, from the traced segments
    from torch.utils._pytree import treespec_loads
    spec = treespec_loads(m["stages"][0]["state_out"]["spec"])
    assert spec.num_leaves == 1 and m["stages"][0]["state_out"]["leaves"][0]["shape"] == [8, 16, 16]
    assert m["stages"][1]["state_in"] == m["stages"][0]["state_out"] | {
        "leaves": [{k: v for k, v in leaf.items() if k != "source"} for leaf in m["stages"][0]["state_out"]["leaves"]]}
    # the bundle uses the recorded policy, and a policy given to run() overrides it
    bundle = load_bundle(tmp_path / "b")
    assert bundle.policy == policy
    x = torch.rand(20, 1, 32, 32)
    assert torch.equal(bundle.run(x).exit_index, model.infer(x, policy).exit_index)
    assert (bundle.run(x, [-math.inf, -math.inf]).exit_index == 0).all()


@pytest.mark.parametrize("criterion", ["max_prob", "entropy", "margin"])
def test_numpy_confidence_matches_torch(criterion):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=g) * torch.rand(4000, 1, generator=g) * 8
    for temp in (1.0, 1.7):
        want = confidence(logits, criterion, temp).numpy()
        got = confidence_np(logits.numpy(), criterion, temp)
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= 4e-7          # a few float32 ulps at most


@pytest.mark.parametrize("classes", [2, 10, 64, 100])
@pytest.mark.parametrize("criterion", ["max_prob", "entropy", "margin"])
def test_single_sample_exit_test_is_the_float32_twins_decision(criterion, classes):
    """The batch-1 test screens in double precision; its decision must be the float32 twin's, also for thresholds
    placed exactly at a sample's float32 confidence or one ulp either side of it (where the two could differ)."""
    rng = np.random.default_rng(classes)
    logits = (rng.standard_normal((300, classes)) * rng.random((300, 1)) * 12).astype(np.float32)
    logits[:20] *= 40                                      # confidences of exactly 1.0 in float32
    checked = near = 0
    for temp in (1.0, 0.37, 1.9):
        conf = confidence_np(logits, criterion, temp)
        for row, c in zip(logits, conf):
            one = row[None]
            values = row_values(one)
            assert (values is None) == (classes > 64)
            for thr in (c, np.nextafter(c, np.float32(2)), np.nextafter(c, np.float32(-2)), np.float32(1.0),
                        np.float32(rng.random())):
                want = bool(confidence_np(one, criterion, temp)[0] >= thr)
                assert exit_test_one(one, values, criterion, temp, np.float32(thr)) == want, (row, temp, thr)
                checked += 1
                near += abs(float(c) - float(thr)) < 1e-6
    assert checked == 4500 and near >= 2700                # most thresholds sit within float32 rounding


def test_non_finite_logits_are_refused_at_batch_1_and_in_a_batch(tmp_path, tiny_multi_exit):
    class _Poison:
        def __init__(self, sess, value):
            self.sess, self.value = sess, value

        def run(self, names, feed):
            outs = self.sess.run(names, feed)
            outs[-1][-1, 3] = self.value                    # the last row's logits of stage 1's head
            return outs

    model = tiny_multi_exit()
    export_bundle(model, tmp_path / "b", (1, 32, 32), policy=ExitPolicy([math.inf, math.inf]))
    x = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
    for value in (np.nan, np.inf, -np.inf):
        bundle = load_bundle(tmp_path / "b")
        bundle._steps[1].sess = _Poison(bundle._steps[1].sess, value)
        for batch in (x[:1], x):
            with pytest.raises(FloatingPointError, match="exit 1 produced NaN/Inf logits for 1 samples"):
                bundle.run(batch)


@pytest.mark.parametrize("criterion,temperatures", [("max_prob", []), ("entropy", [0.02, 1.0, 1.0]),
                                                    ("margin", [1.0, 0.05, 1.0])])
def test_other_criteria_and_temperatures_decide_as_eager(tmp_path, scaled_mnist, tiny_multi_exit, spread_policy,
                                                         criterion, temperatures):
    xv, _ = scaled_mnist["val"]
    xt, _ = scaled_mnist["test"]
    model = tiny_multi_exit(seed=1, bn_images=xv)
    policy = spread_policy(model, xv, criterion, temperatures)
    export_bundle(model, tmp_path / "b", (1, 64, 64), policy=policy)
    got, want = load_bundle(tmp_path / "b").run(xt), model.infer(xt, policy)
    assert len(set(want.exit_index.tolist())) == 3
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)


def _ranet():
    torch.manual_seed(0)
    return dyncnn.create_model("ranet_cifar", num_classes=10, nChannels=4, growthRate=4, head_channels=8,
                               scale_list=(1, 2, 3), grFactor=(2, 1, 1), bnFactor=(2, 1, 1), nBlocks=1,
                               block_step=1, step=1).eval()


def _msdnet():
    torch.manual_seed(0)
    return dyncnn.create_model("msdnet_cifar", num_classes=10, nBlocks=3, step=1, base=1, nChannels=4,
                               growthRate=4).eval()


def _cascade():
    torch.manual_seed(0)
    return Cascade([dyncnn.create_model("tiny_mobilenet", in_chans=3, widths=(8, 16)),
                    dyncnn.create_model("tiny_mobilenet", in_chans=3, widths=(8, 16, 32))], 10, 3).eval()


@pytest.mark.parametrize("build", [_ranet, _msdnet, _cascade], ids=["ranet_dict_state", "msdnet_list_state",
                                                                     "cascade_identity_stages"])
def test_other_state_pytrees(tmp_path, build, spread_policy):
    if build is _msdnet and "msdnet_cifar" not in dyncnn.list_models():
        pytest.skip("msdnet not registered")
    model = build()
    policy = spread_policy(model, torch.rand(96, 3, 32, 32))
    manifest = export_bundle(model, tmp_path / "b", (3, 32, 32), policy=policy)
    x = torch.rand(64, 3, 32, 32)
    got, want = load_bundle(tmp_path / "b").run(x), model.infer(x, policy)
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)
    assert float((got.logits - want.logits).abs().max() / want.logits.abs().max()) < 1e-4
    assert len(set(want.exit_index.tolist())) >= 2
    sources = {leaf.get("source") for s in manifest["stages"] for leaf in s["state_out"]["leaves"]}
    if build is _cascade:              # identity stages: the image passes through, the graphs are the models
        assert sources == {"input"} and all(s["outputs"] == [] for s in manifest["stages"])
    if build is _ranet:                # RANet keeps the lower flow's inputs untouched between stages
        assert "input" in sources and "graph" in sources


# -- bad input --------------------------------------------------------------------------------------------------

@pytest.fixture
def bundle_dir(tmp_path, tiny_multi_exit):
    export_bundle(tiny_multi_exit(), tmp_path / "b", (1, 32, 32), policy=[0.2, 0.3])
    return tmp_path / "b"


def test_bundle_without_manifest_or_of_other_version_is_refused(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "format": "dyncnn-bundle-0"}))
    with pytest.raises(BundleError, match="format 'dyncnn-bundle-0'.*reads 'dyncnn-bundle-1'"):
        load_bundle(bundle_dir)
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(bundle_dir / "nowhere")


def test_stage_files_that_do_not_match_are_refused(bundle_dir, tmp_path, tiny_multi_exit):
    (bundle_dir / "stage1.onnx").rename(tmp_path / "stage1.onnx")
    with pytest.raises(BundleError, match="stage 1 file stage1.onnx is missing"):
        load_bundle(bundle_dir)
    # a stage file of another export (same names, other weights)
    export_bundle(tiny_multi_exit(seed=5), tmp_path / "other", (1, 32, 32))
    (tmp_path / "other" / "stage1.onnx").rename(bundle_dir / "stage1.onnx")
    with pytest.raises(BundleError, match="stage 1 file stage1.onnx .*another export"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="no int8 graph"):
        load_bundle(tmp_path / "other", precision="int8")


def test_bad_inputs_are_refused_before_any_session_runs(bundle_dir):
    bundle = load_bundle(bundle_dir)
    log = _record(bundle)
    with pytest.raises(ValueError, match=r"expected shape \(N, 1, 32, 32\).*got \(2, 1, 64, 64\)"):
        bundle.run(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"got \(1, 32, 32\) \(add a batch axis\)"):
        bundle.run(torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match=r"expected shape \(N, 1, 32, 32\).*got \(2, 3, 32, 32\)"):
        bundle.run(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="floating-point.*uint8"):
        bundle.run(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="floating-point.*int64"):
        bundle.run(np.zeros((2, 1, 32, 32), np.int64))
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        x = torch.rand(2, 1, 32, 32)
        x[1, 0, 3, 3] = float("nan")
        bundle.run(x)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        bundle.run([[0.0]])
    with pytest.raises(ValueError, match="expected 2 thresholds"):
        bundle.run(torch.rand(2, 1, 32, 32), [0.5])
    assert log == []                                  # nothing reached ONNX Runtime
    empty = bundle.run(torch.zeros(0, 1, 32, 32))
    assert empty.logits.shape == (0, 10) and empty.exit_index.shape == empty.macs.shape == (0,)
    r = bundle.run(torch.rand(2, 1, 32, 32, dtype=torch.float64))   # float64 is cast, as eager accepts it
    assert r.logits.dtype == torch.float32


def test_export_refuses_a_folder_that_is_not_a_bundle_and_replaces_an_old_bundle(tmp_path, tiny_multi_exit):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty folder without a dyncnn bundle"):
        export_bundle(tiny_multi_exit(), tmp_path / "mine", (1, 32, 32))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    export_bundle(tiny_multi_exit(), tmp_path / "b", (1, 32, 32), policy=[0.1, 0.2])
    export_bundle(tiny_multi_exit(), tmp_path / "b", (1, 32, 32), policy=[0.3, 0.4])
    assert load_bundle(tmp_path / "b").policy.thresholds == [0.3, 0.4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "mine"]     # no temporary folders left
