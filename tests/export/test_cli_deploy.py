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
