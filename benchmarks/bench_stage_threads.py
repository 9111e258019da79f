"""Threads per stage against 1 and 2 threads for the whole bundle (issue 29): a multi-exit network whose stages grow
(tiny_mobilenet widths 16-48-96-192 at 128x128, four exits, random weights with batch-norm statistics of the
images) and the static tiny_mobilenet, exported as bundles; each stage's fastest thread count measured with
``measure_stage_threads`` (1 and 2 threads, batch 1 and 64) and, for the multi-exit bundle at batch 1, the plan
of counts that runs it fastest one image at a time under its exit policy (``measure_stage_plans``, paused as
below), and recorded; then the bundle loaded with ``threads=1``, ``threads=2`` (as ``load_bundle`` sets it: the
multi-exit bundle's pools stop spinning when a run ends, the static one's keep spinning), ``threads=2,
spin=True`` (every pool keeps spinning after its run, ONNX Runtime's default) and ``threads="per-stage"``, run
at full depth and with thresholds that spread the images over the exits, at batch 1 (one image per call) and 64.
In each round the modes take turns (order rotated between rounds), each with only its own sessions loaded. Each
case waits 0.2 s first, so that no pool spins on from the case before (as the frontier pauses every turn when it
times more than one thread count). Printed: median ms per image (IQR over rounds) and, paired per round, the
ratio of per-stage to the better of 1 and 2 threads (below 1: per stage is faster).

    python benchmarks/bench_stage_threads.py [--rounds 10] [--images 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dyncnn
from bench_deploy import _spread_policy        # thresholds that send a share of the images to each exit
from dyncnn.export import export_bundle, load_bundle
from dyncnn.export.runtime import measure_stage_plans, measure_stage_threads, record_stage_threads
from dyncnn.frontier.runner import SETTLE_S

WIDTHS = [16, 48, 96, 192]
MODES = {1: (1, None), 2: (2, None), "2 spin": (2, True), "per-stage": ("per-stage", None)}   # threads, spin


def _q(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return statistics.median(v), q[0], q[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--images", type=int, default=64, help="images per round at batch 1; also the larger batch")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    images = np.random.default_rng(0).random((max(args.images, 64), 1, args.size, args.size), dtype=np.float32)
    torch.manual_seed(0)
    dyn = dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1,
                              backbone_cfg={"widths": WIDTHS})
    for m in dyn.modules():      # batch-norm statistics of the images (momentum 1: the last batch's)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        dyn.train()(torch.from_numpy(images))
    dyn.eval()
    static = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=WIDTHS).eval()
    policy = _spread_policy(dyn, torch.from_numpy(images))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"multi-exit": Path(tmp) / "dyn", "static": Path(tmp) / "static"}
        export_bundle(dyn, folders["multi-exit"], (1, args.size, args.size), policy=policy)
        export_bundle(static, folders["static"], (1, args.size, args.size))
        for name, folder in folders.items():
            t0 = time.perf_counter()
            measured = measure_stage_threads(folder, images, (1, 2), (1, 64), rounds=3)
            plans = measure_stage_plans(folder, images[:args.images], (1, 2), rounds=5, settle_s=SETTLE_S,
                                        per_round=True) \
                if name == "multi-exit" else None        # under the bundle's own policy: the spread one
            entry = record_stage_threads(folder, measured, plans=plans)["stage_threads"]
            print(f"{name}: threads per stage {({b: e['threads'] for b, e in entry['batches'].items()})} "
                  f"(measured in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        singles = [images[i:i + 1] for i in range(args.images)]
        batch = [np.ascontiguousarray(images[:64])] * max(1, args.images // 16)
        cases = [(name, b, pol) for name in folders for b in ("1", "64")
                 for pol in (("full depth", "policy") if name == "multi-exit" else ("",))]
        per = {c: {m: [] for m in MODES} for c in cases}
        for r in range(-1, args.rounds):                 # round -1: warm-up
            shift = r % len(MODES)
            # one mode's sessions at a time, as the frontier times them: a pool left spinning would take the cores
            for m in list(MODES)[shift:] + list(MODES)[:shift]:
                bundles = {name: load_bundle(f, threads=MODES[m][0], spin=MODES[m][1]) for name, f in folders.items()}
                for c in cases:
                    name, b, pol = c
                    bd = bundles[name]
                    policy_ = None if name == "static" else bd.full_depth() if pol == "full depth" else bd.policy
                    fn = bd.run_numpy if name == "static" else (lambda x, bd=bd, p_=policy_: bd.run_numpy(x, p_))
                    inputs = singles if b == "1" else batch
                    time.sleep(SETTLE_S)        # no pool spins on from the case before (every mode alike)
                    for x in inputs[:4]:
                        fn(x)
                    t0 = time.perf_counter()
                    for x in inputs:
                        fn(x)
                    if r >= 0:
                        per[c][m].append((time.perf_counter() - t0) * 1e3 / sum(len(x) for x in inputs))
                del bundles
    print("| bundle | batch | exits | 1 thread ms (IQR) | 2 threads ms (IQR) | 2 threads, pools spin after a run "
          "ms (IQR) | per stage ms (IQR) | per stage / better of 1 and 2 (IQR) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, b, pol in cases:
        rounds = per[name, b, pol]                                        # per round: ms per image
        q = {m: _q(rounds[m]) for m in MODES}
        ratio = _q([ps / min(a, t2) for ps, a, t2 in zip(rounds["per-stage"], rounds[1], rounds[2])])
        print(f"| {name} | {b} | {pol or '-'} | " + " | ".join(f"{q[m][0]:.3f} ({q[m][2] - q[m][1]:.3f})"
                                                            for m in MODES) +
              f" | {ratio[0]:.2f} ({ratio[2] - ratio[1]:.2f}) |")
        rows.append({"bundle": name, "batch": int(b), "exits": pol, **{f"ms_{m}".replace(" ", "_"): q[m][0]
                                                                      for m in MODES},
                     "per_stage_vs_best": ratio[0]})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
