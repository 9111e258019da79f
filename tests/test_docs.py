"""The documentation site builds offline and without a warning (``mkdocs build --strict``, as ``make docs``), and its
API page is generated from the docstrings. The python blocks of the pages run in tests/test_readme.py."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_page_is_in_the_navigation():
    def pages(entries):
        for e in entries:
            v = next(iter(e.values())) if isinstance(e, dict) else e
            yield from (pages(v) if isinstance(v, list) else [v])
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert sorted(pages(config["nav"])) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_docs_build_strict_offline(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    # no proxy and an unroutable one: a build that tried to fetch anything would fail rather than hang
    env.update({k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")})
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    for name in ("create_model", "count_macs", "ExitPolicy", "export_bundle", "load_bundle", "apply_imta", "MultiExitLoss"):
        assert name in api, f"{name} missing from the API page"
    assert (site / "choosing" / "index.html").exists()
    assert not [p for p in site.rglob("*.html") if "fonts.googleapis.com" in p.read_text()]
