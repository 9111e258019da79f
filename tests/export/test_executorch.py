"""ExecuTorch (XNNPACK) bundles: the same manifest and driver as ONNX Runtime, another per-graph session."""
import json
import shutil

import pytest
import torch
from torch import nn

import dyncnn
from dyncnn.dynamic import Cascade
from dyncnn.export import ExportError, export_bundle, load_bundle
from dyncnn.export.executorch import ExecuTorchSession, available

pytestmark = pytest.mark.skipif(not available(), reason="executorch not installed (pip install dyncnn[mobile])")


def _rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _tiny_static():
    torch.manual_seed(0)
    return dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 16, 32]).eval()


@pytest.fixture(scope="module")
def static_bundle(tmp_path_factory):
    """The tiny static model exported once for the static tests: FP32 and PT2E INT8, batch bound 16."""
    model = _tiny_static()
    folder = tmp_path_factory.mktemp("et") / "b"
    manifest = export_bundle(model, folder, (1, 32, 32), runtime="executorch", max_batch=16, quantize=True,
                             calibration=torch.rand(64, 1, 32, 32))
    return model, folder, manifest


def test_static_round_trip_any_batch_size(static_bundle):
    model, folder, manifest = static_bundle
    assert manifest["runtime"] == "executorch" and manifest["kind"] == "static"
    assert manifest["graph"]["files"]["fp32"]["file"] == "model.pte" and (folder / "model.pte").exists()
    assert manifest["executorch"]["max_batch"] == 16 and manifest["check"]["max_rel_err"] < 1e-4
    bundle = load_bundle(folder, threads=2)
    assert bundle.runtime == "executorch" and isinstance(bundle.sess, ExecuTorchSession)
    assert bundle.sess.max_batch == 16              # the exported bound survives XNNPACK lowering
    for n in (1, 3, 16, 37):                        # 37 > max_batch: run in chunks of 16
        x = torch.rand(n, 1, 32, 32)
        with torch.no_grad():
            assert _rel(bundle.run(x), model(x)) < 1e-4
    a, b = bundle.run_numpy(torch.rand(2, 1, 32, 32)), bundle.run_numpy(torch.rand(2, 1, 32, 32))
    assert not (a == b).all()                       # outputs are copies, not views of the planned memory
    with pytest.raises(dyncnn.errors.DyncnnError, match=r"expected shape \(N, 1, 32, 32\)"):
        bundle.run(torch.rand(2, 1, 28, 28))


@pytest.fixture(scope="module")
def multi_exit_bundle(tmp_path_factory, tiny_multi_exit, spread_policy):
    """The tiny multi_exit network (3 exits) with thresholds that spread samples over its exits, exported once
    with FP32 and INT8 programs per stage."""
    xv = torch.rand(128, 1, 32, 32)
    model = tiny_multi_exit(bn_images=xv)
    policy = spread_policy(model, xv)
    folder = tmp_path_factory.mktemp("et") / "b"
    manifest = export_bundle(model, folder, (1, 32, 32), policy=policy, runtime="executorch", quantize=True,
                             calibration=torch.rand(64, 1, 32, 32))
    return model, policy, folder, manifest


def test_multi_exit_decisions_macs_and_logits_equal_eager(multi_exit_bundle):
    model, policy, folder, manifest = multi_exit_bundle
    assert manifest["runtime"] == "executorch" and manifest["num_exits"] == 3
    assert all(s["files"]["fp32"]["file"] == f"stage{k}.pte" for k, s in enumerate(manifest["stages"]))
    bundle = load_bundle(folder)
    calls = []                                      # the batch each stage's program sees
    for k, step in enumerate(bundle._steps):
        run = step.sess.run
        step.sess.run = lambda names, feed, k=k, run=run: (calls.append((k, len(next(iter(feed.values()))))),
                                                           run(names, feed))[1]
    x = torch.rand(48, 1, 32, 32)
    got, want = bundle.run(x), model.infer(x, policy)
    hist = torch.bincount(want.exit_index, minlength=3).tolist()
    assert min(hist) > 0, hist                      # the thresholds spread samples over every exit
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)
    assert _rel(got.logits, want.logits) < 1e-4
    assert calls == [(0, 48), (1, 48 - hist[0]), (2, hist[2])]     # compaction: later programs see fewer rows
    for i in range(0, 48, 11):                      # one sample at a time: the same decisions
        assert int(bundle.run(x[i:i + 1]).exit_index) == int(want.exit_index[i])


def test_quantized_multi_exit_calibrates_every_stage_on_its_own_inputs(multi_exit_bundle):
    _, _, folder, manifest = multi_exit_bundle
    assert all(set(s["files"]) == {"fp32", "int8"} for s in manifest["stages"])
    x = torch.rand(32, 1, 32, 32)
    fp32, int8 = load_bundle(folder).exit_logits(x), load_bundle(folder, "int8").exit_logits(x)
    for a, b in zip(fp32, int8):          # later stages see INT8 states calibrated on the states they really get
        assert 0 < float(abs(a - b).max() / abs(a).max()) < 0.05
    res = load_bundle(folder, "int8").run(x)
    assert torch.equal(res.macs, torch.tensor(manifest["exit_macs"])[res.exit_index])


def _msdnet():
    torch.manual_seed(0)
    return dyncnn.create_model("msdnet_cifar", num_classes=10, nBlocks=2, step=1, base=1, nChannels=4,
                               growthRate=4).eval()


def _cascade():
    torch.manual_seed(0)
    return Cascade([dyncnn.create_model("tiny_mobilenet", in_chans=3, widths=(8, 16)),
                    dyncnn.create_model("tiny_mobilenet", in_chans=3, widths=(8, 16, 32))], 10, 3).eval()


@pytest.mark.parametrize("build", [_msdnet, _cascade], ids=["msdnet_list_state", "cascade_identity_stages"])
def test_other_multi_exit_families(tmp_path, build, spread_policy):
    model = build()
    policy = spread_policy(model, torch.rand(96, 3, 32, 32))
    export_bundle(model, tmp_path / "b", (3, 32, 32), policy=policy, runtime="executorch")
    x = torch.rand(40, 3, 32, 32)
    got, want = load_bundle(tmp_path / "b").run(x), model.infer(x, policy)
    assert len(set(want.exit_index.tolist())) >= 2
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)
    assert _rel(got.logits, want.logits) < 1e-4


class _Deformable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = dyncnn.layers.deform.DeformConv2d(4, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def test_op_without_executorch_kernel_is_named_with_its_module(tmp_path):
    with pytest.raises(ExportError, match=r"deform_conv2d.*module 'body'.*\(DeformConv2d\)"):
        export_bundle(_Deformable().eval(), tmp_path / "b", (1, 16, 16), runtime="executorch")
    assert not (tmp_path / "b").exists()            # nothing half-written


class _Cumulative(nn.Module):
    """A convolution (XNNPACK) followed by a cumulative sum over channels (no XNNPACK kernel: portable)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, stride=4)
        self.head = _CumsumHead()

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


class _CumsumHead(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


def test_ops_outside_xnnpack_run_on_portable_kernels_and_are_listed(tmp_path):
    model = _Cumulative().eval()
    manifest = export_bundle(model, tmp_path / "b", (1, 16, 16), runtime="executorch", max_batch=4)
    ops = manifest["executorch"]["portable_ops"]
    assert {"op": "aten::cumsum", "module": "module 'head' (_CumsumHead)"} in ops
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        assert _rel(load_bundle(tmp_path / "b").run(x), model(x)) < 1e-4


def test_quantized_static_export(static_bundle):
    _, folder, manifest = static_bundle
    assert set(manifest["graph"]["files"]) == {"fp32", "int8"} and "PT2E" in manifest["int8"]["method"]
    fp32, int8 = load_bundle(folder), load_bundle(folder, "int8")
    x = torch.rand(32, 1, 32, 32)
    a, b = fp32.run(x), int8.run(x)
    assert 0 < _rel(b, a) < 0.2                     # quantized (not identical), close to FP32


def test_runtime_is_validated(tmp_path, static_bundle):
    with pytest.raises(ExportError, match="runtime must be one of"):
        export_bundle(_tiny_static(), tmp_path / "b", (1, 32, 32), runtime="tflite")
    shutil.copytree(static_bundle[1], tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**manifest, "runtime": "tflite"}))
    with pytest.raises(dyncnn.export.BundleError, match="unknown runtime 'tflite'"):
        load_bundle(tmp_path / "b")


def test_cli_export_and_bench_rows(tmp_path, capsys):
    from dyncnn.cli import main
    common = ["--input-size", "32", "--dataset", "mnist"]
    assert main(["export", "tiny_mobilenet", *common, "--runtime", "executorch", "--max-batch", "8",
                 "--out", str(tmp_path / "b")]) == 0
    assert "1 ExecuTorch (XNNPACK) program" in capsys.readouterr().out
    bundle = load_bundle(tmp_path / "b")
    assert bundle.runtime == "executorch" and bundle.sess.max_batch == 8
    assert main(["bench", "tiny_mobilenet", *common, "--min-time", "0.02", "--images", "8", "--batch-sizes", "1",
                 "2", "--no-quantize", "--runtimes", "onnxruntime", "executorch", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {(r["backend"], r["precision"], r["batch"]) for r in result["rows"]}
    assert keys == {(b, "fp32", n) for b in ("eager", "onnxruntime", "executorch") for n in (1, 2)}
    assert all(r["median_ms"] > 0 for r in result["rows"])


def test_shufflenet_v2_runs_at_every_batch_up_to_the_bound(tmp_path):
    """ShuffleNetV2's channel split is two slices: XNNPACK's split (chunk) with a dynamic batch plans its outputs at
    the export batch, and a batch of another size failed at run time (method->execute() error 0x10)."""
    torch.manual_seed(0)
    model = dyncnn.create_model("shufflenet_v2", num_classes=10, in_chans=1, width_mult=0.5).eval()
    export_bundle(model, tmp_path / "b", (1, 32, 32), runtime="executorch", max_batch=4)
    bundle = load_bundle(tmp_path / "b")
    for n in (1, 3, 4):
        x = torch.rand(n, 1, 32, 32)
        with torch.no_grad():
            assert _rel(torch.as_tensor(bundle.run_numpy(x.numpy())), model(x)) < 1e-4


def test_a_program_failing_at_run_time_names_the_batch_and_the_known_cause(tmp_path):
    class Split(nn.Module):          # chunk inside an XNNPACK partition: planned at the export batch
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a, b = self.conv(x).chunk(2, 1)
            return self.head(torch.stack((a, b), 2).flatten(1, 2)).mean((2, 3))
    from dyncnn.export.executorch import lower_graph
    lower_graph(Split().eval(), (torch.rand(2, 1, 8, 8),), tmp_path / "m.pte", max_batch=4)
    sess = ExecuTorchSession(tmp_path / "m.pte", ["x"], ["y"])
    with pytest.raises(dyncnn.DyncnnError, match=r"failed on a batch of \d+ \(bound \d+\).*split / chunk"):
        sess.run(None, {"x": torch.rand(3, 1, 8, 8).numpy()})
