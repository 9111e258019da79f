"""Realized speedup of real early exit against the MAC speedup (issue: early exiting that really exits).

For each network, thresholds are set so that half of a batch leaves at the first exit and the other half runs
to the last one. We time ``infer`` with those thresholds and with full depth (same network, same inputs, same
process, eager PyTorch, fixed threads, denormals flushed), at batch 64 and at batch 1 (each of the 64 samples alone), and report
realized speedup = full latency / dynamic latency beside MAC speedup = full MACs / mean MACs (the ledger's).

Each network is timed as built ("plain") and after ``optimize_for_inference`` ("optimized": BatchNorm folded into
the convolutions, channels-last weights), which is how it would be deployed in eager PyTorch.

``--stages`` adds each stage's time at 64 and at 32 rows and the ratio an executor with no overhead would reach.

    python benchmarks/bench_early_exit.py [--threads 2] [--models msdnet_cifar ...] [--variants plain optimized]
                                          [--stages]
"""
from __future__ import annotations

import argparse

import torch

import dyncnn
from dyncnn.dynamic import ExitPolicy
from dyncnn.dynamic.executor import select_rows
from dyncnn.layers.fusion import optimize_for_inference
from dyncnn.profile.latency import median_ms, retain_freed_memory

CONFIGS = {
    "msdnet_cifar": dict(name="msdnet_cifar", kw={"num_classes": 10}, shape=(3, 32, 32)),
    "ranet_cifar": dict(name="ranet_cifar", kw={"num_classes": 10}, shape=(3, 32, 32)),
    "multi_exit(mobilenet_v2)": dict(name="multi_exit", kw={"backbone": "mobilenet_v2", "num_classes": 10,
                                                             "stages": ["stages.2", "stages.4"]},
                                     shape=(3, 96, 96)),
    "multi_exit(tiny_mobilenet, demo)": dict(name="multi_exit", kw={"backbone": "tiny_mobilenet", "num_classes": 10,
                                                                    "in_chans": 1,
                                                                    "backbone_cfg": {"widths": [12, 32, 96, 256, 384]}},
                                             shape=(1, 64, 64)),
}


def timed(fn, repeats: int) -> float:
    return median_ms(fn, repeats)


def bench(label: str, cfg: dict, repeats: int, variant: str) -> list[dict]:
    torch.manual_seed(0)
    net = dyncnn.create_model(cfg["name"], **cfg["kw"]).eval()
    x = torch.randn(64, *cfg["shape"])
    with torch.no_grad():
        first = torch.softmax(net(x)[0], 1).max(1).values
    half = ExitPolicy([float(first.median())] + [float("inf")] * (net.num_exits - 2))
    full = ExitPolicy.never(net.num_exits)
    if variant == "optimized":
        net = optimize_for_inference(net)
    res = net.infer(x, half)
    mac_speedup = float(net.infer(x, full).macs.double().mean() / res.macs.double().mean())
    rows = []
    for batch in (64, 1):
        if batch == 64:
            t_full = timed(lambda: net.infer(x, full), repeats)
            t_dyn = timed(lambda: net.infer(x, half), repeats)
        else:
            singles = [x[i:i + 1] for i in range(len(x))]
            t_full = timed(lambda: [net.infer(s, full) for s in singles], max(3, repeats // 4))
            t_dyn = timed(lambda: [net.infer(s, half) for s in singles], max(3, repeats // 4))
        realized = t_full / t_dyn
        rows.append({"model": label, "variant": variant, "batch": batch,
                     "exit_mix": torch.bincount(res.exit_index).tolist(),
                     "mac_speedup": mac_speedup, "full_ms": t_full, "dynamic_ms": t_dyn, "realized": realized,
                     "ratio": realized / mac_speedup})
    return rows


def _rows(state, n: int):
    return select_rows(state, slice(0, n))          # every tensor of a (multi-scale, dict) state


def stage_profile(label: str, cfg: dict, repeats: int) -> list[str]:
    """Each stage and exit head of the optimized network timed on the batch of 64 and on its first 32 rows, and
    the realized / MAC ratio an executor with no overhead of its own would reach when half the batch leaves at the
    first exit: the bound of the table above."""
    torch.manual_seed(0)
    net = optimize_for_inference(dyncnn.create_model(cfg["name"], **cfg["kw"]).eval())
    x = torch.randn(64, *cfg["shape"])
    cum = net.exit_macs(x[:1])
    rows, t64, t32 = [], [], []
    with torch.inference_mode():
        state = net.initial_state(x)
        for k, (stage, head) in enumerate(zip(net.stages, net.heads)):
            a, b = state, _rows(state, 32)
            state = stage(a)
            s64, s32 = median_ms(lambda: stage(a), repeats), median_ms(lambda: stage(b), repeats)
            o, o32 = state, _rows(state, 32)
            h64, h32 = median_ms(lambda: head(o), repeats), median_ms(lambda: head(o32), repeats)
            t64.append(s64 + h64)
            t32.append(s32 + h32)
            macs = cum[k] - (cum[k - 1] if k else 0)
            rows.append(f"| {label} | {k} | {macs / cum[-1]:.0%} | {s64:.3f} / {h64:.3f} | {s32:.3f} / {h32:.3f} | "
                        f"{(s32 + h32) / (s64 + h64):.2f} |")
    full, dyn = sum(t64), t64[0] + sum(t32[1:])
    mac = cum[-1] / (cum[0] + (cum[-1] - cum[0]) / 2)
    rows.append(f"| {label} | bound | first stage {t64[0] / full:.0%} of the time | full {full:.2f} | "
                f"half out at exit 0 {dyn:.2f} | **{full / dyn / mac:.2f}** |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--models", nargs="*", default=list(CONFIGS))
    ap.add_argument("--stages", action="store_true", help="also time each stage at 64 and 32 rows (the bound of the "
                    "batch-64 ratio with no executor overhead)")
    ap.add_argument("--release-memory", action="store_true",
                    help="keep glibc's default of unmapping large freed blocks (page faults on every call)")
    ap.add_argument("--variants", nargs="*", choices=("plain", "optimized"), default=["plain", "optimized"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Randomly initialised networks drift into denormal floats deep down, which x86 computes tens of times
    # slower; trained networks and ONNX Runtime do not pay that, so flush them to zero as deployment does.
    torch.set_flush_denormal(True)
    if not args.release_memory:
        retain_freed_memory()
    registered = set(dyncnn.list_models())
    rows = []
    for label in args.models:
        cfg = CONFIGS[label]
        if cfg["name"] not in registered:
            print(f"(skipping {label}: not registered)")
            continue
        for variant in args.variants:
            rows += bench(label, cfg, args.repeats, variant)
    print(f"\nreal early exit, half the batch at the first exit; eager PyTorch, {args.threads} threads; batch 1 = "
          f"the 64 samples one at a time (total ms)\n")
    print("| model | variant | batch | exits taken | full depth ms | dynamic ms | MAC speedup | realized speedup | "
          "realized / MAC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['exit_mix']} | {r['full_ms']:.1f} | {r['dynamic_ms']:.1f} | "
              f"{r['mac_speedup']:.2f}x | {r['realized']:.2f}x | {r['ratio']:.2f} |")
    if args.stages:
        print("\nper stage, optimized network, ms at 64 rows and at 32 (stage / exit head); bound = realized / MAC "
              "with half the batch out at the first exit and no executor overhead\n")
        print("| model | stage | share of MACs | 64 rows ms | 32 rows ms | 32 / 64 |\n|---|---|---|---|---|---|")
        for label in args.models:
            if CONFIGS[label]["name"] in registered:
                print("\n".join(stage_profile(label, CONFIGS[label], args.repeats * 3)))


if __name__ == "__main__":
    main()
