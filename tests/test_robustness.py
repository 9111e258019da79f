"""Issue 15, "nothing lost, nothing let in": the data-loss, security, silent-wrong-result, traceback and hygiene
cases, each reproduced on tiny models."""
import json
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dyncnn
from dyncnn.cli import main
from dyncnn.dynamic import ExitPolicy
from dyncnn.dynamic.calibration import FORMAT as THRESHOLDS_FORMAT, load_thresholds
from dyncnn.errors import CheckpointError, DyncnnError
from dyncnn.export import BundleError, export_bundle, load_bundle
from dyncnn.train import TrainConfig, Trainer, load_checkpoint, save_checkpoint
from dyncnn.train.checkpoint import META_KEY, read_checkpoint


def _tiny_static():
    return dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[4]).eval()


def _tiny_multi_exit():
    return dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1,
                               backbone_cfg={"widths": [4, 8]}).eval()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    export_bundle(_tiny_static(), root / "static", (1, 32, 32))
    export_bundle(_tiny_multi_exit(), root / "multi", (1, 32, 32), policy=[0.5])
    return root


def _copy_with_manifest(src: Path, dst: Path, edit) -> Path:
    import shutil
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


# -- data loss ------------------------------------------------------------------------------------------------
def test_export_never_replaces_a_folder_that_is_not_a_dyncnn_bundle(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    (mine / "index.html").write_text("keep me")
    with pytest.raises(DyncnnError, match="without a dyncnn bundle"):
        export_bundle(_tiny_static(), mine, (1, 32, 32))
    assert (mine / "index.html").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert main(["export", "tiny_mobilenet", "--out", str(tmp_path / "file")]) == 2


def test_train_refuses_an_existing_run_without_resume_init_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.safetensors", "metrics.jsonl"):
        (out / name).write_text("the earlier run")
    args = ["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--epochs", "1", "--batch-size", "500",
            "--cfg", "widths=[4]", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and all(f in err for f in ("--resume", "--init", "--overwrite"))
    assert (out / "metrics.jsonl").read_text() == "the earlier run"
    (tmp_path / "file").write_text("x")
    assert main(args[:-1] + [str(tmp_path / "file")]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_seed_fixes_the_initial_weights_and_resume_extension_says_how(tmp_path, capsys):
    """Two identical `dyncnn train` runs give bit-identical checkpoints; --overwrite replaces a run."""
    args = ["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--epochs", "1", "--batch-size", "500",
            "--cfg", "widths=[4]", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    torch.manual_seed(12345)          # whatever the global RNG holds, --seed decides
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, _ = read_checkpoint(tmp_path / "a" / "last.safetensors")
    b, _ = read_checkpoint(tmp_path / "b" / "last.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "a"), "--resume", "--epochs", "2"]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "a"), "--overwrite", "--seed", "4"]) == 0
    c, _ = read_checkpoint(tmp_path / "a" / "last.safetensors")
    first = min(k for k in a if k.startswith("model.") and a[k].dim() == 4)      # the stem's conv weight
    assert not torch.equal(a[first], c[first])


def test_thresholds_record_their_checkpoint_and_a_retrained_one_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    model = _tiny_multi_exit()
    save_checkpoint(run / "last.safetensors", model, extra={"data": {"name": "mnist", "root": None, "seed": 0}})
    out_dir = tmp_path / "adir"
    out_dir.mkdir()
    assert main(["calibrate", str(run), "--budget", "0.9", "--out", str(out_dir)]) == 2   # checked first
    assert "is a folder" in capsys.readouterr().err
    assert main(["calibrate", str(run), "--budget", "0.9"]) == 0      # a run folder: the file goes inside it
    thresholds = run / "thresholds.json"
    assert json.loads(thresholds.read_text())["checkpoint_sha256"]
    assert not (tmp_path / "thresholds.json").exists()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(run / "last.safetensors", model, extra={"data": {"name": "mnist", "root": None, "seed": 0}})
    capsys.readouterr()
    assert main(["eval", str(run / "last.safetensors"), "--budget", str(thresholds)]) == 2
    assert "calibrated on another checkpoint" in capsys.readouterr().err


# -- security -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.onnx", "/dev/zero", "/etc/passwd", "int8/../../evil.onnx", "", None])
def test_manifest_file_names_stay_inside_the_bundle(bundles, tmp_path, name):
    def edit(m):
        m["graph"]["files"]["fp32"]["file"] = name
    bad = _copy_with_manifest(bundles / "static", tmp_path / "b", edit)
    with pytest.raises(BundleError, match="plain file name inside the bundle") as e:
        load_bundle(bad)
    assert "bytes" not in str(e.value)          # nothing about a file outside the bundle is revealed


def test_manifest_links_out_of_the_bundle_and_non_regular_files_are_refused(bundles, tmp_path):
    bad = _copy_with_manifest(bundles / "static", tmp_path / "b", lambda m: None)
    (bad / "model.onnx").unlink()
    (bad / "model.onnx").symlink_to("/dev/zero")
    with pytest.raises(BundleError, match="links outside the bundle"):
        load_bundle(bad)
    (bad / "model.onnx").unlink()
    os.mkfifo(bad / "model.onnx")            # hashing a FIFO would hang
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(bad)


def _cifar_root(tmp_path: Path, batch: bytes) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return tmp_path


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_cifar_batches_are_unpickled_without_running_code(tmp_path):
    from dyncnn.data.folders import cifar
    marker = tmp_path / "pwned"
    root = _cifar_root(tmp_path / "evil", pickle.dumps({"data": _Exploit(str(marker)), "labels": [0]}))
    with pytest.raises(DyncnnError, match="data_batch_1 is not a CIFAR python batch.*posix.mkdir|os.mkdir"):
        cifar("cifar10", root)
    assert not marker.exists()
    garbage = _cifar_root(tmp_path / "garbage", b"\x00garbage, not a pickle")
    with pytest.raises(DyncnnError, match="is not a CIFAR python batch"):
        cifar("cifar10", garbage)
    good = np.zeros((3, 3072), np.uint8)
    ok = _cifar_root(tmp_path / "ok", pickle.dumps({"data": good, "labels": [0, 1, 2]}))
    assert len(cifar("cifar10", ok, "test")) == 3


def _forged_checkpoint(path: Path, header: object, tensors: dict | None = None) -> Path:
    save_file(tensors or {"model.w": torch.zeros(1)}, str(path),
              metadata={META_KEY: header if isinstance(header, str) else json.dumps(header)})
    return path


def test_checkpoint_headers_are_untrusted(tmp_path):
    def header(name, cfg):
        return {"format": "dyncnn-checkpoint-1", "model": {"name": name, "cfg": cfg}}
    cases = [
        (header("timm:resnet18", {"checkpoint_path": "/etc/passwd"}), "may only set"),
        (header("tiny_mobilenet", {"widths": [1 << 30], "in_chans": 1}), "does not match the model"),
        (header("tiny_mobilenet", "widths"), "config is a str"),
        (header("tiny_mobilenet", {"widths": "abc"}), "config key 'widths' expects"),
        (header("tiny_mobilenet", {"widht": [4]}), "did you mean 'widths'"),
        ("{not json", "not valid JSON"),
        ([1, 2], "expected an object"),
    ]
    for i, (h, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(_forged_checkpoint(tmp_path / f"c{i}.safetensors", h))


def test_flipped_bytes_in_the_tensor_data_are_found(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _tiny_static())
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10                                   # inside the last tensor's payload
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


# -- silent wrong results -------------------------------------------------------------------------------------
def test_resume_on_another_dataset_is_refused(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.rand(8, 1, 32, 32), torch.arange(8) % 10)
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False)
    Trainer(_tiny_static().train(), ds, None, cfg, tmp_path, extra={"data": {"name": "mnist"}}).fit()
    with pytest.raises(DyncnnError, match="trained with data .*mnist.*this run has data .*cifar10"):
        Trainer(_tiny_static().train(), ds, None, cfg, tmp_path, extra={"data": {"name": "cifar10"}}).fit(
            resume=True)


@pytest.mark.parametrize("temps", [[0.0, 1.0], [-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0]])
def test_temperatures_must_be_positive_and_finite(temps):
    with pytest.raises(DyncnnError, match="temperatures must be finite and > 0"):
        ExitPolicy([0.5], temperatures=temps)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["policy"].update(thresholds=[]), "0 thresholds; expected 1"),
    (lambda m: m["policy"].update(thresholds=[0.1, 0.2, 0.3]), "3 thresholds; expected 1"),
    (lambda m: m["policy"].update(thresholds=0.5), "expected a list of numbers"),
    (lambda m: m["policy"].update(temperatures=[0.0, 1.0]), "temperatures must be finite and > 0"),
    (lambda m: m.update(exit_macs=[-5, 10]), "non-negative integers"),
    (lambda m: m.update(exit_macs=[10, 5]), "must not decrease"),
    (lambda m: m.update(kind="static"), "kind 'static' needs graph.*that of a 'multi_exit' bundle"),
    (lambda m: m.update(num_classes=7), "outputs logits of shape .*7 classes"),
    (lambda m: m["input"].update(shape=["batch", 1, 64, 64]), r"takes inputs of shape \(N, 1, 32, 32\)"),
    (lambda m: m["stages"][0].pop("logits"), "stage 0: logits come from None"),
])
def test_manifests_are_validated_on_load(bundles, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message):
        load_bundle(_copy_with_manifest(bundles / "multi", tmp_path / "b", edit))


def test_msdnet_forward_and_infer_share_one_input_check():
    model = dyncnn.create_model("msdnet_cifar", num_classes=10, nBlocks=2, step=1, base=1, nChannels=4,
                                growthRate=2).eval()
    for side in (1, 3):
        x = torch.rand(1, 3, side, side)
        with pytest.raises(DyncnnError, match="expected inputs of at least 4x4") as fwd:
            model(x)
        with pytest.raises(DyncnnError, match="expected inputs of at least 4x4") as inf:
            model.infer(x)
        assert str(fwd.value) == str(inf.value)


def test_infer_never_changes_a_shared_model_in_training_mode():
    torch.manual_seed(0)
    model = _tiny_multi_exit().train()
    reference = _tiny_multi_exit()
    reference.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 1, 32, 32)
    want = reference.eval().infer(x, [0.3])
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(model.infer(x, [0.3]))
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())    # BN statistics untouched
    assert all(torch.equal(r.logits, want.logits) and torch.equal(r.exit_index, want.exit_index) for r in results)


# -- tracebacks -> clear errors -------------------------------------------------------------------------------
def test_inputs_of_another_dtype_or_thresholds_of_another_type(bundles):
    model = _tiny_multi_exit()
    x = torch.rand(2, 1, 32, 32)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(DyncnnError, match=f"expected float32 like the model's weights, got "
                                              f"{str(dtype).replace('torch.', '')}"):
            model.infer(x.to(dtype))
    bundle = load_bundle(bundles / "multi")
    torch.testing.assert_close(bundle.run(x.double()).logits, bundle.run(x).logits)   # the driver casts
    for bad in (0.5, "0.5", {"a": 1}):
        with pytest.raises(DyncnnError, match="expected a list of numbers|expected an ExitPolicy"):
            model.infer(x, bad)
        with pytest.raises(DyncnnError):
            bundle.run(x, bad)


def test_thresholds_files_without_their_keys(tmp_path):
    model = _tiny_multi_exit()
    good = {"format": THRESHOLDS_FORMAT, "num_exits": 2, "thresholds": [0.5], "criterion": "max_prob",
            "temperatures": [1.0, 1.0], "exit_macs": [10, 20]}
    for key in ("thresholds", "exit_macs"):
        (tmp_path / "t.json").write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        with pytest.raises(DyncnnError, match=f"lacks {key}"):
            load_thresholds(tmp_path / "t.json", model)
    (tmp_path / "t.json").write_text(json.dumps({**good, "thresholds": 0.5}))
    with pytest.raises(DyncnnError, match="expected a list of numbers"):
        load_thresholds(tmp_path / "t.json", model)


def test_cfg_errors_name_the_key_and_list_the_valid_ones(capsys):
    assert main(["profile", "tiny_mobilenet", "--cfg", "widht=[8]", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "no config key 'widht'; did you mean 'widths'?" in err and "valid keys:" in err and "in_chans" in err
    assert main(["profile", "tiny_mobilenet", "--cfg", "widths=abc", "--no-onnx"]) == 2
    assert "config key 'widths' expects" in capsys.readouterr().err
    assert main(["profile", "msdnet_cifar", "--cfg", "nblocks=2", "--no-onnx"]) == 2
    assert "did you mean 'nBlocks'?" in capsys.readouterr().err


def test_os_errors_exit_2_with_the_file_named(tmp_path, capsys, monkeypatch):
    import dyncnn.cli.profile as profile

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "last.safetensors"))
    monkeypatch.setattr(profile, "run", denied)
    assert main(["profile", "tiny_mobilenet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot access {tmp_path / 'ro' / 'last.safetensors'}: Permission denied" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_training(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert main(["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--out", str(ro / "run")]) == 2
    assert "permission denied" in capsys.readouterr().err


# -- hygiene --------------------------------------------------------------------------------------------------
def test_files_and_bundle_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", _tiny_static())
        export_bundle(_tiny_static(), tmp_path / "bundle", (1, 32, 32))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644 and (path.with_suffix(".json").stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "bundle").stat().st_mode & 0o777) == 0o755
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in (tmp_path / "bundle").iterdir())


def test_stale_temporaries_and_a_lagging_json_copy_are_repaired_on_the_next_run(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.rand(8, 1, 32, 32), torch.arange(8) % 10)
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False)
    Trainer(_tiny_static().train(), ds, None, cfg, tmp_path).fit()
    (tmp_path / ".last.safetensors.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "last.json").write_text("{}")            # a write killed between the two files
    Trainer(_tiny_static().train(), ds, None, cfg, tmp_path).fit(resume=True)
    assert not list(tmp_path.glob(".*.tmp"))
    _, meta = read_checkpoint(tmp_path / "last.safetensors")
    assert json.loads((tmp_path / "last.json").read_text()) == json.loads(json.dumps(meta))


def test_all_finite_reads_the_sum_first_but_is_not_fooled_by_an_overflowing_sum():
    from dyncnn.errors import all_finite
    big = torch.full((4,), 3e38)                     # every entry finite, the float32 sum is inf
    assert not torch.isfinite(big.sum()) and all_finite(big)
    assert all_finite(torch.zeros(0)) and all_finite(torch.randn(3, 2))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(3, 2)
        t[1, 1] = bad
        assert not all_finite(t)
