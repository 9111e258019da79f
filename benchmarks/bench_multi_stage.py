"""Per-stage latency against MACs of the width-wise multi-stage network (``multi_stage``), and its full depth
against a tiny_mobilenet of the same full-depth MACs (issue 25: does reusing features pay in wall-clock time?).

The multi-stage network (default: the phone preset's size, 128x128, 1 channel): stage 1 is tiny-M on the 2x
downsampled image, stages 2 and 3 each add tiny-S's widths at full resolution, reading the kept features. For each
exit ``k``, the cost of a sample that leaves there (every sample of the batch forced out at ``k``: thresholds
``inf`` before ``k`` and ``-inf`` at ``k``): MACs, eager ``infer`` (``optimize_for_inference``) and the ONNX Runtime
bundle driver, batch 1 and batch 64, fixed threads. Beside it, a tiny_mobilenet whose widths are tiny-M's scaled
to the multi-stage network's full-depth MACs (eager forward and its static bundle). Timings are medians over
rounds that interleave every configuration (a change of machine load hits all alike); ``ms/MMAC`` is the latency
per million MACs, which is where a structure that costs more than its MACs shows.

    python benchmarks/bench_multi_stage.py [--threads 1] [--size 128] [--rounds 5] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path

import torch

import dyncnn
from dyncnn.dynamic import ExitPolicy
from dyncnn.export import export_bundle, load_bundle
from dyncnn.layers.fusion import optimize_for_inference
from dyncnn.profile.latency import median_ms, retain_freed_memory

TINY_S, TINY_M = [16, 48, 96, 192], [32, 96, 192, 384]


def matched_tiny(target_macs: int, size: int) -> tuple[list[int], int]:
    """tiny-M's widths scaled (bisection on the factor) to ``target_macs`` at ``size``: (widths, their MACs)."""
    x = torch.zeros(1, 1, size, size)

    def macs(f: float) -> tuple[list[int], int]:
        w = [max(1, round(c * f)) for c in TINY_M]
        return w, dyncnn.count_macs(dyncnn.create_model("tiny_mobilenet", in_chans=1, widths=w), x).total
    lo, hi = 0.25, 4.0
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if macs(mid)[1] < target_macs else (lo, mid)
    return macs(math.sqrt(lo * hi))


def forced_exit(k: int, num_exits: int) -> ExitPolicy:
    return ExitPolicy([math.inf] * k + [-math.inf] * (num_exits - 1 - k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="calls per configuration and round (batch 1: x10)")
    ap.add_argument("--widths", default=None, help="JSON list of per-stage widths (default: [tiny-M, tiny-S, tiny-S])")
    ap.add_argument("--resolutions", default="[2, 1, 1]", help="JSON list of per-stage downsampling factors")
    args = ap.parse_args()
    widths = json.loads(args.widths) if args.widths else [TINY_M, TINY_S, TINY_S]
    resolutions = json.loads(args.resolutions)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    retain_freed_memory()
    torch.manual_seed(0)
    net = dyncnn.create_model("multi_stage", num_classes=10, in_chans=1, widths=widths,
                              resolutions=resolutions).eval()
    shape = (1, args.size, args.size)
    cum = net.exit_macs(torch.zeros(1, *shape))
    tiny_w, tiny_macs = matched_tiny(cum[-1], args.size)
    tiny = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=tiny_w).eval()
    fast_net, fast_tiny = optimize_for_inference(net), optimize_for_inference(tiny)
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.rand(b, *shape, generator=g) for b in (1, 64)}
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(net, Path(tmp) / "ms", shape)
        export_bundle(tiny, Path(tmp) / "tiny", shape)
        ms_bundle = load_bundle(Path(tmp) / "ms", threads=args.threads)
        tiny_bundle = load_bundle(Path(tmp) / "tiny", threads=args.threads)
        calls = {}
        for b, x in xs.items():
            xn = x.numpy()
            for k in range(net.num_exits):
                p = forced_exit(k, net.num_exits)
                calls[("ms", k, "eager", b)] = lambda x=x, p=p: fast_net.infer(x, p)
                calls[("ms", k, "ort", b)] = lambda xn=xn, p=p: ms_bundle.run_numpy(xn, p)
            calls[("tiny", 0, "eager", b)] = lambda x=x: fast_tiny(x)
            calls[("tiny", 0, "ort", b)] = lambda xn=xn: tiny_bundle.run_numpy(xn)
        times: dict[tuple, list[float]] = {key: [] for key in calls}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for key, fn in calls.items():
                    times[key].append(median_ms(fn, args.repeats * (10 if key[3] == 1 else 1)))
    ms = {key: statistics.median(v) for key, v in times.items()}
    print(f"\nmulti_stage widths={widths} resolutions={resolutions} at {args.size}x{args.size}, vs tiny_mobilenet "
          f"widths={tiny_w} ({tiny_macs / 1e6:.2f}M MACs); {args.threads} thread(s), median of {args.rounds} "
          f"interleaved rounds, ms per call; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          f"CPUs (eager timings suffer most from a busy machine)\n")
    print("| model | leaves at | MACs (M) | share of full | eager b1 | ORT b1 | ORT b1 ms/MMAC | eager b64 / sample "
          "| ORT b64 / sample | ORT b64 ms/MMAC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in range(net.num_exits):
        m = cum[k] / 1e6
        print(f"| multi_stage | exit {k} | {m:.2f} | {cum[k] / cum[-1]:.0%} | {ms[('ms', k, 'eager', 1)]:.3f} | "
              f"{ms[('ms', k, 'ort', 1)]:.3f} | {ms[('ms', k, 'ort', 1)] / m:.4f} | "
              f"{ms[('ms', k, 'eager', 64)] / 64:.3f} | {ms[('ms', k, 'ort', 64)] / 64:.3f} | "
              f"{ms[('ms', k, 'ort', 64)] / 64 / m:.4f} |")
    m = tiny_macs / 1e6
    print(f"| tiny_mobilenet (same MACs) | - | {m:.2f} | {tiny_macs / cum[-1]:.0%} | {ms[('tiny', 0, 'eager', 1)]:.3f} | "
          f"{ms[('tiny', 0, 'ort', 1)]:.3f} | {ms[('tiny', 0, 'ort', 1)] / m:.4f} | "
          f"{ms[('tiny', 0, 'eager', 64)] / 64:.3f} | {ms[('tiny', 0, 'ort', 64)] / 64:.3f} | "
          f"{ms[('tiny', 0, 'ort', 64)] / 64 / m:.4f} |")
    last = net.num_exits - 1
    for b in (1, 64):
        print(f"\nbatch {b}: full-depth multi_stage / same-MACs tiny_mobilenet latency: ORT "
              f"{ms[('ms', last, 'ort', b)] / ms[('tiny', 0, 'ort', b)]:.2f}x, eager "
              f"{ms[('ms', last, 'eager', b)] / ms[('tiny', 0, 'eager', b)]:.2f}x (MACs "
              f"{cum[-1] / tiny_macs:.2f}x); exit 0 costs {cum[0] / cum[-1]:.0%} of the MACs and "
              f"{ms[('ms', 0, 'ort', b)] / ms[('ms', last, 'ort', b)]:.0%} of the ORT time of full depth")


if __name__ == "__main__":
    main()
