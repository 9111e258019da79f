"""Layer skipping (SkipNet, BlockDrop) executed for real: accuracy against mean MACs on ScaledMNIST, and the realized
wall-clock speedup of executed skipping against its MAC speedup.

(a) On ScaledMNIST (canvas 32, the embedded real digits), train the static ResNet-20 (small width), then start
    SkipNet and BlockDrop from its weights (as the papers do) and fine-tune them at each budget; report test
    accuracy, mean MACs per sample (the ledger of executed inference, gates / policy included) and the fraction of
    the static backbone's MACs.
(b) Time ``infer`` of each gated model against the same model forced all-on (``force_gates(True)``: the static
    backbone through the same executor), same inputs, same process, at batch 64 and batch 1 (each sample alone);
    realized speedup = all-on latency / dynamic latency, beside MAC speedup = all-on MACs / mean MACs. Besides
    the trained ScaledMNIST models, a full-width SkipNet ResNet-110 with random gates (about half the blocks
    skipped, different per sample) shows the mechanism on a CIFAR-sized network.

    python benchmarks/bench_skipping.py [--quick] [--threads 2] [--train-threads 1]

Training runs single-threaded by default (the machine is shared); timing uses ``--threads``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from dyncnn.data import ScaledMNIST
from dyncnn.dynamic.evaluation import evaluate_dynamic
from dyncnn.models import create_model
from dyncnn.train.trainer import TrainConfig, Trainer, evaluate


def train(model: nn.Module, train_set, val_set, epochs: int, lr: float, optimizer: str = "sgd") -> float:
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=lr, optimizer=optimizer, weight_decay=5e-4,
                      progress=False, seed=0)
    t0 = time.perf_counter()
    Trainer(model, train_set, val_set, cfg).fit()
    return time.perf_counter() - t0


def part_a(args) -> tuple[list[dict], dict]:
    torch.set_num_threads(args.train_threads)
    canvas, width = 32, args.width
    train_set = ScaledMNIST("train", canvas=canvas)
    val_set = ScaledMNIST("val", canvas=canvas)
    test_set = ScaledMNIST("test", canvas=canvas)
    if args.quick:
        train_set = torch.utils.data.Subset(train_set, range(640))
        test_set = torch.utils.data.Subset(test_set, range(200))
    torch.manual_seed(0)
    static = create_model("resnet20_cifar", in_chans=1, width_mult=width)
    if args.cache and os.path.exists(args.cache):
        static.load_state_dict(torch.load(args.cache))
        secs = float("nan")
    else:
        secs = train(static, train_set, val_set, args.static_epochs, lr=0.05)
        if args.cache:
            torch.save(static.state_dict(), args.cache)
    static.eval()
    x = test_set[0][0].unsqueeze(0)
    from dyncnn.profile.macs import count_macs
    static_macs = count_macs(static, x).total
    acc = evaluate(static, test_set)["acc"]
    rows = [{"model": f"resnet20_cifar (w{width}) static", "budget": "-", "acc": acc, "macs": static_macs,
             "frac": 1.0, "secs": secs}]
    print(f"static: acc {acc:.4f}, {static_macs / 1e6:.3f}M MACs, {secs:.0f}s", flush=True)
    models = {}
    for family, budgets in (("skipnet", args.budgets), ("blockdrop", args.blockdrop_budgets)):
        for b in budgets:
            torch.manual_seed(0)
            kw = dict(in_chans=1, width_mult=width, budget=b)
            if family == "skipnet":
                kw.update(cost_weight=args.cost_weight, gate_bias=args.gate_bias, gate_noise=args.gate_noise)
            else:
                kw.update(finetune_backbone=True, cost_weight=args.cost_weight)
            model = create_model(f"{family}_resnet20_cifar", **kw)
            model.backbone.load_state_dict(static.state_dict())
            epochs = args.skip_epochs if family == "skipnet" else args.blockdrop_epochs
            secs = train(model, train_set, val_set, epochs, lr=args.finetune_lr)
            res = evaluate_dynamic(model, test_set)
            rows.append({"model": f"{family}_resnet20_cifar (w{width})", "budget": b, "acc": res["accuracy"],
                         "macs": res["mean_macs"], "frac": res["mean_macs"] / static_macs, "secs": secs,
                         "rates": res.get("choice_rate")})
            models[(family, b)] = model
            print(f"{family} budget {b}: acc {res['accuracy']:.4f}, {res['mean_macs'] / 1e6:.3f}M MACs "
                  f"({res['mean_macs'] / static_macs:.3f} of static), rates {res.get('choice_rate')}, {secs:.0f}s",
                  flush=True)
    return rows, {"test_set": test_set, "models": models}


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median ms of two functions, runs interleaved (a, b, a, b, ...) so that load changes hit both alike."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def speed(label: str, model: nn.Module, x: torch.Tensor, args) -> list[dict]:
    repeats = args.repeats
    dyn = copy.deepcopy(model).eval()
    full = copy.deepcopy(model).eval()
    full.force_gates(True)
    r = dyn.infer(x)
    mac_speedup = float(full.infer(x).macs.double().mean() / r.macs.double().mean())
    rows = []
    for batch in (64, 1):
        if batch == 64:
            t_full, t_dyn = timed_pair(lambda: full.infer(x), lambda: dyn.infer(x), repeats)
        else:
            singles = [x[i:i + 1] for i in range(args.singles)]
            t_full, t_dyn = timed_pair(lambda: [full.infer(s) for s in singles],
                                       lambda: [dyn.infer(s) for s in singles], max(3, repeats // 3))
        realized = t_full / t_dyn
        print(f"{label} batch {batch}: all-on {t_full:.1f} ms, dynamic {t_dyn:.1f} ms, realized {realized:.2f}x, "
              f"MAC {mac_speedup:.2f}x", flush=True)
        rows.append({"model": label, "batch": batch, "run_rate": float(r.choices.float().mean()),
                     "mac_speedup": mac_speedup, "full_ms": t_full, "dyn_ms": t_dyn, "realized": realized,
                     "ratio": realized / mac_speedup})
    return rows


def random_gates_resnet110(width: float) -> nn.Module:
    """A SkipNet ResNet-110 whose random gates skip about half the blocks, differently per sample."""
    torch.manual_seed(0)
    model = create_model("skipnet_resnet110_cifar", num_classes=10, width_mult=width)
    for gate in model.gates:
        nn.init.normal_(gate.fc.weight, 0.0, 1.0)
        nn.init.zeros_(gate.fc.bias)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small subset and few epochs (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the timing part")
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--static-epochs", type=int, default=8)
    ap.add_argument("--skip-epochs", type=int, default=4)
    ap.add_argument("--blockdrop-epochs", type=int, default=3)
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.75])
    ap.add_argument("--blockdrop-budgets", type=float, nargs="*", default=[0.5])
    ap.add_argument("--cost-weight", type=float, default=20.0)
    ap.add_argument("--gate-bias", type=float, default=1.0)
    ap.add_argument("--gate-noise", action="store_true",
                    help="Gumbel noise in SkipNet's training gates (default: SkipNet's plain straight-through, "
                         "which kept 5 points more accuracy at budget 0.5 in our runs)")
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--singles", type=int, default=16, help="batch-1 timing: this many samples one at a time")
    ap.add_argument("--big-width", type=float, default=0.5, help="width of the random-gate ResNet-110")
    ap.add_argument("--cache", default=None, help="load / save the trained static backbone here")
    args = ap.parse_args()
    if args.quick:
        args.static_epochs, args.skip_epochs, args.blockdrop_epochs, args.repeats, args.singles = 1, 1, 1, 5, 4
    torch.set_flush_denormal(True)

    t0 = time.perf_counter()
    rows, ctx = part_a(args)
    print(f"\n(a) ScaledMNIST canvas 32, test split; training {time.perf_counter() - t0:.0f}s with "
          f"{args.train_threads} thread(s)\n")
    print("| model | budget | test acc | mean MACs (M) | fraction of static | train s | block run rates |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rates = " ".join(f"{v:.2f}" for v in r.get("rates") or []) or "-"
        print(f"| {r['model']} | {r['budget']} | {r['acc']:.4f} | {r['macs'] / 1e6:.3f} | {r['frac']:.3f} | "
              f"{r['secs']:.0f} | {rates} |")
    if args.skip_timing:
        return

    torch.set_num_threads(args.threads)
    test_set = ctx["test_set"]
    x = torch.stack([test_set[i][0] for i in range(64)])
    timing = []
    for (family, b), model in ctx["models"].items():
        timing += speed(f"{family}_resnet20_cifar budget {b} (trained)", model, x, args)
    timing += speed(f"skipnet_resnet110_cifar w{args.big_width}, random gates", random_gates_resnet110(args.big_width),
                    torch.randn(64, 3, 32, 32), args)
    print(f"\n(b) executed skipping vs the same model forced all-on, {args.threads} threads, eager PyTorch, "
          f"median of {args.repeats} runs (batch 1: {args.singles} samples one at a time, total ms)\n")
    print("| model | batch | blocks run | MAC speedup | all-on ms | dynamic ms | realized speedup | realized / MAC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in timing:
        print(f"| {r['model']} | {r['batch']} | {r['run_rate']:.2f} | {r['mac_speedup']:.2f}x | {r['full_ms']:.1f} | "
              f"{r['dyn_ms']:.1f} | {r['realized']:.2f}x | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
