"""Issue 28, "untrusted files and concurrent runs": bounded reads of bundle, checkpoint and thresholds files,
bundles checked against their graphs at load, bounded checkpoint headers, the advisory lock on output folders,
stale staging folders, thresholds files without temperatures. Each case reproduced on tiny models."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dyncnn
from dyncnn.cli import main
from dyncnn.dynamic.calibration import FORMAT as THRESHOLDS_FORMAT, load_thresholds
from dyncnn.errors import CheckpointError, DyncnnError, LockedError
from dyncnn.export import BundleError, export_bundle, load_bundle
from dyncnn.export import bundle_format
from dyncnn.export.bundle_format import bundle_lock, file_record
from dyncnn.files import output_lock, parse_json, read_bounded
from dyncnn.train import TrainConfig, Trainer, load_checkpoint
from dyncnn.train.checkpoint import META_KEY, sync_json_copies

SRC = Path(dyncnn.__file__).resolve().parents[1]


def _tiny_static():
    return dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[4]).eval()


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A 3-exit bundle at 16x16: stages 0 and 1 both map in0 -> out0 + logits, at different shapes."""
    torch.manual_seed(0)
    model = dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1,
                                backbone_cfg={"widths": [4, 8, 16]}).eval()
    folder = tmp_path_factory.mktemp("bundles") / "multi"
    export_bundle(model, folder, (1, 16, 16), policy=[0.5, 0.5])
    return folder


def _copy(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        manifest = json.loads((dst / "manifest.json").read_text())
        edit(manifest)
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


# -- bounded reads --------------------------------------------------------------------------------------------
def test_a_manifest_that_is_a_device_a_fifo_or_huge_is_refused_unread(multi, tmp_path):
    b = _copy(multi, tmp_path / "b")
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to("/dev/zero")          # read whole, this took 19.5 GB before
    with pytest.raises(BundleError, match="manifest .* is not a regular file"):
        load_bundle(b)
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")                         # opening it must not wait for a writer
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(b)
    (b / "manifest.json").unlink()
    with open(b / "manifest.json", "wb") as f:             # sparse: 17 MiB on paper, nothing on disk
        f.truncate(bundle_format.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(BundleError, match=f"has {bundle_format.MAX_MANIFEST_BYTES + 1} bytes, more than"):
        load_bundle(b)
    assert not bundle_format.is_bundle_folder(b)


def test_read_bounded_checks_type_and_size_before_reading(tmp_path):
    (tmp_path / "f").write_bytes(b"12345")
    assert read_bounded(tmp_path / "f", 5, "file") == b"12345"
    with pytest.raises(DyncnnError, match="has 5 bytes, more than the 4"):
        read_bounded(tmp_path / "f", 4, "file")
    with pytest.raises(DyncnnError, match="not a regular file"):
        read_bounded(tmp_path, 4, "file")
    with pytest.raises(DyncnnError, match="does not exist"):
        read_bounded(tmp_path / "nope", 4, "file")


def test_graph_files_are_size_checked_without_verify_too(multi, tmp_path, monkeypatch):
    b = _copy(multi, tmp_path / "b")
    monkeypatch.setattr(bundle_format, "MAX_GRAPH_BYTES", 100)
    with pytest.raises(BundleError, match="stage 0 file stage0.onnx has .* bytes, more than the 100"):
        load_bundle(b, verify=False)


def test_thresholds_files_and_checkpoint_copies_are_read_bounded(tmp_path):
    with open(tmp_path / "t.json", "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(DyncnnError, match="thresholds file .* more than"):
        load_thresholds(tmp_path / "t.json")
    # a checkpoint's JSON copy linked to /dev/zero is not read: it differs in size, so it is rewritten
    ds = torch.utils.data.TensorDataset(torch.rand(4, 1, 16, 16), torch.arange(4))
    Trainer(_tiny_static().train(), ds, None, TrainConfig(epochs=1, batch_size=4, progress=False), tmp_path).fit()
    (tmp_path / "last.json").unlink()
    (tmp_path / "last.json").symlink_to("/dev/zero")
    assert tmp_path / "last.json" in sync_json_copies(tmp_path)
    assert json.loads((tmp_path / "last.json").read_text())["format"] == "dyncnn-checkpoint-1"


# -- bundles checked against their graphs ---------------------------------------------------------------------
def test_a_stage_file_swapped_for_another_stage_is_refused_at_load_naming_the_stage(multi, tmp_path):
    b = _copy(multi, tmp_path / "b")
    shutil.copy(b / "stage0.onnx", b / "stage1.onnx")      # same input/output names, other shapes
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["stages"][1]["files"]["fp32"] = file_record(b, "stage1.onnx")     # the checksum updated to match
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"stage 1 takes inputs of shape \(N, 1, 16, 16\) \(in0\); the manifest "
                                          r"says \(N, 4, 8, 8\): a graph of another stage"):
        load_bundle(b)


def _many_exits(m, n=20000):
    m.update(num_exits=n, stages=[{}] * n, exit_macs=list(range(n)))
    m["policy"].update(thresholds=[0.5] * (n - 1), temperatures=[])


@pytest.mark.parametrize("edit, message", [
    (_many_exits, "num_exits is 20000; at most 256"),
    (lambda m: m.update(exit_macs=[1, 2, 10 ** 30]), r"non-negative integers of at most 1e\+15"),
    (lambda m: m.update(exit_macs=[1, 2, 3]), r"exit_macs \[1, 2, 3\] are not the running sum of the stages' own"),
    (lambda m: m["stages"][2]["state_in"]["leaves"][0].update(shape=[8, 2, 2]), r"stage 2 takes a state of .*"
                                                                                 r"but stage 1 gives"),
    (lambda m: m["stages"][1].update(inputs=[3]), "stage 1: inputs must list leaf indices below 1"),
    (lambda m: m["stages"][1].update(state_out=[]), "stage 1: state_out must hold a list"),
    (lambda m: m["stages"].__setitem__(1, 7), "stage 1 must be an object"),
    (lambda m: m["policy"].pop("temperatures"), "the exit policy lacks temperatures"),
])
def test_malformed_manifests_are_refused_at_load_with_the_reason(multi, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message):
        load_bundle(_copy(multi, tmp_path / "b", edit))


def test_profile_and_bench_refuse_a_20000_exit_bundle_at_once(multi, tmp_path, capsys):
    b = _copy(multi, tmp_path / "b", _many_exits)         # `dyncnn profile` ran past 300 s on it
    for command in ("profile", "bench"):
        assert main([command, str(b)]) == 2
        assert "num_exits is 20000; at most 256" in capsys.readouterr().err


def test_writers_cannot_write_a_manifest_the_loader_would_refuse(multi, tmp_path):
    manifest = json.loads((multi / "manifest.json").read_text())
    manifest["exit_macs"] = manifest["exit_macs"][::-1]
    with pytest.raises(BundleError, match="exit_macs must not decrease"):
        bundle_format.write_manifest(tmp_path, manifest)
    assert not list(tmp_path.iterdir())


# -- checkpoint headers ---------------------------------------------------------------------------------------
def _forged(path: Path, header: str) -> Path:
    save_file({"model.w": torch.zeros(1)}, str(path), metadata={META_KEY: header})
    return path


def test_checkpoint_headers_have_depth_and_digit_limits(tmp_path):
    deep = _forged(tmp_path / "deep.safetensors", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="deep.safetensors: its dyncnn header: the JSON nests deeper"):
        load_checkpoint(deep)
    with pytest.raises(CheckpointError, match="h.json: the JSON nests more than 8 levels deep"):
        parse_json('{"a": [[[[[[[[[[]]]]]]]]]]}', "h.json", CheckpointError, max_depth=8)
    assert parse_json('{"a": [[[[[[[]]]]]]]}', "h.json", CheckpointError, max_depth=8) == {"a": [[[[[[[]]]]]]]}
    digits = _forged(tmp_path / "digits.safetensors", '{"format": ' + "9" * 5001 + "}")
    with pytest.raises(CheckpointError, match=r"digits.safetensors: its dyncnn header: unreadable JSON: .*4300 "
                                              r"digits"):
        load_checkpoint(digits)
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(CheckpointError, match="fifo.safetensors is not a regular file"):
        load_checkpoint(tmp_path / "fifo.safetensors")


# -- one writer per output folder -----------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from dyncnn.files import output_lock
    with output_lock(sys.argv[2]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(SRC), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"training folder {out} is in use by another dyncnn process \(pid "
                                              rf"{proc.pid}"):
            ds = torch.utils.data.TensorDataset(torch.rand(4, 1, 16, 16), torch.arange(4))
            Trainer(_tiny_static().train(), ds, None, TrainConfig(epochs=1, batch_size=4, progress=False), out).fit()
        assert not (out / "metrics.jsonl").exists()       # the refused run wrote nothing
        (out / "metrics.jsonl").write_text("the running run's epochs\n")
        assert main(["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--out", str(out),
                     "--overwrite"]) == 2                   # --overwrite does not remove a running run's files
        assert f"is in use by another dyncnn process (pid {proc.pid}" in capsys.readouterr().err
        assert (out / "metrics.jsonl").read_text() == "the running run's epochs\n"
    finally:
        proc.kill()
        proc.wait()
    assert (out / ".dyncnn.lock").read_text().split() == [str(proc.pid)]    # the killed holder's stale lock file
    with output_lock(out) as lock:                                          # ... is taken over
        assert lock.read_text().split() == [str(os.getpid())]
    assert not lock.exists()                                                # and removed on release
    lock.symlink_to("/dev/zero")                   # a lock file planted as a link is not followed
    with pytest.raises(OSError):
        with output_lock(out):
            pass


def test_export_and_frontier_outputs_are_locked(tmp_path):
    from dyncnn.frontier.runner import FrontierSettings, run_frontier
    with bundle_lock(tmp_path / "b"):
        with pytest.raises(LockedError, match=f"bundle folder {tmp_path / 'b'} is in use .*pid {os.getpid()}"):
            export_bundle(_tiny_static(), tmp_path / "b", (1, 16, 16))
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
    with output_lock(tmp_path / "front"):
        with pytest.raises(LockedError, match="frontier output .* is in use"):
            run_frontier(FrontierSettings(out=tmp_path / "front"), log=lambda *a: None)


def test_stale_staging_folders_of_a_killed_export_are_removed_by_the_next(tmp_path):
    stale = [tmp_path / ".b.k1ll3d_x.tmp", tmp_path / ".b.old-4242"]       # what SIGTERM left
    other = tmp_path / ".bb.k1ll3d_x.tmp"                                  # another bundle's: kept
    for d in [*stale, other]:
        d.mkdir()
        (d / "stage0.onnx").write_bytes(b"half")
    export_bundle(_tiny_static(), tmp_path / "b", (1, 16, 16))
    assert not any(d.exists() for d in stale) and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bb.k1ll3d_x.tmp", "b"]   # no lock file left either


# -- thresholds files -----------------------------------------------------------------------------------------
def test_a_thresholds_file_without_temperatures_is_refused(tmp_path):
    good = {"format": THRESHOLDS_FORMAT, "num_exits": 3, "thresholds": [0.5, 0.6], "criterion": "max_prob",
            "temperatures": [2.0, 2.0, 1.0], "exit_macs": [10, 20, 30]}
    (tmp_path / "t.json").write_text(json.dumps(good))
    assert load_thresholds(tmp_path / "t.json")[0].temperatures == [2.0, 2.0, 1.0]
    (tmp_path / "t.json").write_text(json.dumps({k: v for k, v in good.items() if k != "temperatures"}))
    with pytest.raises(DyncnnError, match="lacks temperatures .*solved on confidences at the fitted"):
        load_thresholds(tmp_path / "t.json")
    (tmp_path / "t.json").write_text(json.dumps({**good, "temperatures": []}))
    with pytest.raises(DyncnnError, match="0 temperatures for 3 exits"):
        load_thresholds(tmp_path / "t.json")


# -- the fuzz test's profiles ---------------------------------------------------------------------------------
def test_the_hypothesis_profile_is_chosen_by_an_environment_variable():
    from hypothesis import settings
    if "DYNCNN_HYPOTHESIS_PROFILE" not in os.environ:          # the default: ci
        assert (settings().max_examples, settings().derandomize) == (30, True)
    env = {**os.environ, "DYNCNN_HYPOTHESIS_PROFILE": "long", "DYNCNN_HYPOTHESIS_EXAMPLES": "7"}
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import conftest; from hypothesis import "
            "settings; s = settings(); print(s.max_examples, s.derandomize)")
    out = subprocess.run([sys.executable, "-c", code, str(SRC), str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["7", "False"], out.stderr[-2000:]
