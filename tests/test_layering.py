"""The import layering of issue 14 (see ``[tool.importlinter]`` in pyproject.toml) holds, and the contract is real."""
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

importlinter_api = pytest.importorskip("importlinter.api", reason="import-linter is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
SRC = ROOT / "src"
CHAIN = ["dyncnn.cli", "dyncnn.export", "dyncnn.train", "dyncnn.models", "dyncnn.dynamic", "dyncnn.layers"]  # top down
# `python -m importlinter.cli` has no __main__ guard and exits 0 without checking anything, so call the entry point.
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _contract(contract_type: str) -> list[dict]:
    return [c for c in importlinter_api.read_configuration(str(PYPROJECT))["contracts_options"] if c["type"] == contract_type]


def test_lint_imports_keeps_every_contract():
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo", str(PYPROJECT)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lint-imports failed (exit {proc.returncode}):\n{out}"
    assert " 0 broken" in out and "KEPT" in out, out      # it really checked contracts


def test_layers_contract_names_the_chain_in_order():
    (layers,) = [c for c in _contract("layers") if not c.get("containers")]
    entries = layers["layers"]
    names = [[name.strip() for name in entry.replace(":", "|").split("|")] for entry in entries]
    # the six main layers are each a level of their own, in the stated order, cli on top and errors at the bottom
    assert [e for e in entries if e in CHAIN] == CHAIN
    assert entries[0] == "dyncnn.cli" and entries[-1] == "dyncnn.errors"
    # every subpackage and module of dyncnn sits in exactly one layer: a new one cannot slip past the contract
    placed = [n for level in names for n in level]
    present = {f"dyncnn.{m.name}" for m in pkgutil.iter_modules([str(SRC / "dyncnn")])}
    assert sorted(placed) == sorted(present)
    # known violations are named one import at a time, never as wildcards that would hide a whole package
    for ignored in layers.get("ignore_imports", []):
        assert "*" not in ignored and ignored.count("->") == 1, ignored


def test_every_export_module_has_a_layer_so_export_has_no_import_cycle():
    """Issue 28: runtime <-> staged <-> cond/glance/quantize imported each other; the export-layers contract puts
    each module of dyncnn.export on a level of its own (lint-imports then refuses an import upwards, lazy ones
    included), so a new module cannot slip past it."""
    (export,) = [c for c in _contract("layers") if c.get("containers")]
    placed = sorted(n.strip() for entry in export["layers"] for n in entry.replace(":", "|").split("|"))
    present = sorted(m.name for m in pkgutil.iter_modules([str(SRC / "dyncnn" / "export")]))
    assert placed == present
    assert not export.get("ignore_imports")
