"""``dyncnn demo``: the main job on the embedded data (a small ``dyncnn frontier``)."""
from __future__ import annotations

from pathlib import Path

from .common import THREADS


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded data: static front vs cascades",
                       description="Train a small static front on ScaledMNIST with clutter, build cascades "
                                   "from it (one searched on validation), calibrate them on the validation split, "
                                   "time everything in ONNX Runtime and write report.md and plots to --out (a "
                                   "small `dyncnn frontier`).")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count (5)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads for training; ONNX Runtime is timed with "
                   "1 and this many threads")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo
    run_demo(out_dir=Path(args.out), epochs=args.epochs, threads=args.threads)
    return 0
