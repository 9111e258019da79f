"""How well each exit of the width-wise multi-stage network learns, against static networks of the same cost
(issue 25: can a single feature-reusing network match a cascade of static ones?), under two recipes:

- ``joint``: every exit's cross-entropy summed, all stages trained together (the frontier's entry);
- ``stagewise`` (:mod:`dyncnn.train.recipes.stagewise`): each stage trained for its own exit, the earlier stages
  frozen, each for the same epochs.

The static networks are the ones a cascade would chain (tiny-M /2, tiny-M, tiny-L, MobileNetV3-Small), trained with
the frontier's schedule (``train_one``: same epochs, learning rate, label smoothing, channels-last on a CPU) on
the frontier's data (ScaledMNIST, 3 renderings of 3,500 training digits, validation 2 renderings of 500). For every
model and exit: MACs, the last epoch's training accuracy and the validation accuracy; the gap between the two is
where a later stage that leans on features fitted to the training digits shows.

    python benchmarks/bench_multi_stage_training.py [--canvas 64] [--epochs 5] [--seed 0] [--out runs/ms_train]

Finished runs in ``--out`` are reused (as ``dyncnn frontier`` reuses them), so a second call only evaluates.
At 64x64 on 2 cores it trains for about 15 minutes (the joint multi-stage network's step costs about 3x tiny-L's:
many small convolutions, concatenations and normalizations).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from dyncnn.dynamic.budget import collect_exit_logits
from dyncnn.frontier.runner import (PLAIN_RECIPE, TINY_L, TINY_M, TINY_S, FrontierSettings, _stagewise, _static,
                                    _AsExits, _trained, build_dynamic, build_static, load_data, train_one)
from dyncnn.profile import count_macs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--canvas", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--out", default="runs/ms_train")
    args = p.parse_args(argv)
    s = FrontierSettings(out=Path(args.out), preset="full", canvas=args.canvas, epochs=args.epochs, seeds=(args.seed,))
    data = load_data(s)
    x = torch.zeros(1, 1, args.canvas, args.canvas)
    widths = [TINY_M, TINY_S, TINY_S]
    models = [(sp["label"], build_static(sp)) for sp in (
        _static("tiny-M /2", "tiny_mobilenet", 2, widths=TINY_M), _static("tiny-M", "tiny_mobilenet", 1, widths=TINY_M),
        _static("tiny-L", "tiny_mobilenet", 1, widths=TINY_L), _static("mnv3-small", "mobilenet_v3_small", 1))]
    models += [(sp["label"], build_dynamic(sp, {}, {})) for sp in (
        _trained("multi-stage M/2+S+S joint", "multi_stage", imta=PLAIN_RECIPE, widths=widths, resolutions=[2, 1, 1]),
        _stagewise("multi-stage M/2+S+S stagewise", "multi_stage", widths=widths, resolutions=[2, 1, 1]))]
    print(f"ScaledMNIST {args.canvas}x{args.canvas}, clutter {s.clutter}, {args.epochs} epochs, training seed "
          f"{args.seed}; load average {os.getloadavg()[0]:.2f}\n")
    print("| model | exit | MACs | train acc (last epoch) | val acc |\n|---|---|---|---|---|")
    rows = []
    for label, net in models:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        net, info = train_one(net, label, args.seed, s, data["train"], data["val"], data["meta"])
        logits, y = collect_exit_logits(net if hasattr(net, "exit_macs") else _AsExits(net).eval(), data["val"])
        macs = net.exit_macs(x) if hasattr(net, "exit_macs") else [count_macs(net, x).per_sample]
        history = info["history"]
        for k, z in enumerate(logits):
            # the training accuracy of exit k: the last epoch of stage k (stage-wise), else the model's (last exit)
            train = [h["train_acc"] for h in history if h.get("stage", k) == k]
            row = {"model": label, "exit": k, "macs": macs[k], "val_acc": float((z.argmax(1) == y).double().mean()),
                   "train_acc": train[-1] if train and (k == len(logits) - 1 or "stage" in history[-1]) else None}
            rows.append(row)
            tr = f"{row['train_acc']:.3f}" if row["train_acc"] is not None else "-"
            print(f"| {label} | {k} | {macs[k] / 1e6:.2f}M | {tr} | {row['val_acc']:.3f} |", flush=True)
        print(f"<!-- {label}: {time.perf_counter() - t0:.0f} s -->", file=sys.stderr)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_multi_stage_training.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
