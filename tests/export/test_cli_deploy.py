"""`dyncnn export` and `dyncnn bench` on a checkpoint (with its thresholds file) and on a model name."""
import json

import pytest
import torch

import dyncnn
from dyncnn.cli import main
from dyncnn.data import get_dataset
from dyncnn.dynamic.calibration import calibrate, save_thresholds
from dyncnn.export import load_bundle
from dyncnn.train import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A multi-exit checkpoint recorded as a 28x28 MNIST model, with thresholds beside it (random weights,
    batch-norm statistics from the validation images so that confidences differ between images)."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1,
                                backbone_cfg={"widths": [8, 16, 32]})
    val = get_dataset("mnist", "val")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        model(torch.stack([val[i][0] for i in range(len(val))]))
    model.eval()
    path = save_checkpoint(folder / "last.safetensors", model,
                           extra={"data": {"name": "mnist", "seed": 0, "input_size": 28}})
    cum = model.exit_macs(val[0][0][None])
    save_thresholds(calibrate(model, val, target_macs=(cum[0] + cum[-1]) / 2), folder / "thresholds.json")
    return path, model


def test_export_checkpoint_with_its_thresholds_and_int8(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    assert main(["export", str(path), "--out", str(tmp_path / "b"), "--quantize", "--calib-images", "32"]) == 0
    out = capsys.readouterr().out
    assert "3 ONNX graphs, + INT8" in out and "thresholds.json" in out
    record = json.loads((path.parent / "thresholds.json").read_text())
    bundle = load_bundle(tmp_path / "b")
    assert bundle.policy.thresholds == record["thresholds"] and bundle.input_shape == (1, 28, 28)
    x = torch.stack([get_dataset("mnist", "test")[i][0] for i in range(200)])
    got, want = bundle.run(x), model.infer(x, bundle.policy)
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)
    assert load_bundle(tmp_path / "b", "int8").run(x).logits.shape == (200, 10)


def test_bench_json_of_a_dynamic_checkpoint(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["bench", str(path), "--json", "--min-time", "0.02", "--images", "12", "--batch-sizes", "1",
                 "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "multi_exit" and result["threads"] == 2 and result["policy_source"].endswith(
        "thresholds.json")
    keys = {(r["backend"], r["precision"], r["batch"], r["mode"]) for r in result["rows"]}
    assert keys == {(b, p, n, m) for b, p in [("eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
                    for n in (1, 4) for m in ("policy", "full")}
    assert all(r["median_ms"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] for r in result["rows"])
    dyn = result["dynamic"]
    assert len(dyn["speedups"]) == 6 and all(s["mac_speedup"] >= 1 for s in dyn["speedups"])
    assert 0 <= dyn["driver_overhead_full_depth_b1"] < 1
    assert dyn["parity"]["same_exit"] == dyn["parity"]["same_macs"] == dyn["parity"]["n"] == 12
    assert set(result["accuracy"]) >= {"eager_fp32", "onnxruntime_fp32", "onnxruntime_int8"}
    assert result["accuracy"]["eager_fp32"] == result["accuracy"]["onnxruntime_fp32"]


def test_bench_table_of_a_static_model_name(capsys):
    assert main(["bench", "tiny_mobilenet", "--input-size", "32", "--dataset", "mnist", "--min-time", "0.02",
                 "--images", "8", "--batch-sizes", "1", "2", "--no-quantize", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| eager | fp32 | 1 |" in out and "| onnxruntime | fp32 | 2 |" in out and "int8" not in out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["export", "no_such_model", "--out", str(tmp_path / "b")]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("x")
    assert main(["export", "tiny_mobilenet", "--input-size", "32", "--dataset", "mnist", "--out",
                 str(tmp_path / "mine")]) == 2
    assert "non-empty folder without a dyncnn bundle" in capsys.readouterr().err


def test_bench_and_profile_of_an_exported_bundle_folder(tmp_path, checkpoint, capsys):
    """`dyncnn bench DIR` / `dyncnn profile DIR` time the bundle as exported (its own policy, every precision)."""
    path, model = checkpoint
    out = tmp_path / "b"
    assert main(["export", str(path), "--out", str(out), "--quantize", "--calib-images", "16"]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--dataset", "mnist", "--json", "--min-time", "0.01", "--images", "8",
                 "--batch-sizes", "1", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "multi_exit" and result["threads"] == 2
    keys = {(r["backend"], r["precision"], r["batch"], r["mode"]) for r in result["rows"]}
    assert keys == {("onnxruntime", p, n, m) for p in ("fp32", "int8") for n in (1, 4) for m in ("policy", "full")}
    bundle = load_bundle(out)
    assert result["dynamic"]["policy"]["thresholds"] == bundle.policy.thresholds
    assert result["dynamic"]["parity"] is None and sum(result["dynamic"]["exit_histogram"]) == 8
    assert set(result["accuracy"]) >= {"onnxruntime_fp32", "onnxruntime_int8"}      # mnist fits: labels are used
    # the manifest keeps the checkpoint's dataset: without --dataset the bundle is timed on its own kind of images
    assert json.loads((out / "manifest.json").read_text())["data"]["name"] == "mnist"
    assert main(["bench", str(out), "--min-time", "0.01", "--images", "4", "--batch-sizes", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"bundle: {out} (multi_exit, ") and "threads: 2" in text
    assert "images: 4 of the test split of mnist\n" in text
    assert "| onnxruntime | int8 | 1 | policy |" in text and "eager" not in text
    # profile: the manifest's MACs (per exit), the graphs' weights, ONNX Runtime latency at full depth
    assert main(["profile", str(out), "--batch-sizes", "1", "2", "--min-time", "0.01", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["exit_macs"] == bundle.exit_macs and prof["macs"] == bundle.exit_macs[-1]
    assert prof["params"] > 0.9 * sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert [r["batch_size"] for r in prof["latency"]] == [1, 2] and prof["threads"] == 2
    assert all(r["backend"] == "onnxruntime" and r["mode"] == "full depth" for r in prof["latency"])
    # options that cannot apply to a fixed bundle are refused with the reason
    assert main(["bench", str(out), "--budget", "0.5"]) == 2
    assert "its exit policy is the one in its manifest.json" in capsys.readouterr().err
    assert main(["profile", str(out), "--input-size", "64", "--min-time", "0", "--batch-sizes", "1"]) == 2
    assert "exported for inputs 1x28x28" in capsys.readouterr().err


def test_int8_slower_than_fp32_gets_a_note():
    from dyncnn.export.bench import int8_notes
    rows = [{"backend": "onnxruntime", "precision": "fp32", "batch": 1, "median_ms": 1.0},
            {"backend": "onnxruntime", "precision": "int8", "batch": 1, "median_ms": 1.5},
            {"backend": "onnxruntime", "precision": "fp32", "batch": 64, "median_ms": 10.0},
            {"backend": "onnxruntime", "precision": "int8", "batch": 64, "median_ms": 6.0}]
    notes = int8_notes(rows)
    assert len(notes) == 1 and notes[0].startswith("note: INT8 is slower than FP32 at batch 1 (1.500 vs 1.000 ms)")


def test_export_records_threads_per_stage(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    assert main(["export", str(path), "--out", str(tmp_path / "b"), "--calib-images", "64", "--stage-threads",
                 "2", "1"]) == 0
    out = capsys.readouterr().out
    assert "threads per stage (the fastest of 1, 2): batch 1: [" in out and "; batch 64: [" in out
    entry = json.loads((tmp_path / "b" / "manifest.json").read_text())["stage_threads"]
    assert entry["candidates"] == [1, 2] and sorted(entry["batches"]) == ["1", "64"]
    bundle = load_bundle(tmp_path / "b", threads="per-stage")
    intra = [s.sess.get_session_options().intra_op_num_threads for s in bundle._steps]
    assert intra == entry["batches"]["1"]["threads"]
    assert len(entry["batches"]["1"]["plan_ms"]) == 2 ** bundle.num_exits     # whole runs under the exit policy
    x = torch.stack([get_dataset("mnist", "test")[i][0] for i in range(100)])
    assert torch.equal(bundle.run(x).exit_index, model.infer(x, bundle.policy).exit_index)
    assert main(["export", str(path), "--out", str(tmp_path / "c"), "--stage-threads", "0"]) == 2
    assert "--stage-threads takes thread counts >= 1" in capsys.readouterr().err
