"""The accuracy-latency frontier with the full settings: dynamic networks against the static front, ONNX Runtime.

Two scales, every model trained with the same budget (5 epochs, cosine schedule, label smoothing 0.05, seeds 0 and
1), the test split rendered three times per digit (3,000 images), operating points chosen on the validation split:

- ``full``: the demo's 64x64 ScaledMNIST (clutter 2); 8 static networks (tiny_mobilenet at three widths and at full,
  1/2 and 1/4 resolution, MobileNetV3-Small x0.5, ShuffleNetV2 x0.5) against resolution / width cascades built from
  them, exits on tiny-M trained with self-distillation and gradient equilibrium, and MSDNet with the same recipe;
  at both scales also the cascade whose 2-3 members are searched among the static networks on validation;
- ``phone``: a 128x128 canvas with networks of 1.2-73M MACs (MobileNetV3-Small, ShuffleNetV2 x1.0, tiny_mobilenet
  up to 73M), where a runtime's per-call overhead is a small share of a model's time.

Each writes ``frontier.json``, ``frontier.md`` and ``frontier.png`` into ``runs/bench_frontier/<scale>`` and prints
the headline. Training the ``phone`` models takes about an hour on 2 CPU cores (3 minutes on one GPU:
``--device cuda``); checkpoints are reused from the output folder, so a second run only times.

    python benchmarks/bench_frontier.py [--scales full phone] [--device auto] [--seeds 0 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys

from dyncnn.cli import main


def run(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="+", default=["full", "phone"], choices=["full", "phone"])
    p.add_argument("--device", default="auto", help="training device (timing is always on the CPU)")
    p.add_argument("--seeds", nargs="+", default=["0", "1"])
    p.add_argument("--epochs", default="5")
    p.add_argument("--rounds", default="7")
    p.add_argument("--out", default="runs/bench_frontier")
    args = p.parse_args(argv)
    for scale in args.scales:
        rc = main(["frontier", "--preset", scale, "--seeds", *args.seeds, "--epochs", args.epochs, "--device",
                   args.device, "--rounds", args.rounds, "--single-images", "200" if scale == "full" else "100",
                   "--batch-images", "640" if scale == "full" else "256",
                   "--out", f"{args.out}/{scale}"])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run())
