"""Latency of dyncnn's mobile backbones against torchvision's, eager and ONNX Runtime, batch 1 and 32.

Both models of a pair are measured in the same process with the same thread count, in ``--rounds`` alternating
rounds (ours first, then torchvision first, ...); each keeps its round with the lowest median, since load from
other processes only ever adds time. Where the layouts are the same, torchvision's weights are copied into ours
so that both compute the same numbers. Prints a markdown table. Takes a few minutes on 2 cores.

    python benchmarks/bench_zoo_vs_torchvision.py [--threads 2] [--min-time 0.5] [--rounds 2] [--models NAME ...]
"""
from __future__ import annotations

import argparse
import platform

import torch
import torchvision

import dyncnn
from dyncnn.profile import LatencyStats, measure_latency

PAIRS = [("mobilenet_v2", "mobilenet_v2"), ("mobilenet_v3_large", "mobilenet_v3_large"),
         ("mobilenet_v3_small", "mobilenet_v3_small")]
# Our ShuffleNetV2 follows the paper's stride-2 unit, torchvision's does not: compared, but not the same layout.
LAYOUT_NOTES = {"shufflenet_v2_x1_0": "layout differs (paper vs torchvision stride-2 unit)"}


def fmt(s: LatencyStats) -> str:
    return f"{s.median_ms:.2f} ± {s.spread_ms:.2f}"


def copy_weights_if_same_layout(src: torch.nn.Module, dst: torch.nn.Module) -> bool:
    """Load ``src``'s state into ``dst`` entry by entry when every shape agrees; returns whether it did."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    if len(src_sd) != len(dst_sd) or any(a.shape != b.shape for a, b in zip(src_sd.values(), dst_sd.values())):
        return False
    dst.load_state_dict(dict(zip(dst_sd, src_sd.values())))
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds; the best is kept")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--models", nargs="+", default=None, help="only these of the pairs (default: all)")
    args = ap.parse_args()

    pairs = list(PAIRS)
    if dyncnn.list_models("shufflenet_v2_x1_0"):
        pairs.append(("shufflenet_v2_x1_0", "shufflenet_v2_x1_0"))
    if args.models:
        pairs = [p for p in pairs if p[0] in args.models]
    x = torch.randn(1, 3, args.size, args.size)
    rows, notes = [], {}
    for ours_name, tv_name in pairs:
        torch.manual_seed(0)
        models = {"ours": dyncnn.create_model(ours_name), "tv": getattr(torchvision.models, tv_name)()}
        same = copy_weights_if_same_layout(models["tv"], models["ours"])
        notes[ours_name] = LAYOUT_NOTES.get(ours_name, "same layout, same weights" if same else "")
        for backend in ("eager", "onnxruntime"):
            best: dict[tuple[str, int], LatencyStats] = {}
            for r in range(args.rounds):
                for key in (("ours", "tv") if r % 2 == 0 else ("tv", "ours")):
                    # Large batches stop at the min_runs floor inside the time budget, batch 1 runs many times.
                    got = measure_latency(models[key], x, batch_sizes=args.batches, threads=args.threads,
                                          backend=backend, warmup=2, min_runs=3, min_time_s=args.min_time)
                    for b, st in got.items():
                        if (key, b) not in best or st.median_ms < best[key, b].median_ms:
                            best[key, b] = st
            for b in args.batches:
                rows.append((ours_name, backend, b, best["ours", b], best["tv", b]))
            print(f"# done {ours_name} {backend}", flush=True)

    print(f"\ntorch {torch.__version__}, torchvision {torchvision.__version__}, {platform.processor() or 'cpu'}, "
          f"{args.threads} threads, input {args.size}x{args.size}; median ms ± IQR (best of {args.rounds} rounds); "
          f"ratio = ours / torchvision\n")
    print("| model | backend | batch | ours (ms) | torchvision (ms) | ratio | note |")
    print("|---|---|---|---|---|---|---|")
    for name, backend, b, o, t in rows:
        print(f"| {name} | {backend} | {b} | {fmt(o)} | {fmt(t)} | {o.median_ms / t.median_ms:.2f} | "
              f"{notes[name]} |")


if __name__ == "__main__":
    main()
