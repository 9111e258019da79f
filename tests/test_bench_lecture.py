"""benchmarks/bench_lecture.py: the verdict rule, and a ``--quick`` run that gives every claim a row with its command
and a verdict (docs/lecture.md is the full run's page)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_lecture.py"
VERDICT = re.compile(r"\*\*(holds|does not hold here|not reproducible at this scale)\*\*: \S")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_lecture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> list[list[str]]:
    """The cells of each numbered table row (a pipe escaped as \\| stays inside its cell)."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if re.match(r"\| \d+ \|", line)]


def test_a_difference_counts_only_beyond_the_seed_spread():
    b = _bench()
    assert b.compare([0.90, 0.91], [0.80, 0.82], "a", "b")[0] == b.HOLDS
    assert b.compare([0.80, 0.82], [0.90, 0.91], "a", "b")[0] == b.NOT_HERE
    verdict, why = b.compare([0.90, 0.95], [0.89, 0.93], "a", "b")       # 1.5 points apart, spreads of 4-5
    assert verdict == b.NOT_AT_SCALE and "within the seed spread" in why
    assert b.compare([0.905], [0.90], "a", "b")[0] == b.NOT_AT_SCALE    # one seed: half a point is noise


@pytest.mark.slow
def test_quick_run_gives_every_claim_a_command_and_a_verdict(tmp_path):
    out = tmp_path / "lecture.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    rows = _rows(text)
    claims = list(_bench().CLAIMS)
    assert len(rows) == len(claims) >= 20
    for key, cells in zip(claims, rows):
        assert len(cells) == 6, cells
        assert cells[3] == f"`python benchmarks/bench_lecture.py --only {key} --quick`"
        assert VERDICT.match(cells[5]), cells
        assert not cells[4].startswith("failed:"), cells          # every claim ran to its figure
    assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d UTC", text) and "logical CPUs" in text
    assert "Unfinished run" not in text
    images = re.findall(r"\(img/([^)]+\.png)\)", text)
    assert len(images) >= 4 and all((tmp_path / "img" / name).stat().st_size > 1000 for name in images)
