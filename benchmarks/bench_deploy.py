"""Deployment benchmark (issue: ONNX export, the ONNX Runtime driver with exits, quantization, latency).

Three tables, all in one process with a fixed ONNX Runtime / PyTorch thread count:

A. **Static speed target.** Our MobileNetV2 / V3-Large / V3-Small / ShuffleNetV2 against torchvision's same
   models, both exported the same way (``export_bundle``: TorchScript exporter, opset 17) and run in ONNX
   Runtime on 224x224 inputs (random weights: speed does not depend on them). The two are timed in alternating
   rounds so that machine load hits both alike; target: ours no slower, within the spread (our median at most
   torchvision's 75th percentile).
B. **Static model, FP32 vs INT8.** A small static network (the demo's ``tiny_mobilenet``) trained as the demo
   trains it (ScaledMNIST 64x64 with clutter, 5 epochs), exported, quantized on 256 validation images;
   accuracy on the test split and latency (eager, ONNX Runtime FP32 / INT8; batch 1 and 64).
C. **Dynamic model.** The demo's small MSDNet trained the same way, thresholds calibrated on the validation split
   for half of the full-depth MACs, exported as a bundle (+ INT8): accuracy, latency with the policy and forced to
   full depth, realized speedup at batch 1 beside the MAC speedup (target: at least 0.85 of it kept), and the
   driver's own overhead in a full-depth batch-1 call (target: under 5%). ``--timing-model`` adds the same
   measurement for the full ``msdnet_cifar`` (7 exits, 32x32) with random weights and spread thresholds.
D. **ExecuTorch vs ONNX Runtime.** Our MobileNetV2 / V3-Large / V3-Small / ShuffleNetV2 (224x224, random
   weights) exported as FP32 bundles for both runtimes (ExecuTorch: lowered to XNNPACK) and timed in alternating
   rounds in one process; target: ExecuTorch within 1.1x of ONNX Runtime or faster at batch 1. Tables B and C
   also get ExecuTorch rows (``--runtimes``, default both when ExecuTorch is installed).

    python benchmarks/bench_deploy.py [--threads 1] [--epochs 5] [--min-time 1.0] [--timing-model] [--json out.json]
                                      [--skip A B C D] [--runtimes onnxruntime executorch]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from collections import Counter

import numpy as np
import onnx
import torch

import dyncnn
from dyncnn.data import ScaledMNIST
from dyncnn.dynamic.calibration import calibrate
from dyncnn.dynamic.losses import MultiExitLoss
from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.export import export_bundle, load_bundle
from dyncnn.export.bench import bench_model, format_table
from dyncnn.profile.latency import retain_freed_memory, time_callable
from dyncnn.train import TrainConfig, Trainer

PAIRS = [("mobilenet_v2", "torchvision:mobilenet_v2"), ("mobilenet_v3_large", "torchvision:mobilenet_v3_large"),
         ("mobilenet_v3_small", "torchvision:mobilenet_v3_small"),
         ("shufflenet_v2", "torchvision:shufflenet_v2_x1_0")]
STATIC = {"name": "tiny_mobilenet", "cfg": {"widths": [32, 96, 192, 384]}}
DYNAMIC = {"name": "msdnet_cifar", "cfg": {"data": "imagenet", "nBlocks": 5, "step": 1, "base": 1, "nChannels": 8,
                                           "growthRate": 6, "grFactor": [1, 2, 4], "bnFactor": [1, 2, 4]}}


def _q(times):
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[0], q[2]


def static_pairs(threads: int, batches, rounds: int, min_time: float, tmp: Path) -> list[dict]:
    rows = []
    for ours, theirs in PAIRS:
        sessions, ops = {}, {}
        for label, name in (("ours", ours), ("torchvision", theirs)):
            torch.manual_seed(0)
            model = dyncnn.create_model(name).eval()
            folder = tmp / label / name.replace(":", "_")
            export_bundle(model, folder, (3, 224, 224))
            sessions[label] = load_bundle(folder, threads=threads)
            ops[label] = Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
            times = {"ours": [], "torchvision": []}
            for _ in range(rounds):                     # alternate, so that load changes hit both
                for label, sess in sessions.items():
                    times[label] += time_callable(lambda: sess.run_numpy(x), warmup=2, min_runs=5,
                                                  min_time_s=min_time / rounds)
            (om, o25, o75), (tm, t25, t75) = _q(times["ours"]), _q(times["torchvision"])
            rows.append({"model": ours, "batch": b, "ours_ms": om, "ours_iqr": o75 - o25, "tv_ms": tm,
                         "tv_iqr": t75 - t25, "ratio": om / tm, "ok": om <= t75,
                         "same_ops": ops["ours"] == ops["torchvision"]})
            print(f"  {ours} b{b}: ours {om:.2f} ms, torchvision {tm:.2f} ms", file=sys.stderr)
    return rows


def runtime_pairs(threads: int, batches, rounds: int, min_time: float, tmp: Path,
                  models=tuple(ours for ours, _ in PAIRS)) -> list[dict]:
    """D: each model as an ONNX Runtime and an ExecuTorch FP32 bundle, timed in alternating rounds. Our models (whose
    parameter counts equal torchvision's, table A): torchvision's ShuffleNetV2 splits channels with chunk(), which
    XNNPACK plans at the export batch, so its ExecuTorch program fails at another batch size."""
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = dyncnn.create_model(name).eval()
        bundles = {}
        for rt in ("onnxruntime", "executorch"):
            folder = tmp / rt / name.replace(":", "_")
            export_bundle(model, folder, (3, 224, 224), runtime=rt, max_batch=max(max(batches), 2))
            bundles[rt] = load_bundle(folder, threads=threads)
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
            times = {rt: [] for rt in bundles}
            for _ in range(rounds):                     # alternate, so that load changes hit both
                for rt, bundle in bundles.items():
                    times[rt] += time_callable(lambda: bundle.run_numpy(x), warmup=2, min_runs=5,
                                               min_time_s=min_time / rounds)
            (om, o25, o75), (em, e25, e75) = _q(times["onnxruntime"]), _q(times["executorch"])
            rows.append({"model": name, "batch": b, "ort_ms": om, "ort_iqr": o75 - o25, "et_ms": em,
                         "et_iqr": e75 - e25, "ratio": em / om, "ok": em <= 1.1 * om})
            print(f"  {name} b{b}: ExecuTorch {em:.2f} ms, ONNX Runtime {om:.2f} ms", file=sys.stderr)
    return rows


def runtime_table(rows) -> str:
    out = ["| model | batch | ONNX Runtime ms (IQR) | ExecuTorch XNNPACK ms (IQR) | ExecuTorch / ORT | within 1.1x |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {r['ort_ms']:.2f} ({r['ort_iqr']:.2f}) | {r['et_ms']:.2f} "
                   f"({r['et_iqr']:.2f}) | {r['ratio']:.2f} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out)


def _data():
    """The demo's data: ScaledMNIST 64x64 with clutter 2, each training digit rendered three times."""
    sets = {s: ScaledMNIST(s, canvas=64, clutter=2, repeats=3 if s == "train" else 1) for s in ("train", "val", "test")}
    xs = {s: torch.stack([d[i][0] for i in range(len(d))]) for s, d in sets.items()}
    return sets, xs


def _train(spec, sets, epochs, multi_exit, out: Path):
    torch.manual_seed(0)
    model = dyncnn.create_model(spec["name"], num_classes=10, in_chans=1, **spec["cfg"])
    cfg = TrainConfig(device="cpu", epochs=epochs, batch_size=64, lr=0.1, label_smoothing=0.05, warmup_epochs=0.2,
                      progress=False)
    Trainer(model, sets["train"], sets["val"], cfg, out_dir=out, loss_fn=MultiExitLoss() if multi_exit else None
            ).fit()
    return model.eval()


def _spread_policy(model, x) -> ExitPolicy:
    with torch.no_grad():
        outs = model(x)
    left, thr = torch.ones(len(x), dtype=torch.bool), []
    for k, o in enumerate(outs[:-1]):
        conf = torch.softmax(o, 1).max(1).values
        t = float(torch.quantile(conf[left].double(), 1 - 1 / (len(outs) - k)))
        thr.append(t)
        left &= conf < t
    return ExitPolicy(thr)


def static_table(rows) -> str:
    out = ["| model | batch | ours ms (IQR) | torchvision ms (IQR) | ours / torchvision | no slower (within spread) "
           "| same ONNX op counts |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {r['ours_ms']:.2f} ({r['ours_iqr']:.2f}) | {r['tv_ms']:.2f} "
                   f"({r['tv_iqr']:.2f}) | {r['ratio']:.2f} | {'yes' if r['ok'] else 'NO'} | "
                   f"{'yes' if r['same_ops'] else 'no'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per point")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per static pair")
    ap.add_argument("--static-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--skip", nargs="*", default=[], choices=["A", "B", "C", "D"])
    ap.add_argument("--runtimes", nargs="+", default=None, choices=["onnxruntime", "executorch"],
                    help="bundle runtimes of tables B and C (default: both when ExecuTorch is installed)")
    ap.add_argument("--timing-model", action="store_true", help="also time the full msdnet_cifar bundle")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)     # as ONNX Runtime does; denormals would make eager timings erratic
    retain_freed_memory()      # large activations reused, not page-faulted in again per call
    result: dict = {"threads": args.threads, "torch": torch.__version__}
    import onnxruntime
    result["onnxruntime"] = onnxruntime.__version__
    from dyncnn.export.executorch import available, version
    runtimes = args.runtimes or (["onnxruntime"] + (["executorch"] if available() else []))
    if "executorch" in runtimes or "D" not in args.skip:
        result["executorch"] = version()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "A" not in args.skip:
            print("A. static: ours vs torchvision in ONNX Runtime", file=sys.stderr)
            rows = static_pairs(args.threads, args.static_batches, args.rounds, args.min_time, tmp)
            result["static_pairs"] = rows
            print(f"\n## A. Static models in ONNX Runtime, ours vs torchvision (224x224, {args.threads} thread(s))\n")
            print(static_table(rows))
        if {"B", "C"} - set(args.skip):
            t0 = time.time()
            sets, xs = _data()
            print(f"data ready in {time.time() - t0:.0f}s", file=sys.stderr)
        if "B" not in args.skip:
            t0 = time.time()
            model = _train(STATIC, sets, args.epochs, False, tmp / "static")
            print(f"B. static model trained in {time.time() - t0:.0f}s", file=sys.stderr)
            r = bench_model(model, xs["test"], sets["test"].targets, threads=args.threads,
                            calibration=xs["val"][:256], min_time_s=args.min_time, runtimes=runtimes)
            result["static_int8"] = r
            print(f"\n## B. Static {STATIC['name']} {STATIC['cfg']} on ScaledMNIST 64x64, {args.epochs} epochs\n")
            print(format_table(r))
        if "C" not in args.skip:
            t0 = time.time()
            model = _train(DYNAMIC, sets, args.epochs, True, tmp / "dynamic")
            print(f"C. dynamic model trained in {time.time() - t0:.0f}s", file=sys.stderr)
            cum = model.exit_macs(xs["val"][:1])
            record = calibrate(model, sets["val"], target_macs=0.5 * cum[-1])
            policy = ExitPolicy(record["thresholds"], record["criterion"], record["temperatures"])
            r = bench_model(model, xs["test"], sets["test"].targets, policy=policy, threads=args.threads,
                            calibration=xs["val"][:256], min_time_s=args.min_time, single_images=64,
                            runtimes=runtimes)
            result["dynamic"] = r
            print(f"\n## C. Dynamic {DYNAMIC['name']} {DYNAMIC['cfg']} on ScaledMNIST 64x64, {args.epochs} epochs, "
                  f"thresholds for 50% of full-depth MACs (val)\n")
            print(format_table(r))
        if args.timing_model:
            torch.manual_seed(0)
            model = dyncnn.create_model("msdnet_cifar", num_classes=10).eval()
            x = torch.randn(256, 3, 32, 32)
            r = bench_model(model, x[128:], policy=_spread_policy(model, x[:128]), threads=args.threads,
                            calibration=x[:128], min_time_s=args.min_time, single_images=64, runtimes=runtimes)
            result["timing_model"] = r
            print("\n## C'. msdnet_cifar (7 exits, 32x32, random weights, thresholds spreading samples evenly)\n")
            print(format_table(r))
        if "D" not in args.skip:
            print("D. ExecuTorch vs ONNX Runtime", file=sys.stderr)
            rows = runtime_pairs(args.threads, [1], args.rounds, args.min_time, tmp)
            result["runtime_pairs"] = rows
            print(f"\n## D. ExecuTorch (XNNPACK) vs ONNX Runtime, FP32, 224x224, {args.threads} thread(s)\n")
            print(runtime_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")


if __name__ == "__main__":
    main()
