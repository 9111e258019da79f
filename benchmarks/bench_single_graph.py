"""Batch 1: the single-graph form of a multi-exit network (:mod:`dyncnn.export.cond`, exits as ONNX ``If``)
against its bundle of per-stage graphs and the host driver (issue 29, "a single-graph cascade where it is faster
at batch 1").

For a finished ``dyncnn frontier`` run (its trained static networks, its searched cascade and fused cascade, each
at the operating point the run chose on validation; nothing is trained again):

- ``bundle``: the run's exported bundle (``bundles/seed*/<model>``), ``load_bundle(..., threads=1)``, one image per
  call (one runtime call per exit reached, the exit test on the host);
- ``single graph``: the same network exported with ``torch.cond`` (one runtime call per image; the exit tests
  inside the graph);
- ``static``: the run's best static network by validation (A*), its bundle.

Each dynamic form runs at three operating points: the run's chosen one, every image leaving at the first exit
(the first stage's cost: the fused cascade's first stage against the member it is), and full depth.

First every test image (``--check`` of them) runs through both dynamic forms one at a time: exits and logits
are compared (a sample whose confidence lies within float32 rounding of a threshold may leave on either side,
see docs/deployment.md; such samples are counted, not hidden). Then ``--images`` images are timed one at a
time per item, in ``--rounds`` interleaved rounds whose order rotates, 1 thread. Printed: ms per image (median
and IQR over rounds) and the speedup over the static network, paired within each round.

    python benchmarks/bench_single_graph.py --run runs/fA_s0 [--rounds 9] [--images 200] [--check 1000]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.export import load_bundle
from dyncnn.export.cond import CondGraph, export_cond_graph
from dyncnn.frontier.runner import (PLAIN_RECIPE, _slug, build_dynamic, build_static, data_tensors, load_data,
                                    member_spec, presets)
from dyncnn.models import create_model
from dyncnn.train.checkpoint import load_checkpoint

from _finished_run import finished_run

MODELS = ("cascade searched on validation", "searched cascade, fused")


def _network(label: str, entry: dict, run: Path, seed: int, specs: dict, shape: dict) -> torch.nn.Module:
    """The run's dynamic model ``label`` rebuilt from its checkpoints (the members' for the cascade; the fused
    network's own, which holds its members)."""
    members = entry["members"]
    if entry["kind"] == "fused":
        net = create_model("fused_cascade", members=[member_spec(specs[m]) for m in members], laterals="pooled",
                           imta=PLAIN_RECIPE, **shape)
        load_checkpoint(run / "models" / f"seed{seed}" / _slug(f"{label} {' '.join(members)}") / "last.safetensors",
                        net)
        return net.eval()
    statics = {}
    for m in members:
        statics[m] = build_static(specs[m], **shape)
        load_checkpoint(run / "models" / f"seed{seed}" / _slug(m) / "last.safetensors", statics[m])
    return build_dynamic({"kind": "cascade", "members": members}, statics, specs, **shape)


def _per_image(run_one, images: np.ndarray):
    def go():
        for i in range(len(images)):
            run_one(images[i:i + 1])
    return go


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="a finished frontier run folder (frontier.json, models/, bundles/); without it (as in `make bench`) the script says so and skips")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--images", type=int, default=200, help="images timed one at a time per item and round")
    p.add_argument("--check", type=int, default=1000, help="test images compared between the two forms")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    found = finished_run(a.run, __file__)
    if found is None:
        return 0
    torch.set_num_threads(1)
    run, saved, s = found
    res = saved["seeds"][0]
    seed = res["seed"]
    data = load_data(s)
    shape = {"num_classes": data["num_classes"], "in_chans": data["in_chans"]}
    specs = {m["label"]: m for m in presets(s.canvas)[s.preset]["static"]}
    x_test = data_tensors(data["test"])[0].numpy()
    bundles = run / "bundles" / f"seed{seed}"
    a_star = res["best_static_by_val"]
    items = {f"static {a_star}": _per_image(load_bundle(bundles / _slug(a_star), threads=1).run_numpy,
                                            x_test[:a.images])}
    report: dict = {"run": str(run), "seed": seed, "static": a_star, "models": {}}
    tmp = tempfile.TemporaryDirectory()
    print(f"{run}: seed {seed}, {s.canvas}x{s.canvas}, A* = {a_star}; 1 thread, batch 1", flush=True)
    for label in a.models:
        entry = res["dynamic"].get(label)
        if entry is None:
            print(f"  {label}: not in this run, skipped")
            continue
        chosen = next(q for q in entry["points"] if q["chosen"])
        policy = ExitPolicy(chosen["thresholds"], "max_prob", chosen["temperatures"])
        net = _network(label, entry, run, seed, specs, shape)
        t0 = time.perf_counter()
        path = export_cond_graph(net, Path(tmp.name) / f"{_slug(label)}.onnx", x_test.shape[1:])
        export_s = time.perf_counter() - t0
        bundle = load_bundle(bundles / _slug(label), threads=1)
        graph = CondGraph(path, bundle.exit_macs, x_test.shape[1:], threads=1)
        n = min(a.check, len(x_test))
        exits_b, exits_g, err = [], [], 0.0
        for i in range(n):
            lb, eb, _ = bundle.run_numpy(x_test[i:i + 1], policy)
            rg = graph.run(x_test[i:i + 1], policy)
            exits_b.append(int(eb[0]))
            exits_g.append(int(rg.exit_index[0]))
            if eb[0] == rg.exit_index[0]:
                err = max(err, float(np.abs(lb - rg.logits.numpy()).max()))
        differ = sum(b != g for b, g in zip(exits_b, exits_g))
        frac = np.bincount(exits_b, minlength=bundle.num_exits) / n
        print(f"  {label} ({' -> '.join(entry['members'])}): exported in {export_s:.1f} s; {n} test images: "
              f"{differ} exit decisions differ, logits within {err:.1e} where they agree; exit shares "
              f"{' / '.join(f'{f:.2f}' for f in frac)}", flush=True)
        report["models"][label] = {"members": entry["members"], "export_s": export_s, "differ": differ,
                                   "checked": n, "max_logit_err": err, "exit_shares": frac.tolist()}
        k = bundle.num_exits - 1
        for point, pol in (("chosen point", policy), ("all leave at exit 0", ExitPolicy([-math.inf] * k)),
                           ("full depth", ExitPolicy([math.inf] * k))):
            items[f"{label}, {point}: bundle"] = _per_image(lambda x, b=bundle, p=pol: b.run_numpy(x, p),
                                                            x_test[:a.images])
            items[f"{label}, {point}: single graph"] = _per_image(lambda x, g=graph, p=pol: g.run(x, p),
                                                                  x_test[:a.images])
    names = list(items)
    for name in names:             # one untimed pass each: sessions warm, caches filled
        items[name]()
    ms = {name: [] for name in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            items[name]()
            ms[name].append((time.perf_counter() - t0) * 1e3 / a.images)
    ref = ms[names[0]]
    print(f"\n| item | ms per image (median, IQR) | speedup over {a_star} (paired, median) |")
    print("|---|---|---|")
    for name in names:
        q = statistics.quantiles(ms[name], n=4)
        sp = statistics.median(r / m for r, m in zip(ref, ms[name]))
        print(f"| {name} | {statistics.median(ms[name]):.4f} ({q[0]:.4f}-{q[2]:.4f}) | {sp:.2f}x |")
        report.setdefault("timing", {})[name] = {"ms": ms[name], "speedup": sp}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
