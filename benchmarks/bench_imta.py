"""The IMTA recipe against the recipe the frontier used before it, on the frontier's own multi-exit networks.

Trains each model twice from the same seed with the same budget (epochs, schedule, label smoothing 0.05): with the
previous frontier recipe (gradient equilibrium, every exit distilled from the last, alpha 1, T 3; no forward
transfer) and with the public IMTA recipe (the same plus forward knowledge transfer, each exit distilled from the
next). Prints each exit's test accuracy (anytime prediction, executed ``infer`` at full depth gives the same last
exit) and its MACs, on ScaledMNIST at the ``full`` preset's 64x64 canvas (clutter 2).

    python benchmarks/bench_imta.py [--epochs 3] [--models ranet msdnet] [--threads 2]
                                    [--recipes previous imta imta-last imta-no-transfer]
"""
from __future__ import annotations

import argparse
import time

import torch

from dyncnn.data import ScaledMNIST
from dyncnn.dynamic.budget import collect_exit_logits
from dyncnn.frontier.runner import presets
from dyncnn.models import create_model
from dyncnn.train import TrainConfig, Trainer

RECIPES = {"previous": ("GE + distill from last", {"forward_transfer": False, "teacher": "last",
                                                     "label_smoothing": 0.05}),
           "imta": ("IMTA (GE + transfer + distill from next)", {"label_smoothing": 0.05}),
           # the two IMTA techniques one at a time, to tell which one moves the accuracy
           "imta-last": ("GE + transfer + distill from last", {"teacher": "last", "label_smoothing": 0.05}),
           "imta-no-transfer": ("GE + distill from next", {"forward_transfer": False, "label_smoothing": 0.05})}
LABELS = {"ranet": "RANet (IMTA)", "msdnet": "MSDNet (IMTA)", "exits-mnv3": "exits on mnv3-small x0.5 (IMTA)",
          "exits-tiny-m": "exits on tiny-M (IMTA)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["ranet"], choices=sorted(LABELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=["previous", "imta"], choices=list(RECIPES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = {split: ScaledMNIST(split, canvas=64, clutter=2) for split in ("train", "val", "test")}
    specs = {spec["label"]: spec for spec in presets(64)["full"]["dynamic"] if spec["kind"] == "trained"}
    x1 = data["test"][0][0][None]
    for key in args.models:
        spec = specs[LABELS[key]]
        for recipe, imta in (RECIPES[r] for r in args.recipes):
            torch.manual_seed(args.seed)
            net = create_model(spec["name"], num_classes=10, in_chans=1, **{**spec["cfg"], "imta": imta})
            cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.1, label_smoothing=0.05, warmup_epochs=0.2,
                              seed=args.seed, device="cpu", progress=False)
            t0 = time.perf_counter()
            Trainer(net, data["train"], data["val"], cfg).fit()
            seconds = time.perf_counter() - t0
            logits, y = collect_exit_logits(net.eval(), data["test"])
            acc = [float((lg.argmax(1) == y).double().mean()) for lg in logits]
            macs = [m / 1e6 for m in net.exit_macs(x1)]
            print(f"{LABELS[key].replace(' (IMTA)', '')} | {recipe} | test accuracy per exit "
                  f"{' / '.join(f'{a:.4f}' for a in acc)} | MMACs per exit {' / '.join(f'{m:.2f}' for m in macs)} "
                  f"| trained in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
