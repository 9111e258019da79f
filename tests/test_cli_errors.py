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
