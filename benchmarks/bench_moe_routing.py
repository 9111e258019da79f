"""Mixtures of experts and dynamic routing on ScaledMNIST, and the realized speedup of executed MoE dispatch.

(a) accuracy / params / mean MACs on the ScaledMNIST test split (canvas 32) of: the static backbone (ResNet-14 at
    width 0.5, ``--epochs``), MoE versions of it (E = 4 experts in each block of the last two stages, top-1 and
    top-2, and top-1 with half-width experts: the 50%-MAC point) and the routing super-network (path 0 of every
    cell = that ResNet) at several MAC budgets. Dynamic models marked "ft" start from the trained static network
    (MoE: sparse upcycling, every expert a copy of its block, top-1 with the straight-through gate; routing:
    ``load_backbone``) and are fine-tuned ``--ft-epochs`` at ``--ft-lr``; "scratch" rows train from random
    weights on the static schedule (they end far below the backbone: see the module docs). Single-threaded.
(b) realized wall-clock speedup of dispatch (each expert runs only on its samples, ``infer``) against the simulated
    MoE of published code (every expert on every sample, masked: ``forward_dense``), beside the MAC speedup
    (dense MACs / ledger MACs), at batch 64 and batch 1, with ``--threads`` threads (default 2); ``--optimize``
    times both after ``optimize_for_inference``.

    python benchmarks/bench_moe_routing.py [--quick] [--part a|b|ab] [--epochs 5] [--ft-epochs 3]
        [--route-ft-epochs 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from dyncnn.data import ScaledMNIST
from dyncnn.dynamic.evaluation import evaluate_dynamic
from dyncnn.layers.fusion import optimize_for_inference
from dyncnn.layers.moe import MoEConfig
from dyncnn.models import create_model
from dyncnn.models.moe import MoENetwork, backbone_units
from dyncnn.models.resnet import resnet_cifar
from dyncnn.profile.macs import count_macs
from dyncnn.train.trainer import TrainConfig, Trainer, evaluate
from dyncnn.profile.latency import median_ms, retain_freed_memory

ST = dict(straight_through=True)
FT_ROUTE = dict(cost_weight=16.0, noise_until=0.25, cost_warmup=0.1)   # short fine-tune: reach the budget early
MODELS = {   # label -> (registered name or None for the static ResNet, config, fine-tune from the static network)
    "static ResNet-14 w0.5": (None, {}, False),
    "MoE E=4 k=1 ft": ("moe_resnet_tiny", dict(num_experts=4, top_k=1, **ST), True),
    "MoE E=4 k=2 ft": ("moe_resnet_tiny", dict(num_experts=4, top_k=2), True),
    "MoE E=4 k=1 half-width ft": ("moe_resnet_tiny", dict(num_experts=4, top_k=1, expert_ratio=0.5, **ST), True),
    "routing budget 0.5 ft": ("routing_supernet_tiny", dict(budget=0.5, **FT_ROUTE), True),
    "routing budget 0.7 ft": ("routing_supernet_tiny", dict(budget=0.7, **FT_ROUTE), True),
    "routing budget 0.3 ft": ("routing_supernet_tiny", dict(budget=0.3, **FT_ROUTE), True),
    "MoE E=4 k=1 scratch": ("moe_resnet_tiny", dict(num_experts=4, top_k=1), False),
    "MoE E=4 k=1 half-width scratch": ("moe_resnet_tiny", dict(num_experts=4, top_k=1, expert_ratio=0.5), False),
    "routing budget 0.5 scratch": ("routing_supernet_tiny", dict(budget=0.5), False),
}
DEFAULT_MODELS = [k for k in MODELS if "scratch" not in k and "0.3" not in k]   # ~8 min on one thread


def build(name: str | None, cfg: dict, static=None):
    """The model of a row; with ``static`` (the trained static ResNet) the fine-tuning start described above."""
    if name is None:
        return resnet_cifar(14, num_classes=10, in_chans=1, width_mult=0.5)
    if static is None:
        return create_model(name, num_classes=10, **cfg)
    if name.startswith("routing"):
        return create_model(name, num_classes=10, **cfg).load_backbone(static)
    cfg = dict(cfg)
    ratio, k, st = cfg.pop("expert_ratio", 1.0), cfg.pop("top_k"), cfg.pop("straight_through", False)
    backbone = copy.deepcopy(static)
    blocks = [p for p, _ in backbone_units(backbone) if p.startswith(("stages.1.", "stages.2."))]
    return MoENetwork(backbone, blocks, MoEConfig(cfg.pop("num_experts"), k, straight_through=st),
                      expert_ratio=ratio, upcycle=True)


def part_a(args) -> dict:
    torch.set_num_threads(1)
    data = dict(canvas=args.canvas, min_scale=0.4, max_scale=0.9)
    train, val, test = (ScaledMNIST(s, **data) for s in ("train", "val", "test"))
    if args.quick:
        train = torch.utils.data.Subset(train, range(640))
    rows, trained = [], {}
    for label in args.models:
        name, cfg, ft = MODELS[label]
        if ft and "static ResNet-14 w0.5" not in trained:
            raise ValueError(f"{label!r} fine-tunes the static network: list 'static ResNet-14 w0.5' first")
        torch.manual_seed(0)
        model = build(name, cfg, trained["static ResNet-14 w0.5"] if ft else None)
        ft_epochs = args.route_ft_epochs if name and name.startswith("routing") else args.ft_epochs
        conf = TrainConfig(device="cpu", epochs=ft_epochs if ft else args.epochs, batch_size=64,
                           lr=args.ft_lr if ft else args.lr, optimizer="adamw", weight_decay=1e-4,
                           warmup_epochs=0.2 if ft else 0.5, progress=False)
        t0 = time.perf_counter()
        Trainer(model, train, val, conf).fit()
        seconds = time.perf_counter() - t0
        model.eval()
        x1 = test[0][0].unsqueeze(0)
        params = sum(p.numel() for p in model.parameters())
        if name is None:
            acc = evaluate(model, test)["acc"]
            macs = full = count_macs(model, x1).total
            choice = ""
        else:
            r = evaluate_dynamic(model, test)
            acc, macs, full = r["accuracy"], r["mean_macs"], r["full_macs"]
            rates = r["choice_rate"]
            choice = (f"path-0 rate {sum(rates) / len(rates):.2f}" if name.startswith("routing")
                      else f"expert use {min(rates):.2f}..{max(rates):.2f}")
            if name.startswith("routing"):   # choices are one-hot per cell: report the share of each path
                res = model.infer(torch.stack([test[i][0] for i in range(len(test))]))
                share = torch.bincount(model.paths_taken(res).flatten(), minlength=model.num_paths).double()
                choice = "paths " + "/".join(f"{v:.2f}" for v in (share / share.sum()).tolist())
        trained[label] = model
        print(f"trained {label}: {acc:.2%} in {seconds:.0f} s", flush=True)
        rows.append(dict(label=label, acc=acc, params=params, macs=macs, full=full, seconds=seconds, choice=choice))
    static = rows[0]
    print(f"\n(a) ScaledMNIST canvas {args.canvas}, test split ({len(test)} images), static {args.epochs} epochs "
          f"(lr {args.lr}), ft rows + {args.ft_epochs} epochs (routing {args.route_ft_epochs}, lr {args.ft_lr}), "
          f"1 thread\n")
    print("| model | top-1 | params | mean MACs | MACs vs static | MACs vs all experts/paths | choices | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['acc']:.2%} ({(r['acc'] - static['acc']) * 100:+.1f}) | {r['params'] / 1e3:.1f}K "
              f"| {r['macs'] / 1e6:.2f}M | {r['macs'] / static['macs']:.0%} | {r['macs'] / r['full']:.0%} "
              f"| {r['choice']} | {r['seconds']:.0f} |")
    return trained




def part_b(args, trained: dict) -> None:
    torch.set_num_threads(args.threads)
    configs = []
    if "MoE E=4 k=1 ft" in trained:
        configs.append(("moe_resnet_tiny E=4 k=1 (trained)", trained["MoE E=4 k=1 ft"], (1, args.canvas, args.canvas)))
    else:
        configs.append(("moe_resnet_tiny E=4 k=1", None, (1, args.canvas, args.canvas)))
    configs += [("moe_resnet32_cifar E=4 k=1", None, (3, 32, 32)),
                ("moe_mobilenet_v2 E=4 k=1 (64x64)", None, (3, 64, 64))]
    repeats = 5 if args.quick else 9
    print(f"\n(b) dispatch (infer) vs every expert on every sample (forward_dense), {args.threads} threads, "
          f"eager{', optimize_for_inference' if args.optimize else ''}, median of {repeats}\n")
    print("| model | batch | dense ms | dispatch ms | realized speedup | MAC speedup | realized / MAC |")
    print("|---|---|---|---|---|---|---|")
    for label, model, shape in configs:
        torch.manual_seed(0)
        if model is None:
            name = label.split()[0]
            model = create_model(name, num_classes=10, in_chans=shape[0], num_experts=4, top_k=1)
            for m in model.moe_layers():          # untrained: a random router spreads samples over experts
                torch.nn.init.normal_(m.router.fc.weight, 0.0, 1.0)
        model.eval()
        if args.optimize:
            model = optimize_for_inference(model)
        x = torch.rand(64, *shape)
        with torch.no_grad():
            mac_speedup = model.full_macs(x) / float(model.infer(x).macs.double().mean())
            for batch in (64, 1):
                if batch == 64:
                    dense = median_ms(lambda: model.forward_dense(x), repeats)
                    disp = median_ms(lambda: model.infer(x), repeats)
                else:
                    singles = [x[i:i + 1] for i in range(16)]
                    dense = median_ms(lambda: [model.forward_dense(s) for s in singles], repeats) / 16
                    disp = median_ms(lambda: [model.infer(s) for s in singles], repeats) / 16
                    mac_speedup = model.full_macs(x) / float(
                        torch.cat([model.infer(s).macs for s in singles]).double().mean())
                print(f"| {label} | {batch} | {dense:.2f} | {disp:.2f} | {dense / disp:.2f}x | {mac_speedup:.2f}x "
                      f"| {dense / disp / mac_speedup:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="640 training images, 1 epoch, fewer timing repeats")
    p.add_argument("--part", default="ab", choices=["a", "b", "ab"])
    p.add_argument("--optimize", action="store_true", help="(b): time the models after optimize_for_inference "
                   "(BatchNorm folded, channels-last weights)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--ft-lr", type=float, default=2e-3)
    p.add_argument("--route-ft-epochs", type=int, default=6,
                   help="fine-tuning epochs of the routing rows (3 leave them ~6 points below the backbone)")
    p.add_argument("--canvas", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS),
                   help="models of part (a); the static one first (the table compares against the first row)")
    args = p.parse_args()
    if args.quick:
        args.epochs = args.ft_epochs = args.route_ft_epochs = 1
    torch.set_flush_denormal(True)
    retain_freed_memory()      # large activations reused, not page-faulted in again per call
    trained = part_a(args) if "a" in args.part else {}
    if "b" in args.part:
        part_b(args, trained)


if __name__ == "__main__":
    main()
