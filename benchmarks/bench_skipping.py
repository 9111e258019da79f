"""Layer skipping (SkipNet, BlockDrop) executed for real: accuracy against mean MACs on ScaledMNIST, and the realized
wall-clock speedup of executed skipping against its MAC speedup.

(a) On ScaledMNIST (canvas 32, the embedded real digits), train the static ResNet-32 (width 0.5, 13 skippable
    blocks; ``--depth``), then start SkipNet and BlockDrop from its weights (as the papers do) and fine-tune them
    at each budget (SkipNet: straight-through gates with the budget loss; BlockDrop: the paper's two phases, the
    policy on the FROZEN backbone with the curriculum, then policy and backbone jointly); report test
    accuracy, mean MACs per sample (the ledger of executed inference, gates / policy included) and the fraction of
    the static backbone's MACs.
(b) Time ``infer`` of each gated model against the same model forced all-on (``force(True)``: the static
    backbone through the same executor), same inputs, same process, at batch 64 and batch 1 (each sample alone);
    realized speedup = all-on latency / dynamic latency, beside MAC speedup = all-on MACs / mean MACs. Besides
    the trained ScaledMNIST models, a full-width SkipNet ResNet-110 with random gates (about half the blocks
    skipped, different per sample) shows the mechanism on a CIFAR-sized network.

    python benchmarks/bench_skipping.py [--quick] [--threads 2] [--train-threads 1] [--cache static.pt]

``--cache`` keeps the trained static backbone between runs (about 3 of the ~8 minutes of training).

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
from dyncnn.models import create_model
from dyncnn.train.recipes.blockdrop import fit_two_phase
from dyncnn.train.trainer import TrainConfig, Trainer, evaluate
from dyncnn.profile.latency import retain_freed_memory


def config(epochs: int, lr: float, optimizer: str = "sgd", weight_decay: float = 5e-4) -> TrainConfig:
    return TrainConfig(device="cpu", epochs=epochs, batch_size=64, lr=lr, optimizer=optimizer,
                       weight_decay=weight_decay, progress=False, seed=0)


def train(model: nn.Module, train_set, val_set, epochs: int, lr: float, optimizer: str = "sgd") -> float:
    t0 = time.perf_counter()
    Trainer(model, train_set, val_set, config(epochs, lr, optimizer)).fit()
    return time.perf_counter() - t0


def score(model: nn.Module, test_set, batch: int = 250) -> dict:
    """Executed inference over the test set: accuracy, mean MACs, per-block run rates and how much the decisions
    vary per sample (distinct decision patterns; blocks run by some samples and skipped by others)."""
    model.eval()
    correct, macs, choices = 0, [], []
    for i in range(0, len(test_set), batch):
        idx = range(i, min(i + batch, len(test_set)))
        x = torch.stack([test_set[j][0] for j in idx])
        y = torch.as_tensor([int(test_set[j][1]) for j in idx])
        r = model.infer(x)
        correct += int((r.logits.argmax(1) == y).sum())
        macs.append(r.macs)
        choices.append(r.choices)
    c = torch.cat(choices).float()
    rates = c.mean(0)
    return {"acc": correct / len(test_set), "macs": float(torch.cat(macs).double().mean()), "rates": rates.tolist(),
            "patterns": len({tuple(row) for row in c.long().tolist()}),
            "mixed": int(((rates > 0.05) & (rates < 0.95)).sum())}


def build(family: str, budget: float, static: nn.Module, args) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(in_chans=1, width_mult=args.width, budget=budget, cost_weight=args.cost_weight)
    if family == "skipnet":
        kw.update(gate_bias=args.gate_bias, gate_noise=args.gate_noise, gate_hidden=args.gate_hidden,
                  cost_ramp=args.cost_ramp)
    model = create_model(f"{family}_resnet{args.depth}_cifar", **kw)
    model.backbone.load_state_dict(static.state_dict())
    return model


def part_a(args) -> tuple[list[dict], dict]:
    torch.set_num_threads(args.train_threads)
    canvas, width, depth = 32, args.width, args.depth
    train_set = ScaledMNIST("train", canvas=canvas)
    val_set = ScaledMNIST("val", canvas=canvas)
    test_set = ScaledMNIST("test", canvas=canvas)
    if args.quick:
        train_set = torch.utils.data.Subset(train_set, range(640))
        test_set = torch.utils.data.Subset(test_set, range(200))
    torch.manual_seed(0)
    static = create_model(f"resnet{depth}_cifar", in_chans=1, width_mult=width)
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
    rows = [{"model": f"resnet{depth}_cifar (w{width}) static", "budget": "-", "acc": acc, "macs": static_macs,
             "frac": 1.0, "secs": secs}]
    print(f"static: acc {acc:.4f}, {static_macs / 1e6:.3f}M MACs, {secs:.0f}s", flush=True)
    models = {}
    for family, budgets in (("skipnet", args.budgets), ("blockdrop", args.blockdrop_budgets)):
        for b in budgets:
            model = build(family, b, static, args)
            if family == "skipnet":
                secs = train(model, train_set, val_set, args.skip_epochs, lr=args.finetune_lr)
                how = f"{args.skip_epochs} ep"
            else:   # the paper's two phases: policy on the frozen backbone (curriculum), then jointly
                t0 = time.perf_counter()
                fit_two_phase(model, train_set, val_set, config(args.policy_epochs, args.policy_lr, "adamw", 0.0),
                              config(args.joint_epochs, args.finetune_lr))
                secs = time.perf_counter() - t0
                how = f"{args.policy_epochs}+{args.joint_epochs} ep"
            res = score(model, test_set)
            rows.append({"model": f"{family}_resnet{depth}_cifar (w{width}), {how}", "budget": b, **res,
                         "frac": res["macs"] / static_macs, "secs": secs})
            models[(family, b)] = model
            print(f"{family} budget {b}: acc {res['acc']:.4f}, {res['macs'] / 1e6:.3f}M MACs "
                  f"({res['macs'] / static_macs:.3f} of static), {res['patterns']} patterns, {res['mixed']} mixed "
                  f"blocks, rates {[round(r, 2) for r in res['rates']]}, {secs:.0f}s", flush=True)
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
    full.force(True)
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
    ap.add_argument("--depth", type=int, default=32, help="CIFAR ResNet depth 6n+2 (32: 13 skippable blocks)")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--static-epochs", type=int, default=6)
    ap.add_argument("--skip-epochs", type=int, default=3)
    ap.add_argument("--policy-epochs", type=int, default=2, help="BlockDrop phase 1: policy on the frozen backbone")
    ap.add_argument("--joint-epochs", type=int, default=1, help="BlockDrop phase 2: policy and backbone jointly")
    ap.add_argument("--policy-lr", type=float, default=1e-3, help="BlockDrop phase 1 (AdamW)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.75])
    ap.add_argument("--blockdrop-budgets", type=float, nargs="*", default=[0.5, 0.75])
    ap.add_argument("--cost-weight", type=float, default=20.0)
    ap.add_argument("--cost-ramp", type=float, default=0.0, help="SkipNet: budget loss warm-up fraction")
    ap.add_argument("--gate-hidden", type=int, default=0, help="SkipNet: hidden units of the gate MLP (0: linear)")
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
        args.static_epochs, args.skip_epochs, args.repeats, args.singles = 1, 1, 5, 4
        args.policy_epochs, args.joint_epochs = 1, 1
    torch.set_flush_denormal(True)
    retain_freed_memory()      # large activations reused, not page-faulted in again per call

    t0 = time.perf_counter()
    rows, ctx = part_a(args)
    print(f"\n(a) ScaledMNIST canvas 32, test split; training {time.perf_counter() - t0:.0f}s with "
          f"{args.train_threads} thread(s)\n")
    print("| model | budget | test acc | mean MACs (M) | fraction of static | train s | patterns | mixed blocks "
          "| block run rates |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rates = " ".join(f"{v:.2f}" for v in r.get("rates") or []) or "-"
        print(f"| {r['model']} | {r['budget']} | {r['acc']:.4f} | {r['macs'] / 1e6:.3f} | {r['frac']:.3f} | "
              f"{r['secs']:.0f} | {r.get('patterns', '-')} | {r.get('mixed', '-')} | {rates} |")
    if args.skip_timing:
        return

    torch.set_num_threads(args.threads)
    test_set = ctx["test_set"]
    x = torch.stack([test_set[i][0] for i in range(64)])
    timing = []
    for (family, b), model in ctx["models"].items():
        timing += speed(f"{family}_resnet{args.depth}_cifar budget {b} (trained)", model, x, args)
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
