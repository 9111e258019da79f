"""Dynamic parameters (issue 7): what per-sample kernels cost, and what they buy on ScaledMNIST.

(a) Layer latency: CondConv / DyConv (routing + kernel aggregation + one batched convolution) against the static
    convolution of the same shape, at batch 1 and batch 32, eager PyTorch, fixed threads, denormals flushed.
    Shapes are those of the layers CondConv replaces in MobileNetV2 1.0 at 224 (its last blocks). Target <= 1.3x.
(b) ``--train``: each dynamic-parameter variant against its static backbone, trained the same way (same data,
    epochs, optimiser and seed) on ScaledMNIST (canvas 32): test accuracy, parameters, MACs, batch-1 latency.

    python benchmarks/bench_dynamic_params.py [--quick] [--threads 2] [--train [--epochs 3] [--pairs ...]]
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch import nn

from dyncnn.profile.latency import retain_freed_memory

# (label, in, out, kernel, groups, spatial): MobileNetV2 1.0 at 224, blocks 12-17 (the CondConv'd ones)
LAYERS = [
    ("pw expand 96->576 @14", 96, 576, 1, 1, 14),
    ("dw 3x3 576 @14", 576, 576, 3, 576, 14),
    ("pw project 576->96 @14", 576, 96, 1, 1, 14),
    ("pw expand 160->960 @7", 160, 960, 1, 1, 7),
    ("dw 3x3 960 @7", 960, 960, 3, 960, 7),
    ("pw project 960->320 @7", 960, 320, 1, 1, 7),
    ("dense 3x3 64->64 @28", 64, 64, 3, 1, 28),
]


def interleaved_medians(fns: list, repeats: int, warmup: int = 3) -> list[float]:
    """Median ms of each callable, the callables alternated run by run (drift and load hit them alike)."""
    for f in fns:
        for _ in range(warmup):
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, f in zip(times, fns):
            t0 = time.perf_counter()
            f()
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def bench_layers(batches: list[int], repeats: int, layers=LAYERS) -> list[dict]:
    from dyncnn.layers.dynamic_conv import CondConv2d, DynamicConv2d
    rows = []
    for label, cin, cout, k, g, hw in layers:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=g, bias=False).eval()
        variants = {"CondConv e4": CondConv2d.from_conv(conv, 4, copy_weights=False).eval(),
                    "CondConv e8": CondConv2d.from_conv(conv, 8, copy_weights=False).eval(),
                    "DyConv e4": DynamicConv2d.from_conv(conv, 4, copy_weights=False, tau=1.0).eval()}
        for b in batches:
            x = torch.randn(b, cin, hw, hw)
            with torch.inference_mode():
                fns = [lambda: conv(x)] + [lambda m=m: m(x) for m in variants.values()]
                t = interleaved_medians(fns, repeats)
            row = {"layer": label, "batch": b, "static_ms": t[0]}
            for (name, m), tm in zip(variants.items(), t[1:]):
                row[name] = tm / t[0]
                row[f"{name} macs"] = m.macs((hw, hw)) / (conv.weight.numel() * hw * hw)
            rows.append(row)
    return rows


# --- (b) training ------------------------------------------------------------------------------------------

def _v3_norm():
    # MobileNetV3 keeps ImageNet's BN momentum 0.01; in a few hundred steps its running statistics would not
    # settle, so both the static and the dynamic V3 use 0.1 here (same for both: a fair pair).
    return partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1)


# static backbone -> (its kwargs, dynamic variants)
PAIRS = {
    "mobilenet_v2": (dict(width_mult=0.5, drop_rate=0.0),
                     ["condconv_mobilenet_v2_e4", "condconv_mobilenet_v2_e8", "hyper_mobilenet_v2"]),
    "shufflenet_v2": (dict(width_mult=0.5), ["condconv_shufflenet_v2_e4", "condconv_shufflenet_v2_e8"]),
    "mobilenet_v3_small": (dict(width_mult=0.5, drop_rate=0.0, norm_layer=_v3_norm()),
                           ["dyconv_mobilenet_v3_small"]),
    "resnet18": (dict(width_mult=0.25), ["deform_resnet18"]),
    "tiny_mobilenet": (dict(widths=(16, 32, 64, 128)),
                       ["condconv_tiny_mobilenet_e4", "dyconv_tiny_mobilenet", "hyper_tiny_mobilenet"]),
}


def train_pairs(pairs: list[str], epochs: int, seed: int, canvas: int, threads: int, max_steps: int | None,
                lat_repeats: int) -> list[dict]:
    import dyncnn
    from dyncnn.data import ScaledMNIST
    from dyncnn.profile import count_macs
    from dyncnn.train import TrainConfig, Trainer, evaluate
    from torch.utils.data import Subset

    kw = dict(canvas=canvas, min_scale=0.5, max_scale=1.0)
    train_set, val_set, test_set = (ScaledMNIST(s, **kw) for s in ("train", "val", "test"))
    if max_steps:
        train_set = Subset(train_set, range(min(len(train_set), max_steps * 64)))
    x1 = test_set[0][0][None]
    rows, models = [], {}
    for static_name in pairs:
        cfg, variants = PAIRS[static_name]
        for name in [static_name] + variants:
            torch.manual_seed(seed)
            model = dyncnn.create_model(name, num_classes=10, in_chans=1, **cfg)
            tc = TrainConfig(device="cpu", epochs=epochs, batch_size=64, optimizer="adamw", lr=5e-3, weight_decay=1e-4,
                             warmup_epochs=0.1, seed=seed, progress=False)
            t0 = time.perf_counter()
            Trainer(model, train_set, val_set, tc).fit()
            train_s = time.perf_counter() - t0
            acc = evaluate(model.eval(), test_set)["acc"]
            report = count_macs(model, x1)
            models[name] = model
            rows.append({"model": name, "static": static_name, "acc": acc, "params": report.params,
                         "macs": report.total, "train_s": train_s})
            print(f"  {name}: acc {acc:.3f}, {report.params / 1e3:.1f}k params, {report.total / 1e6:.2f}M MACs, "
                  f"trained in {train_s:.0f} s", flush=True)
    # batch-1 latency, each variant interleaved with its static backbone in the same process
    torch.set_num_threads(threads)
    by_name = {r["model"]: r for r in rows}
    for static_name in pairs:
        names = [static_name] + PAIRS[static_name][1]
        with torch.inference_mode():
            times = interleaved_medians([lambda m=models[n]: m(x1) for n in names], lat_repeats)
        for n, t in zip(names, times):
            by_name[n]["latency_ms"] = t
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer layers and repeats; with --train, 40 steps")
    ap.add_argument("--train", action="store_true", help="also run (b), the ScaledMNIST training comparison")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--canvas", type=int, default=32)
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--skip-layers", action="store_true", help="only (b)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    retain_freed_memory()      # large activations reused, not page-faulted in again per call
    repeats = 8 if args.quick else args.repeats

    if not args.skip_layers:
        torch.set_num_threads(args.threads)
        rows = bench_layers([1, 32], repeats, LAYERS[:2] if args.quick else LAYERS)
        print(f"\n(a) layer latency / static nn.Conv2d latency, eager PyTorch, {args.threads} threads, median of "
              f"{repeats} interleaved runs; MACs ratio = (routing + aggregation + conv) / conv\n")
        print("| layer | batch | static ms | CondConv e4 | CondConv e8 | DyConv e4 | MACs e4 / e8 / DyConv e4 |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['batch']} | {r['static_ms']:.3f} | {r['CondConv e4']:.2f}x | "
                  f"{r['CondConv e8']:.2f}x | {r['DyConv e4']:.2f}x | {r['CondConv e4 macs']:.3f} / "
                  f"{r['CondConv e8 macs']:.3f} / {r['DyConv e4 macs']:.3f} |")

    if args.train:
        torch.set_num_threads(args.train_threads)
        rows = train_pairs(args.pairs, 1 if args.quick else args.epochs, args.seed, args.canvas, args.threads,
                           40 if args.quick else None, 10 if args.quick else args.repeats)
        static = {r["model"]: r for r in rows if r["model"] == r["static"]}
        epochs = 1 if args.quick else args.epochs
        print(f"\n(b) ScaledMNIST canvas {args.canvas} (digit 0.5-1.0 of the canvas), {epochs} epoch(s) AdamW, "
              f"seed {args.seed}, {args.train_threads} training thread(s); test accuracy on 1,000 digits; "
              f"MACs per image (FlopCounterMode); latency batch 1, eager, {args.threads} threads, interleaved "
              f"with the static backbone\n")
        print("| model | static backbone | test acc | params (k) | x static | MACs (M) | x static | "
              "latency ms | x static | train s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            s = static[r["static"]]
            print(f"| {r['model']} | {r['static']} | {r['acc']:.3f} | {r['params'] / 1e3:.1f} | "
                  f"{r['params'] / s['params']:.2f} | {r['macs'] / 1e6:.3f} | {r['macs'] / s['macs']:.3f} | "
                  f"{r['latency_ms']:.2f} | {r['latency_ms'] / s['latency_ms']:.2f} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
