"""Device selection, bf16 autocast, DataLoader workers and device-independent checkpoints (CUDA tests skip on a
machine without a GPU; scripts/device_check.sh runs them where there is one)."""
import pytest
import torch
from torch.utils.data import Subset

import dyncnn
from dyncnn.data import MNISTDigits
from dyncnn.dynamic import ExitPolicy
from dyncnn.errors import DyncnnError
from dyncnn.train import TrainConfig, Trainer, evaluate, load_checkpoint, module_device, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/device_check.sh)")


@pytest.fixture(scope="module")
def data():
    return Subset(MNISTDigits("train"), range(96)), Subset(MNISTDigits("val"), range(32))


def _model(seed=0):
    torch.manual_seed(seed)
    return dyncnn.create_model("tiny_mobilenet", widths=(8, 16), in_chans=1, num_classes=10)


def _cfg(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 32, "lr": 0.05, "progress": False, **kw})


def test_device_names_resolve_or_are_refused(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DyncnnError, match="device must be one of auto, cpu, cuda, mps"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device must be one of"):
        TrainConfig(device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)       # a machine without a GPU
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DyncnnError, match="CUDA is not available.*--device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(DyncnnError, match="CUDA is not available"):
        Trainer(_model(), Subset(MNISTDigits("val"), range(32)), None, _cfg(device="cuda"))


def test_workers_and_bf16_autocast_on_cpu(tmp_path, data):
    train, val = data
    ref = _model()
    Trainer(ref, train, val, _cfg(device="cpu")).fit()
    two = _model()
    Trainer(two, train, val, _cfg(device="cpu", num_workers=2)).fit()     # same batches, assembled by workers
    for (k, a), b in zip(ref.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), k
    amp = _model()
    result = Trainer(amp, train, val, _cfg(device="cpu", amp=True), out_dir=tmp_path).fit()
    assert result.history[0]["train_loss"] == result.history[0]["train_loss"]      # finite, not NaN
    assert all(p.dtype == torch.float32 for p in amp.parameters())               # autocast, not a cast
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), amp.state_dict().values()))


@cuda
def test_cuda_training_checkpoints_load_on_cpu(tmp_path, data):
    train, val = data
    model = _model()
    result = Trainer(model, train, val, _cfg(device="cuda", amp=True), out_dir=tmp_path).fit()
    assert module_device(model).type == "cuda" and result.final_val_acc == result.final_val_acc
    cpu_model, _ = load_checkpoint(tmp_path / "last.safetensors")            # written from CPU copies
    assert module_device(cpu_model).type == "cpu"
    for (k, a), b in zip(model.state_dict().items(), cpu_model.state_dict().values()):
        assert torch.equal(a.cpu(), b), k
    on_gpu, on_cpu = evaluate(model.eval(), val), evaluate(cpu_model.eval(), val)
    assert abs(on_gpu["acc"] - on_cpu["acc"]) <= 1 / 32
    # resuming on the GPU (the same settings: a finished run) loads the CPU-written checkpoint onto the GPU model
    resumed = _model(seed=1)
    Trainer(resumed, train, val, _cfg(device="cuda", amp=True), out_dir=tmp_path).fit(resume=True)
    assert module_device(resumed).type == "cuda"
    for (k, a), b in zip(resumed.state_dict().items(), cpu_model.state_dict().values()):
        assert torch.equal(a.cpu(), b), k


@cuda
def test_early_exit_decisions_on_cuda_equal_cpu():
    torch.manual_seed(0)
    net = dyncnn.create_model("msdnet_cifar", num_classes=10, nBlocks=3, step=1, base=1, nChannels=4,
                              growthRate=4).eval()
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        conf = torch.softmax(net(x)[0], 1).max(1).values
    policy = ExitPolicy([float(conf.median()), float("inf")])
    cpu = net.infer(x, policy)
    gpu = net.cuda().infer(x.cuda(), policy)
    assert torch.equal(cpu.exit_index, gpu.exit_index.cpu()) and torch.equal(cpu.macs, gpu.macs.cpu())


def test_cli_train_device_amp_workers(tmp_path, capsys, monkeypatch):
    from dyncnn.cli import main
    args = ["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--epochs", "1", "--batch-size", "64",
            "--cfg", "widths=[8,16]", "--out", str(tmp_path / "run")]
    assert main(args + ["--device", "cpu", "--amp", "--workers", "1"]) == 0
    assert "final val acc" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run" / "last.safetensors"), "--device", "cpu", "--split", "val"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fresh = args[:-1] + [str(tmp_path / "run_cuda")]          # a new run folder: the device is what is refused
    assert main(fresh + ["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_profile_and_bench_take_a_device(capsys, monkeypatch):
    from dyncnn.cli import main
    from dyncnn.profile import measure_latency
    from dyncnn.profile.latency import on_device
    fn = lambda x: x + 1                                                      # noqa: E731
    assert on_device(fn, "cpu") is fn                                        # the CPU needs no copy and no wait
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(ValueError, match="onnxruntime backend runs on the CPU"):
        measure_latency(_model(), x, backend="onnxruntime", device="cuda")
    tiny = ["tiny_mobilenet", "--cfg", "widths=[8,16]", "--in-chans", "1", "--input-size", "28", "--min-time", "0.05"]
    assert main(["profile", *tiny, "--no-onnx", "--batch-sizes", "1", "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"device": "cpu"' in out and '"backend": "eager"' in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in ("profile", "bench"):
        assert main([cmd, *tiny, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@cuda
def test_profile_and_bench_eager_rows_on_cuda(capsys):
    from dyncnn.cli import main
    from dyncnn.export.bench import bench_model
    from dyncnn.profile import measure_latency
    model, x = _model(), torch.rand(4, 1, 28, 28)
    stats = measure_latency(model, x, (1, 4), device="cuda", min_time_s=0.05)
    assert {s.backend for s in stats.values()} == {"eager-cuda"} and all(s.median_ms > 0 for s in stats.values())
    assert module_device(model).type == "cpu"                                # moved back where it was
    r = bench_model(model, x.repeat(8, 1, 1, 1), torch.arange(32) % 10, batch_sizes=(1, 4), quantize=False,
                    min_time_s=0.05, device="cuda")
    assert r["eager_device"] == "cuda"
    assert abs(r["accuracy"]["eager_fp32"] - r["accuracy"]["onnxruntime_fp32"]) <= 1 / 32      # TF32 may flip a tie
    assert main(["profile", "tiny_mobilenet", "--cfg", "widths=[8,16]", "--in-chans", "1", "--input-size", "28",
                 "--min-time", "0.05", "--device", "cuda"]) == 0
    assert "eager on cuda" in capsys.readouterr().out
