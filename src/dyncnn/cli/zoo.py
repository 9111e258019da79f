"""``dyncnn zoo``: the registered models with measured parameters and MACs, cached per dyncnn and torch version."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("zoo", help="table of registered models with measured parameters and MACs",
                       description="List registered models with parameters and MACs measured by FlopCounterMode "
                                   "at each model's own default input (images at the published size, clips and "
                                   "sequences at the shape the model declares; --input-size sets the side of "
                                   "images and frames), beside published figures. Measured rows are cached per "
                                   "dyncnn version (--no-cache measures again). Progress goes to stderr, and "
                                   "shows only on a terminal.")
    p.add_argument("--pattern", default="*", help="shell pattern over model names (default: all)")
    p.add_argument("--input-size", type=int, default=None, help="square image / frame side (default: each "
                   "model's own)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-cache", action="store_true", help="profile every model again and refresh the cache "
                   "(rows are cached per dyncnn and torch version, model and input size under "
                   "$XDG_CACHE_HOME/dyncnn or ~/.cache/dyncnn)")
    p.set_defaults(func=run)


def run(args) -> int:
    import contextlib

    import torch
    from tqdm.auto import tqdm

    from ..models import list_models
    cache_path = _zoo_cache_file(torch.__version__)
    cache = {} if args.no_cache else _read_zoo_cache(cache_path)
    rows, failed = [], []
    # stdout carries the table or the JSON only: progress, warnings and anything a model prints go to stderr;
    # the bar shows only when stderr is a terminal (disable=None), so logs get no carriage-return fragments
    with contextlib.redirect_stdout(sys.stderr):
        for name in tqdm(list_models(args.pattern), desc="profiling", leave=False, file=sys.stderr, disable=None):
            key = _zoo_cache_key(name, args.input_size)
            if key in cache:
                rows.append(cache[key])
                continue
            try:
                row = _zoo_row(name, args.input_size)
            except Exception as e:  # noqa: BLE001 - one model that cannot be profiled must not hide the others
                failed.append(name)
                rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
                print(f"dyncnn zoo: {name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            rows.append(row)
            cache[key] = row
            _write_zoo_cache(cache_path, cache)     # after each model: an interrupted listing keeps what it measured
    if args.json:
        print(json.dumps(rows, indent=2))
        return 1 if failed else 0

    def fmt(v):
        return f"{v:.2f}" if v is not None else "-"
    print("| model | input | params (M) | MACs (M) | published params (M) | published MACs (M) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | - | - | - | - | - |")
            continue
        shape = "x".join(map(str, r["input_shape"]))
        print(f"| {r['model']} | {r['input_kind']} {shape} | {fmt(r['params_m'])} | {fmt(r['macs_m'])} | "
              f"{fmt(r['published_params_m'])} | {fmt(r['published_macs_m'])} |")
    return 1 if failed else 0


def _zoo_row(name: str, input_size: int | None) -> dict:
    """Parameters and MACs of one registered model at its own default input (image, clip or sequence)."""
    import torch

    from ..models import create_model, published_figures
    from ..profile import count_macs, example_input
    pub = published_figures(name)
    # e.g. CondenseNet: the published figures are those of the converted inference network
    model = create_model(name, **pub.get("profile_cfg", {}))
    kind, shape = example_input(model, input_size, pub.get("input_size"))
    r = count_macs(model, torch.randn(1, *shape))
    return {"model": name, "input_kind": kind, "input_shape": list(shape),
            "input": shape[-1] if kind != "sequence" else None, "params_m": r.params / 1e6, "macs_m": r.total / 1e6,
            "published_params_m": pub["params"] / 1e6 if "params" in pub else None,
            "published_macs_m": pub["macs"] / 1e6 if "macs" in pub else None}


def zoo_cache_dir() -> Path:
    """Where ``dyncnn zoo`` keeps its measured rows: ``$XDG_CACHE_HOME/dyncnn``, else ``~/.cache/dyncnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dyncnn"


def _zoo_cache_file(torch_version: str) -> Path:
    """One file per dyncnn and torch version: a new release (or torch) never reads an older one's figures."""
    from .. import __version__
    safe = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in f"{__version__}-torch{torch_version}")
    return zoo_cache_dir() / f"zoo-{safe}.json"


def _zoo_cache_key(name: str, input_size: int | None) -> str:
    """Model name and requested input side (``default``: the model's own input, which its code fixes)."""
    return f"{name}@{input_size if input_size is not None else 'default'}"


def _read_zoo_cache(path: Path) -> dict[str, dict]:
    """The cached rows, or none when the file is missing or unreadable (a cache is never worth an error)."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rows if isinstance(rows, dict) else {}


def _write_zoo_cache(path: Path, rows: dict[str, dict]) -> None:
    """Write to a temporary file in the same folder, then rename it over the cache: a reader (or a second
    ``dyncnn zoo``) sees the old file or the new one, never half of one. Failing to write only costs the cache."""
    import tempfile
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            json.dump(rows, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        print(f"dyncnn zoo: cannot write the cache {path}: {e.strerror or e}", file=sys.stderr)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
