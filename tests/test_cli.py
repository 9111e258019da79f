import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyncnn.cli import build_parser, main


def test_help_of_every_command(capsys):
    for argv in (["--help"], ["zoo", "--help"], ["profile", "--help"], ["train", "--help"], ["eval", "--help"], ["calibrate", "--help"], ["export", "--help"], ["bench", "--help"],
                 ["demo", "--help"], ["frontier", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: dyncnn" in out
    sub = build_parser()._subparsers._group_actions[0].choices
    assert set(sub) == {"zoo", "profile", "train", "eval", "calibrate", "demo", "export", "bench", "frontier"}


def test_zoo_lists_models_with_macs(capsys):
    assert main(["zoo", "--pattern", "tiny*", "--input-size", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["model"] == "tiny_mobilenet" and rows[0]["macs_m"] > 0 and rows[0]["params_m"] > 0


def test_zoo_profiles_clip_and_sequence_models_at_their_own_input(capsys):
    """Issue 14, bug 4: `dyncnn zoo` crashed at the first clip model. Every kind is profiled at its default input,
    stdout holds only the JSON (progress goes to stderr)."""
    assert main(["zoo", "--pattern", "adafocus_baseline_*", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert [r["model"] for r in rows] == ["adafocus_baseline_allframes", "adafocus_baseline_uniform"]
    assert all(r["input_kind"] == "clip" and r["input_shape"] == [16, 1, 64, 64] for r in rows)
    assert 3.9 < rows[0]["macs_m"] / rows[1]["macs_m"] < 4       # 16 frames vs 4 sampled (one head per clip)
    assert main(["zoo", "--pattern", "skiprnn_plain_gru_mnist_rows"]) == 0
    table = capsys.readouterr().out
    assert "| skiprnn_plain_gru_mnist_rows | sequence 28x28 |" in table


def test_profile_torchvision_model(capsys):
    assert main(["profile", "torchvision:mobilenet_v3_small", "--input-size", "64", "--batch-sizes", "1",
                 "--min-time", "0", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["input_shape"] == [3, 64, 64] and r["macs"] > 0 and r["params"] == 2_542_856
    assert {s["backend"] for s in r["latency"]} == {"eager", "onnxruntime"}
    assert r["peak_activation_mb"] > 0


def test_profile_optimize_adds_the_folded_channels_last_row(capsys):
    assert main(["profile", "tiny_mobilenet", "--input-size", "32", "--batch-sizes", "1", "2", "--min-time", "0",
                 "--threads", "1", "--no-onnx", "--optimize", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["latency"]
    assert [(s["backend"], s.get("mode"), s["batch_size"]) for s in rows] == [
        ("eager", None, 1), ("eager", None, 2),
        ("eager", "BN folded, channels-last", 1), ("eager", "BN folded, channels-last", 2)]
    assert all(s["median_ms"] > 0 for s in rows)


def test_train_eval_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--epochs", "2", "--batch-size", "64",
            "--lr", "0.1", "--cfg", "widths=[16,32]", "--out", str(out)]
    assert main(args) == 0
    assert "final val acc" in capsys.readouterr().out
    assert main(["eval", str(out / "last.safetensors"), "--split", "val", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dataset"] == "mnist" and r["n"] == 500 and r["acc"] > 0.2
    # resuming a finished run trains no further steps, and says so in one line
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "for 108 steps" in out and out.count("nothing to resume") == 1


def test_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["profile", "mobilenet_v9"]) == 2
    assert "unknown model 'mobilenet_v9'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--model", "tiny_mobilenet", "--dataset", "svhn", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'svhn'" in capsys.readouterr().err
    assert main(["profile", "tiny_mobilenet", "--cfg", "widths"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_calibrate_and_budgeted_eval(tmp_path, capsys):
    out = tmp_path / "me"
    assert main(["train", "--model", "multi_exit", "--cfg", "backbone=tiny_mobilenet",
                 'backbone_cfg={"widths": [16, 32, 64]}', "--dataset", "mnist", "--epochs", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    ckpt = str(out / "last.safetensors")
    assert main(["calibrate", ckpt, "--budget", "0.8"]) == 0
    record = json.loads((out / "thresholds.json").read_text())
    assert record["num_exits"] == 3 and len(record["thresholds"]) == 2 and len(record["temperatures"]) == 3
    assert record["val_mean_macs"] <= 0.8 * record["exit_macs"][-1]
    capsys.readouterr()
    assert main(["eval", ckpt, "--budget", str(out / "thresholds.json"), "--anytime", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [a["exit"] for a in r["anytime"]] == [1, 2, 3]
    assert r["budget"]["n"] == 1000 and sum(r["budget"]["exit_histogram"]) == 1000
    assert r["budget"]["mean_macs"] < r["budget"]["full_macs"]
    # infeasible budgets name the range; thresholds for another model are refused
    assert main(["calibrate", ckpt, "--budget-macs", "1k"]) == 2
    assert "feasible range" in capsys.readouterr().err
    record["num_exits"] = 4
    (tmp_path / "bad.json").write_text(json.dumps(record))
    assert main(["eval", ckpt, "--budget", str(tmp_path / "bad.json")]) == 2
    assert "for 4 exits, the model has 3" in capsys.readouterr().err


def test_zoo_profiles_condensenet_in_its_converted_form(capsys):
    assert main(["zoo", "--pattern", "condensenet_cifar50", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["input"] == 32
    # the published 0.22M params / 28.6M MACs are those of the converted network (conv+linear count ~5% lower)
    assert abs(row["params_m"] - 0.22) < 0.02 and 0.93 * 28.6 < row["macs_m"] < 28.6


def test_gated_model_from_a_static_checkpoint_and_its_executed_eval(tmp_path, capsys):
    """`dyncnn train --init` starts SkipNet from a trained ResNet; `dyncnn eval` reports the executed MACs."""
    common = ["--dataset", "scaled_mnist", "--canvas", "32", "--clutter", "0", "--epochs", "1", "--batch-size", "128",
              "--lr", "0.1"]
    assert main(["train", "--model", "resnet20_cifar", *common, "--cfg", "width_mult=0.25",
                 "--out", str(tmp_path / "static")]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "skipnet_resnet20_cifar", *common, "--cfg", "width_mult=0.25", "budget=0.5",
                 "--init", str(tmp_path / "static" / "last.safetensors"), "--out", str(tmp_path / "skip")]) == 0
    assert "initialised model.backbone from" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "skip" / "last.safetensors"), "--split", "val", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 500 and 0 < r["mean_macs"] <= r["full_macs"] and len(r["choice_rate"]) == 7
    assert len(r["decision_names"]) == 7 and r["accuracy"] > 0.1
    # a checkpoint that fits neither the model nor its backbone is refused with both reasons
    assert main(["train", "--model", "skipnet_resnet32_cifar", *common, "--cfg", "width_mult=0.25",
                 "--init", str(tmp_path / "static" / "last.safetensors"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    # it says which checkpoint is needed (the backbone's registered name), not a list of state-dict keys
    assert "is of model 'resnet20_cifar'" in err and "of its static backbone 'resnet32_cifar'" in err
    assert "dyncnn train --model resnet32_cifar" in err and "missing keys" not in err and len(err) < 500


def _env():
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_help_imports_no_torch_and_documents_every_option():
    code = ("import sys, contextlib, io\nfrom dyncnn.cli import main\n"
            "for argv in (['--help'], ['train', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            if action.option_strings and action.default is not None and action.default is not False:
                assert "default" in action.help or f"(default: {action.default})" in text or \
                    f"(default: {' '.join(map(str, action.default))})" in text, (name, action.option_strings)
    import dyncnn.cli.train
    assert parser.parse_args(["train", "--model", "x", "--out", "y"]).func is dyncnn.cli.train.run
    sub = parser._subparsers._group_actions[0].choices
    assert "--epochs EPOCHS passes over the training split (default: 10)" in " ".join(sub["train"].format_help().split())
    for cmd in ("profile", "bench", "demo"):       # one timing policy: the same default thread count
        assert sub[cmd].get_default("threads") == 2


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    import dyncnn.cli.zoo as zoo

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(zoo, "run", interrupted)
    assert main(["zoo"]) == 130
    err = capsys.readouterr().err
    assert err == "dyncnn zoo: interrupted\n"


def test_train_piped_into_head_exits_cleanly(tmp_path):
    """`dyncnn train ... | head -1`: no BrokenPipeError traceback, the exit status of a closed pipe (141)."""
    cmd = [sys.executable, "-m", "dyncnn.cli", "train", "--model", "tiny_mobilenet", "--dataset", "mnist",
           "--epochs", "2", "--batch-size", "256", "--cfg", "widths=[8]", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_env(), "PYTHONUNBUFFERED": "1"})
    first = proc.stdout.readline()
    proc.stdout.close()                                   # as `head -1` does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert first.startswith("epoch") and "Traceback" not in err and "BrokenPipe" not in err


def test_only_the_main_process_reports_under_torchrun(tmp_path, capsys, monkeypatch):
    import dyncnn.train.distributed as distributed
    args = ["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--epochs", "1", "--batch-size", "256",
            "--cfg", "widths=[8]", "--out", str(tmp_path / "run")]
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)     # as rank 1 sees it
    assert main(args) == 0
    assert "final val acc" not in capsys.readouterr().out


def test_export_lists_its_files_and_warns_about_random_weights(tmp_path, capsys):
    assert main(["export", "tiny_mobilenet", "--input-size", "32", "--dataset", "mnist", "--out",
                 str(tmp_path / "b")]) == 0
    cap = capsys.readouterr()
    assert "(random, untrained) weights" in cap.err and "pass a checkpoint" in cap.err
    assert "wrote 2 files" in cap.out
    lines = {ln.split()[0]: ln for ln in cap.out.splitlines() if ln.startswith("  ")}
    assert set(lines) == {"manifest.json", "model.onnx"} and lines["model.onnx"].endswith("kB")


def test_zoo_caches_rows_per_version_and_refreshes_with_no_cache(monkeypatch, capsys, tmp_path):
    """Issue 17: the second `dyncnn zoo` reads the cache (no model is profiled again), `--no-cache` measures again,
    the JSON on stdout parses, the cache file is written to a temporary file and renamed, and a corrupt cache is
    ignored rather than fatal."""
    import dyncnn.cli.zoo as zoo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real_row = zoo._zoo_row
    monkeypatch.setattr(zoo, "_zoo_row", lambda name, size: calls.append(name) or real_row(name, size))
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(zoo.os, "replace", lambda src, dst: renames.append((src, dst)) or real_replace(src, dst))

    argv = ["zoo", "--pattern", "tiny_mobilenet*", "--input-size", "32", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    names = [r["model"] for r in first]
    assert calls == names and names
    cache_files = list((tmp_path / "dyncnn").iterdir())
    assert len(cache_files) == 1                                     # no temporary file left behind
    cache_file = cache_files[0]
    import torch
    assert dyncnn_version() in cache_file.name and torch.__version__.split("+")[0] in cache_file.name
    assert renames and all(Path(dst) == cache_file and Path(src).parent == cache_file.parent and src != dst
                           for src, dst in renames)
    assert set(json.loads(cache_file.read_text())) == {f"{n}@32" for n in names}

    calls.clear()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert calls == [] and json.loads(captured.out) == first          # second call: all from the cache
    assert captured.err == ""                                         # no progress bar off a terminal
    assert main(["zoo", "--pattern", "tiny_mobilenet*", "--json"]) == 0 and calls == names   # other input size
    capsys.readouterr()

    calls.clear()
    assert main(argv + ["--no-cache"]) == 0 and calls == names
    capsys.readouterr()
    cache_file.write_text("{not json")
    calls.clear()
    assert main(argv) == 0 and calls == names and json.loads(capsys.readouterr().out) == first
    assert json.loads(cache_file.read_text())                         # rewritten whole


def dyncnn_version() -> str:
    from dyncnn import __version__
    return __version__


def test_anytime_eval_of_a_gated_model_says_it_has_no_exits(tmp_path, capsys):
    """``eval --anytime`` reads the exits of a HasExits model; a gated model (infer, but no exits) used to get past
    the check and fail on ``exit_macs`` with an AttributeError."""
    import dyncnn
    from dyncnn.train.checkpoint import save_checkpoint
    ckpt = save_checkpoint(tmp_path / "last.safetensors", dyncnn.create_model("routing_supernet_tiny"),
                           extra={"data": {"name": "mnist"}})
    assert main(["eval", str(ckpt), "--anytime"]) == 2
    assert "need a multi-exit network; RoutingSuperNet has no exits" in capsys.readouterr().err


def test_frontier_cli_passes_selection_z_and_cascade_last_and_refuses_a_negative_z(monkeypatch, tmp_path, capsys):
    import dyncnn.frontier.runner as runner
    from dyncnn.frontier.front import SELECTION_Z
    seen = []
    monkeypatch.setattr(runner, "run_frontier", seen.append)
    assert main(["frontier", "--selection-z", "0", "--out", str(tmp_path)]) == 0
    assert main(["frontier", "--out", str(tmp_path)]) == 0
    assert [s.selection_z for s in seen] == [0.0, SELECTION_Z]
    assert [s.cascade_last for s in seen] == ["reference", "reference"]
    assert main(["frontier", "--cascade-last", "any", "--out", str(tmp_path)]) == 0
    assert seen[-1].cascade_last == "any"
    assert main(["frontier", "--selection-z", "-1", "--out", str(tmp_path)]) == 2
    assert "selection_z must be a finite number >= 0" in capsys.readouterr().err
