"""Every ```python block of README.md and of the documentation pages (docs/*.md) runs as written, at tiny size, so
that neither can rot.

The rule, the same for every page: a block fenced as ```python runs; a block that must not run here (it needs
CIFAR on disk, a GPU, or minutes) is marked with the comment ``<!-- skip-test -->`` on the non-blank line before
its fence (invisible on the rendered page); code that is only shown (a shell session, output) is fenced as
```bash or ```text. Each block runs in its own subprocess (a fresh interpreter, in a temporary folder, with a
timeout), after a prelude that imports what the blocks may take as already imported (``torch``, ``dyncnn``).
"Tiny size" means the one rewrite below: training runs for one epoch (``epochs=N`` -> ``epochs=1``).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRELUDE = "import torch\nimport dyncnn\n"
SKIP = "<!-- skip-test -->"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block not marked with SKIP on the non-blank line before it."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next((j for j in range(start, len(lines)) if lines[j].strip() == "```"), len(lines))
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if before != SKIP:
                blocks.append((start + 1, "\n".join(lines[start:end]) + "\n"))
            i = end
        i += 1
    return blocks


def tiny(code: str) -> str:
    return re.sub(r"\bepochs\s*=\s*\d+", "epochs=1", code)


def test_block_extraction_honours_skip_marks():
    text = "a\n```python\nx = 1\n```\n<!-- skip-test -->\n\n```python\nraise SystemExit(1)\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n")]
    assert tiny("TrainConfig(epochs=5, lr=0.1)") == "TrainConfig(epochs=1, lr=0.1)"


PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.exists()]
BLOCKS = [(str(page.relative_to(ROOT)), line, code) for page in PAGES for line, code in python_blocks(page.read_text())]


def test_docs_pages_have_runnable_blocks():
    """Every family page carries a runnable example (the index, the API, the choosing page and the generated
    page of the lecture's claims need none)."""
    pages_with_code = {page for page, _, _ in BLOCKS}
    family_pages = [p for p in PAGES if p.parent.name == "docs"
                    and p.stem not in ("index", "api", "choosing", "lecture")]
    assert family_pages, "docs/ has no family pages"
    assert [str(p.relative_to(ROOT)) for p in family_pages if str(p.relative_to(ROOT)) not in pages_with_code] == []


@pytest.mark.parametrize("page,line,code", BLOCKS, ids=[f"{page}:{line}" for page, line, _ in BLOCKS])
def test_readme_python_block_runs(page, line, code, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = tmp_path / "block.py"
    script.write_text(PRELUDE + tiny(code))
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{page} block at line {line} ran for more than 600 s")
    assert r.returncode == 0, f"{page} block at line {line} failed:\n{r.stderr[-3000:]}"
