"""Channel gating (dynamic width) on ScaledMNIST: accuracy against mean MACs, and realized against MAC speedup.

(a) A static tiny ResNet-20 (``--depth 14``: ResNet-14; CIFAR layout, 8/16/32 channels, 1 input channel) is trained
on ScaledMNIST (canvas 32, the embedded real digits at random scale and position); its weights initialise
``channel_gated_resnet20_tiny`` at each budget, which is fine-tuned with the budget loss (as the channel-gating
papers do; its target ramps from 1 down to the budget over the first ``--budget-ramp`` of fine-tuning) and with
distillation from the static model's logits (``--distill`` weight), then evaluated with
executed inference (``evaluate_dynamic``: the MACs are those that ran). The static model is fine-tuned for the
same number of epochs at the same learning rate, so that both rows had the same training. After fine-tuning, the
gated models' BatchNorm statistics are re-estimated under their thresholded decisions (``recalibrate_norms``).
(b) Wall-clock time of ``infer`` of the budget-0.5 model on test images against the same model with every gate
forced on (same process, eager PyTorch, fixed threads, denormals flushed), at batch 64 and at batch 1 (64 single
samples), as realized speedup = forced-on time / gated time beside MAC speedup. A width-1.0 ResNet-32 (3x32x32)
with forced levels separates the limits: every sample at the same level (no gather/scatter) vs a random mix.

``--optimize`` times the models of (b) after ``optimize_for_inference``; ``--narrow-convs`` prints only the table of
3x3 convolutions with all and with half of their output channels that bounds (b) on narrow networks.

    python benchmarks/bench_channel_gating.py [--quick] [--train-threads 1] [--threads 2] [--optimize]
    python benchmarks/bench_channel_gating.py --narrow-convs
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import dyncnn
from dyncnn.data import ScaledMNIST
from dyncnn.dynamic.evaluation import evaluate_dynamic
from dyncnn.dynamic.width import recalibrate_norms
from dyncnn.layers.fusion import optimize_for_inference
from dyncnn.models.resnet import resnet_cifar
from dyncnn.profile.latency import median_ms, retain_freed_memory


DEPTHS = {14: "channel_gated_resnet14_tiny", 20: "channel_gated_resnet20_tiny"}


def static_backbone(depth: int):
    return resnet_cifar(depth, in_chans=1, width_mult=0.5)


def train(model, data, epochs: int, lr: float, seed: int = 0, log: str = "", gate_lr_mult: float = 20.0) -> None:
    """AdamW + one-cycle; the gated model's cost term and temperature schedule as the Trainer applies them. The
    gates learn ``gate_lr_mult`` times faster than the pretrained backbone (they start from scratch)."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=g, drop_last=True)
    gates = list(model.gates.parameters()) if hasattr(model, "gates") else []
    others = [p for p in model.parameters() if all(p is not q for q in gates)]
    groups = [{"params": others, "lr": lr}] + ([{"params": gates, "lr": lr * gate_lr_mult}] if gates else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=5e-4)
    total, step = epochs * len(loader), 0
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in groups], total_steps=total, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        fracs = []
        for x, y in loader:
            if hasattr(model, "set_progress"):
                model.set_progress(step / total)
            out = model(x)
            loss = model.training_loss(out, y) if hasattr(model, "training_loss") else F.cross_entropy(out, y)
            if hasattr(model, "regularization_loss"):
                loss = loss + model.regularization_loss()
                fracs.append(model.mac_fraction())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        if log:
            extra = f", train MAC fraction {statistics.mean(fracs):.2f}" if fracs else ""
            print(f"  [{log}] epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}{extra}", flush=True)


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=256))
    return correct / len(data)


def timed(fn, repeats: int) -> float:
    return median_ms(fn, repeats)


def latency_rows(label: str, model, x, levels=None, repeats: int = 15, optimize: bool = False) -> list[dict]:
    model.eval()
    if optimize:
        model = optimize_for_inference(model)
    res = model.infer(x, levels)
    model.force(True)
    full = model.infer(x)
    mac_speedup = float(full.macs.double().mean() / res.macs.double().mean())
    lv = res.choices.view(len(x), len(model.gates), model.groups).sum(2)
    distinct = statistics.mean(len(lv[:, b].unique()) for b in range(lv.shape[1]))
    rows = []
    for batch in (64, 1):
        def run(force, lv=levels):
            model.force(force)
            if batch == 64:
                return lambda: model.infer(x, lv if not force else None)
            singles = [x[i:i + 1] for i in range(len(x))]
            lvs = [None if (lv is None or force) else lv[i:i + 1] for i in range(len(x))]
            return lambda: [model.infer(s, v) for s, v in zip(singles, lvs)]
        reps = repeats if batch == 64 else max(3, repeats // 3)
        t_full = timed(run(True), reps)
        t_dyn = timed(run(None), reps)
        realized = t_full / t_dyn
        rows.append({"model": label, "batch": batch, "levels_per_block": distinct if batch == 64 else 1.0,
                     "mac_speedup": mac_speedup, "full_ms": t_full, "gated_ms": t_dyn, "realized": realized,
                     "ratio": realized / mac_speedup})
    model.force(None)
    return rows


def narrow_conv_rows(repeats: int = 200) -> list[str]:
    """What bounds channel gating on narrow networks: a 3x3 convolution with all its output channels and with half
    of them (the first convolution of a gated block at level 2 of 4: half the MACs), the cut weight a dense copy
    as LevelStage makes it."""
    rows = ["| batch | channels | map | all outputs us | half the outputs us | time ratio (MAC ratio 0.5) |",
            "|---|---|---|---|---|---|"]
    for n, c, s in ((1, 8, 32), (1, 16, 16), (1, 32, 8), (64, 8, 32), (64, 16, 16), (64, 32, 8)):
        x = torch.randn(n, c, s, s)
        w = torch.randn(c, c, 3, 3)
        wh = w[:c // 2].contiguous()
        reps = repeats if n == 1 else max(10, repeats // 10)
        full = median_ms(lambda: F.conv2d(x, w, padding=1), reps)
        half = median_ms(lambda: F.conv2d(x, wh, padding=1), reps)
        rows.append(f"| {n} | {c} | {s}x{s} | {full * 1e3:.1f} | {half * 1e3:.1f} | {half / full:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 epoch each, fewer timing repeats (smoke run)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.75, 0.5])
    ap.add_argument("--static-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--cost-weight", type=float, default=100.0)
    ap.add_argument("--bounds-weight", type=float, default=0.0, help="weight of the per-block bounds loss")
    ap.add_argument("--depth", type=int, default=20, choices=sorted(DEPTHS), help="ResNet depth (width 0.5)")
    ap.add_argument("--distill", type=float, default=0.7, help="weight of distillation from the static model")
    ap.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    ap.add_argument("--budget-ramp", type=float, default=0.3,
                    help="fraction of fine-tuning over which the budget target falls from 1 to the budget")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--no-latency", action="store_true", help="part (a) only")
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="threads for the latency measurement")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--narrow-convs", action="store_true", help="only the table of narrow 3x3 convolutions with "
                    "all and half of their outputs (what bounds gating on tiny networks)")
    ap.add_argument("--optimize", action="store_true", help="time the models after optimize_for_inference "
                    "(BatchNorm folded, channels-last weights)")
    ap.add_argument("--cache", default="", help="folder to save trained weights to / load them from (reruns "
                                                "of the timing part skip training)")
    args = ap.parse_args()
    if args.quick:
        args.static_epochs, args.finetune_epochs, args.repeats = 1, 1, 5
    torch.set_flush_denormal(True)
    retain_freed_memory()      # large activations reused, not page-faulted in again per call
    if args.narrow_convs:
        torch.set_num_threads(args.threads)
        print(f"## 3x3 convolutions with all and with half of their outputs, eager PyTorch, {args.threads} threads\n")
        print("\n".join(narrow_conv_rows()))
        return
    torch.manual_seed(0)
    torch.set_num_threads(args.train_threads)
    t_start = time.perf_counter()
    train_set, test_set = ScaledMNIST("train", canvas=32), ScaledMNIST("test", canvas=32)

    cache = Path(args.cache) if args.cache else None

    def trained(name: str, model, fit) -> None:
        """Train ``model`` with ``fit()``, or load it from ``--cache`` when a previous run saved it there."""
        path = cache / f"{name}.pt" if cache else None
        if path is not None and path.exists():
            model.load_state_dict(torch.load(path))
            print(f"  [{name}] loaded from {path}", flush=True)
            return
        fit()
        if path is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)

    static = static_backbone(args.depth)
    trained(f"static{args.depth}", static, lambda: train(static, train_set, args.static_epochs, 3e-3, log="static"))
    static_state = {k: v.clone() for k, v in static.state_dict().items()}
    x1 = test_set[0][0].unsqueeze(0)
    static_macs = dyncnn.count_macs(static, x1).total
    name = DEPTHS[args.depth]
    results = [(f"static ResNet-{args.depth} (8/16/32)", accuracy(static, test_set), static_macs, static_macs, "-")]
    tuned = static_backbone(args.depth)
    tuned.load_state_dict(static_state)
    trained(f"static{args.depth}_tuned", tuned, lambda: train(tuned, train_set, args.finetune_epochs, args.finetune_lr,
                                                 log="static fine-tune"))
    results.append((f"static, fine-tuned {args.finetune_epochs} more epochs", accuracy(tuned, test_set),
                    static_macs, static_macs, "-"))
    gated_models = {}
    for budget in args.budgets:
        model = dyncnn.create_model(name, budget=budget, groups=args.groups, cost_weight=args.cost_weight,
                                    bounds_weight=args.bounds_weight, budget_ramp=args.budget_ramp)
        model.backbone.load_state_dict(static_state)
        if args.distill > 0:     # the static model (before its extra epochs) as teacher
            model.set_teacher(static, args.distill, args.temperature)

        def fit():
            train(model, train_set, args.finetune_epochs, args.finetune_lr, log=f"gated {budget}")
            # running statistics under the thresholded decisions (fine-tuning saw noisy widths)
            recalibrate_norms(model, DataLoader(train_set, batch_size=256))
        trained(f"gated{args.depth}_{budget}", model, fit)
        rep = evaluate_dynamic(model, test_set)
        lv = torch.tensor(rep["choice_rate"]).view(len(model.gates), model.groups).sum(1)
        results.append((f"{name}, budget {budget}", rep["accuracy"], rep["mean_macs"],
                        rep["full_macs"], " ".join(f"{v:.1f}" for v in lv.tolist())))
        gated_models[budget] = model
    train_min = (time.perf_counter() - t_start) / 60

    print(f"\n## (a) ScaledMNIST canvas 32, test set ({len(test_set)} digits), groups={args.groups}; "
          f"training {train_min:.1f} min on {args.train_threads} thread(s)\n")
    print("| model | top-1 | mean MACs | fraction of static | mean width level per block (of "
          f"{args.groups}) |\n|---|---|---|---|---|")
    for name, acc, macs, full, levels in results:
        print(f"| {name} | {acc:.2%} | {macs / 1e6:.3f}M | {macs / static_macs:.1%} | {levels} |")

    if args.no_latency:
        return
    torch.set_num_threads(args.threads)
    x = torch.stack([test_set[i][0] for i in range(64)])
    rows = []
    if 0.5 in gated_models:
        rows += latency_rows(f"tiny ResNet-{args.depth}, budget 0.5, learned decisions", gated_models[0.5], x,
                             repeats=args.repeats, optimize=args.optimize)
    torch.manual_seed(0)
    big = dyncnn.create_model("channel_gated_resnet32_cifar", groups=args.groups).eval()
    xb = torch.rand(64, 3, 32, 32)
    nb = len(big.gates)
    half = args.groups // 2
    rows += latency_rows(f"ResNet-32 (16/32/64), every sample at level {half}/{args.groups}", big, xb,
                         torch.full((64, nb), half, dtype=torch.long), args.repeats, args.optimize)
    mix = torch.randint(half - 1, half + 2, (64, nb)).clamp(1, args.groups)
    rows += latency_rows(f"ResNet-32, random levels {half - 1}..{half + 1} per sample", big, xb, mix, args.repeats,
                         args.optimize)
    print(f"\n## (b) realized vs MAC speedup of infer against the same model forced all-on "
          f"({args.threads} threads, eager{', optimize_for_inference' if args.optimize else ''}, median of "
          f"{args.repeats} runs)\n")
    print("| model | batch | distinct levels per block | MAC speedup | all-on ms | gated ms | realized | "
          "realized / MAC |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['levels_per_block']:.1f} | {r['mac_speedup']:.2f}x | "
              f"{r['full_ms']:.1f} | {r['gated_ms']:.1f} | {r['realized']:.2f}x | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
