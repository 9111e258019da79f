"""The bundle driver's fixed cost per call and per exit, against bare ONNX Runtime calls on the same sessions
(issue 29, "less fixed cost per call"), and against the driver of another git revision (``--base``, default
``main``) in the same process.

A multi-exit network on tiny_mobilenet (1 channel, 64x64, three exits, random weights, batch-norm statistics of
the random images) and the static tiny_mobilenet, exported as bundles. Timed, in interleaved rounds (their
order rotated between rounds, so that a change of machine load hits all alike), 1 thread:

- ``bare``: ``sess.run`` on the stage sessions in a chain (the multi-exit network's stages one after the other,
  each fed the previous one's state; the static graph alone), nothing else;
- ``driver``: ``DynamicBundle.run_numpy(x, full_depth)`` / ``StaticBundle.run_numpy(x)`` (input checks, exit
  tests, bookkeeping), and ``driver, policy``: the multi-exit bundle with thresholds that spread the images over
  the exits (its bare twin runs the same stages per image);
- ``base``: the same with the driver of git revision ``--base`` (``export/runtime.py`` and ``export/host.py``
  loaded from that revision), on the same sessions;
- ``bare, IOBinding``: the bare full-depth chain through ONNX Runtime's IOBinding, outputs bound once to
  preallocated arrays, the input bound per call (the alternative to plain ``run`` the issue names).

Printed: per call, the median and IQR over rounds of microseconds, and of each driver's overhead over bare
(paired within the round), per call and per exit. The machine is shared: read the ratios, not the absolutes.

    python benchmarks/bench_driver_overhead.py [--rounds 20] [--images 100] [--base main] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dyncnn
from bench_deploy import _spread_policy        # thresholds that send a third of the images to each exit
from dyncnn.export import export_bundle, load_bundle

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = [16, 48, 96, 192]          # the frontier's tiny-S widths


def load_base_driver(ref: str):
    """``dyncnn.export.runtime`` as of git revision ``ref`` (its ``host`` too), as a module beside the current
    one: the driver "before", run in the same process as the current one ("after")."""
    mods = {}
    for name in ("host", "runtime"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/dyncnn/export/{name}.py"],
                             check=True, capture_output=True, text=True).stdout
        src = src.replace("from .host import", "from ._base_host import")
        full = f"dyncnn.export._base_{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "dyncnn.export"
        sys.modules[full] = mod
        exec(compile(src, f"{ref}:{name}.py", "exec"), mod.__dict__)
        mods[name] = mod
    return mods["runtime"]


def bare_chain(bundle, x, stop: int | None = None):
    """The stage sessions of ``bundle`` (one tensor of state between stages) run in a chain, up to exit ``stop``."""
    leaves = [x]
    for k, g in enumerate(bundle._steps[:None if stop is None else stop + 1]):
        outs = g.sess.run(g.out_names, {n: leaves[i] for n, i in g.feed})
        leaves = [outs[0]]
    return outs[-1]


def iobinding_chain(bundle, x0):
    """A bare chain like :func:`bare_chain` at batch 1 through ONNX Runtime's IOBinding, the outputs bound once to
    preallocated arrays and only the input bound per call: returns the function of one image."""
    import onnxruntime as ort
    steps, binds, bufs = bundle._steps, [], []
    x = x0
    for g in steps:
        outs = g.sess.run(g.out_names, {"in0": x})
        arrs = [np.empty_like(a) for a in outs]
        io = g.sess.io_binding()
        for n, a in zip(g.out_names, arrs):
            io.bind_output(n, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
        binds.append(io)
        bufs.append(arrs)
        x = outs[0]
    assert isinstance(steps[0].sess, ort.InferenceSession)

    def run(x):
        for g, io, arrs in zip(steps, binds, bufs):
            io.bind_input("in0", "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
            g.sess._sess.run_with_iobinding(io._iobinding, None)
            x = arrs[0]
        return bufs[-1][-1].copy()
    return run


def _q(v):
    q = statistics.quantiles(v, n=4)
    return statistics.median(v), q[0], q[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--images", type=int, default=100, help="images per round, one call each (batch 1)")
    p.add_argument("--batch", type=int, default=64, help="the larger batch timed (full depth)")
    p.add_argument("--batch-calls", type=int, default=10, help="calls at the larger batch per round")
    p.add_argument("--base", default="main", help="git revision of the driver to compare with ('' for none)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.random((max(args.images, args.batch), 1, 64, 64), dtype=np.float32)
    torch.manual_seed(0)
    dyn = dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1,
                              backbone_cfg={"widths": WIDTHS[:3]})
    for m in dyn.modules():      # batch-norm statistics of the images (momentum 1: the last batch's): else the
        if isinstance(m, torch.nn.BatchNorm2d):     # random net's confidences collapse onto the thresholds, and
            m.momentum = 1.0                        # every exit test falls to the float32 twin (host.py)
    with torch.no_grad():
        dyn.train()(torch.from_numpy(images))
    dyn.eval()
    static = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=WIDTHS).eval()
    thresholds = list(_spread_policy(dyn, torch.from_numpy(images[:args.images])).thresholds)
    base = load_base_driver(args.base) if args.base else None
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(dyn, Path(tmp) / "dyn", (1, 64, 64), policy=thresholds)
        export_bundle(static, Path(tmp) / "static", (1, 64, 64))
        drivers = {"driver": load_bundle}
        if base is not None:
            drivers["base"] = base.load_bundle
        dyn_b = {k: f(Path(tmp) / "dyn", threads=1) for k, f in drivers.items()}
        st_b = {k: f(Path(tmp) / "static", threads=1) for k, f in drivers.items()}
        for name in drivers:            # the same sessions under every driver: only the host code differs
            st_b[name].sess = st_b["driver"].sess
            for g, ref_g in zip(dyn_b[name]._steps, dyn_b["driver"]._steps):
                g.sess = ref_g.sess
        singles = [images[i:i + 1] for i in range(args.images)]
        big = np.ascontiguousarray(images[:args.batch])
        exits = dyn_b["driver"].run_numpy(np.concatenate(singles))[1]
        print(f"exits taken with the spread policy: {np.bincount(exits, minlength=3).tolist()}", file=sys.stderr)
        full = dyn_b["driver"].full_depth()
        ref, st = dyn_b["driver"], st_b["driver"]
        iob = iobinding_chain(ref, singles[0])
        np.testing.assert_allclose(iob(singles[1]), bare_chain(ref, singles[1]), rtol=1e-5, atol=1e-6)
        b1 = list(range(len(singles)))
        # group -> (inputs, exits run per input, {code: function of an input index})
        groups = {
            "static b1": (b1, [1] * len(b1), {"bare": lambda i: st.sess.run(None, {"input": singles[i]})}),
            "multi-exit b1 full depth": (b1, [3] * len(b1), {"bare": lambda i: bare_chain(ref, singles[i]),
                                                             "iobinding": lambda i: iob(singles[i])}),
            "multi-exit b1 policy": (b1, [int(k) + 1 for k in exits],
                                     {"bare": lambda i: bare_chain(ref, singles[i], int(exits[i]))}),
            f"multi-exit b{args.batch} full depth": ([0] * args.batch_calls, [3] * args.batch_calls,
                                                     {"bare": lambda i: bare_chain(ref, big)}),
        }
        for name in drivers:
            d, s = dyn_b[name], st_b[name]
            fns = list(groups.values())
            fns[0][2][name] = lambda i, s=s: s.run_numpy(singles[i])
            fns[1][2][name] = lambda i, d=d: d.run_numpy(singles[i], full)
            fns[2][2][name] = lambda i, d=d: d.run_numpy(singles[i])
            fns[3][2][name] = lambda i, d=d: d.run_numpy(big, full)
        per: dict = {g: {c: [[] for _ in range(args.rounds)] for c in groups[g][2]} for g in groups}
        t_start = time.perf_counter()
        for r in range(-1, args.rounds):             # round -1: warm-up
            for g, (inputs, _, fns) in groups.items():
                codes = list(fns)
                for j, i in enumerate(inputs):       # the codes one after the other on each input: paired calls
                    shift = (j + r) % len(codes)
                    for c in codes[shift:] + codes[:shift]:
                        t0 = time.perf_counter()
                        fns[c](i)
                        if r >= 0:
                            per[g][c][r].append((time.perf_counter() - t0) * 1e6)
        print(f"timed {args.rounds} rounds in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    rows = []
    print("| case | code | us per call (IQR over rounds) | overhead over bare, us per call (IQR) | per exit | "
          "overhead / base's (IQR) |")
    print("|---|---|---|---|---|---|")
    for g, (inputs, n_exits, fns) in groups.items():
        bare = per[g]["bare"]
        med = {c: [statistics.median(v) for v in per[g][c]] for c in fns}          # per round
        over = {c: [statistics.median([a - b for a, b in zip(v, bv)]) for v, bv in zip(per[g][c], bare)]
                for c in fns if c != "bare"}                                       # paired per call, per round
        m, a, b = _q(med["bare"])
        print(f"| {g} | bare sess.run | {m:.1f} ({b - a:.1f}) | | | |")
        exits_per_call = sum(n_exits) / len(n_exits)
        for c in [c for c in ("iobinding", "base", "driver") if c in over]:
            (m, a, b), (om, oa, ob) = _q(med[c]), _q(over[c])
            ratio, rq = "", None
            if c == "driver" and "base" in over:
                rr = [o / bo for o, bo in zip(over["driver"], over["base"]) if bo > 0]
                if len(rr) > 1:
                    rq = _q(rr)
                    ratio = f"{rq[0]:.2f} ({rq[2] - rq[1]:.2f})"
            label = {"driver": "driver (this tree)", "base": f"driver at {args.base}",
                     "iobinding": "bare, IOBinding"}[c]
            print(f"| {g} | {label} | {m:.1f} ({b - a:.1f}) | {om:.1f} ({ob - oa:.1f}) | "
                  f"{om / exits_per_call:.1f} | {ratio} |")
            rows.append({"case": g, "code": c, "us": m, "iqr": b - a, "overhead_us": om, "overhead_iqr": ob - oa,
                         "overhead_per_exit_us": om / exits_per_call, "bare_us": _q(med["bare"])[0],
                         "overhead_vs_base": rq[0] if rq else None})
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
