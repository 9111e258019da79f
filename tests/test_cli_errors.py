"""Issues 27 and 28, the CLI's errors: `--version`, mistyped commands and options, `--cfg` values the model
rejects or that another flag sets, and exported bundles (or their graph files) given where a checkpoint or model
is expected. Each is one line on stderr and exit code 2."""
import json
import tomllib
import warnings
from pathlib import Path

import pytest

import dyncnn
from dyncnn.cli import main


def _exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_version_is_the_package_version(capsys):
    assert _exit(["--version"]) == 0
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert capsys.readouterr().out == f"dyncnn {dyncnn.__version__}\n"
    assert dyncnn.__version__ == pyproject["project"]["version"]


def test_a_mistyped_option_gets_the_commands_usage_and_a_suggestion(capsys):
    assert _exit(["train", "--epcohs", "1"]) == 2          # before the missing --model / --out
    err = capsys.readouterr().err
    assert err.startswith("usage: dyncnn train ")
    assert err.splitlines()[-1] == "dyncnn train: error: unrecognized argument --epcohs (did you mean --epochs?)"
    assert _exit(["eval", "run/last.safetensors", "--splt=val"]) == 2
    assert "dyncnn eval: error: unrecognized argument --splt=val (did you mean --split?)" in capsys.readouterr().err
    assert _exit(["profile", "tiny_mobilenet", "--zzzz"]) == 2           # nothing close: no suggestion
    assert capsys.readouterr().err.splitlines()[-1] == "dyncnn profile: error: unrecognized argument --zzzz"


def test_what_argparse_accepts_is_not_taken_for_a_typo():
    from dyncnn.cli import build_parser
    args = build_parser().parse_args(["train", "--model", "m", "--out", "o", "--lr", "-1", "--epoch", "3",
                                      "--cfg", "widths=[8]"])
    assert (args.lr, args.epochs, args.cfg) == (-1.0, 3, ["widths=[8]"])   # a negative value, a unique prefix


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert _exit(["trian", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("dyncnn: error: unknown command 'trian' (did you mean train?) (commands: zoo, profile,")


def test_cfg_num_classes_is_refused_naming_the_flag_that_sets_it(tmp_path, capsys):
    assert main(["train", "--model", "tiny_mobilenet", "--dataset", "mnist", "--cfg", "num_classes=5",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "dyncnn train: error: --cfg num_classes=5: num_classes is set by --dataset mnist (10); drop it " \
                  "from --cfg\n"
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_cfg_num_classes_sets_it_where_no_flag_does(capsys):
    """`dyncnn profile MODEL` has no data to take the class count from: there --cfg sets it."""
    argv = ["profile", "tiny_mobilenet", "--input-size", "16", "--no-onnx", "--batch-sizes", "1", "--min-time", "0",
            "--json", "--cfg", "widths=[8]"]
    params = {}
    for n in (5, 10):
        assert main(argv + [f"num_classes={n}"]) == 0
        params[n] = json.loads(capsys.readouterr().out)["params"]
    assert params[10] - params[5] == 5 * (8 + 1)          # the classifier: 8 features (+ bias) per class


def test_cfg_values_the_model_rejects_name_the_cfg_item(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["profile", "tiny_mobilenet", "--cfg", "in_chans=0", "widths=[8]", "--no-onnx"]) == 2
    assert not [w for w in caught if "zero-element" in str(w.message)]         # no torch warning first
    err = capsys.readouterr().err
    assert err.startswith("dyncnn profile: error: --cfg in_chans=0 widths=[8]: tiny_mobilenet built with it has "
                          "empty weights (stem.0.weight (8, 0, 3, 3))") and err.count("\n") == 1
    assert main(["profile", "tiny_mobilenet", "--cfg", "in_chans=-1", "widths=[8]", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dyncnn profile: error: --cfg in_chans=-1 widths=[8]: ") and "negative dimension" in err
    assert main(["profile", "tiny_mobilenet", "--cfg", "widthz=[8]", "--no-onnx"]) == 2
    assert capsys.readouterr().err.startswith("dyncnn profile: error: --cfg widthz=[8]: model 'tiny_mobilenet' has "
                                              "no config key 'widthz'; did you mean 'widths'?")
    # an unknown model is about the name, not the --cfg items
    assert main(["profile", "tiny_mobilenetx", "--cfg", "widths=[8]", "--no-onnx"]) == 2
    assert capsys.readouterr().err.startswith("dyncnn profile: error: unknown model 'tiny_mobilenetx'")


def _bundle(tmp_path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "stage0.onnx").write_bytes(b"\0")
    return folder


def test_eval_and_calibrate_of_a_bundle_say_it_is_one(tmp_path, capsys):
    folder = _bundle(tmp_path)
    for argv in (["eval", str(folder)], ["calibrate", str(folder), "--budget", "0.5"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{folder} is a bundle (exported model), not a training checkpoint" in err, err
        assert f"use `dyncnn bench {folder}` or `dyncnn profile {folder}`" in err and "does not exist" not in err


def test_a_graph_file_given_as_a_model_says_what_it_is(tmp_path, capsys):
    folder = _bundle(tmp_path)
    assert main(["profile", str(folder / "stage0.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"is a file of the bundle (exported model) {folder}" in err and "unknown model" not in err
    assert f"`dyncnn profile {folder}`" in err
    (tmp_path / "alone.onnx").write_bytes(b"\0")
    for cmd in ("profile", "bench", "export"):
        argv = [cmd, str(tmp_path / "alone.onnx")] + (["--out", str(tmp_path / "x")] if cmd == "export" else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"alone.onnx is an exported graph (.onnx), not a model name or checkpoint" in err, err
        assert "`dyncnn bench DIR` or `dyncnn profile DIR`" in err
