"""Threads per stage in finished, timed ``dyncnn frontier`` runs (issue 29's target: "per stage" at least as fast as
the better of 1 and 2 threads for every model). For each run given and each batch size, every static network and
every dynamic model's chosen operating point: the "per stage" median milliseconds per image over the better of the
1- and 2-thread medians of the same rounds (below 1: per stage is faster; where per stage ran on one count's
sessions, ``same_as``, the two are one timing and the ratio is 1 or that count against the other). Printed per batch
size: how many (model, run) pairs lie within 5%, the median and the worst ratios; and, for the static networks, how
often the count recorded in the bundle (measured before the timing, on validation images) ran within the margin of
the faster count in the timing, with the pairs where it did not.

    python benchmarks/bench_per_stage_runs.py RUN_DIR [RUN_DIR ...] [--margin 0.05] [--json out.json]

It times nothing itself: the figures are the frontier's own, paired in its interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _finished_run import skipped
from dyncnn.export.bundle_format import read_manifest
from dyncnn.frontier.runner import _slug


def _entries(seed: dict):
    """(label, kind, timings, bundle slug) of each static network and each dynamic model's chosen point."""
    for label, e in seed["static"].items():
        yield label, "static", e["rt"], _slug(label)
    for label, d in seed["dynamic"].items():
        for p in d["points"]:
            if p.get("chosen"):
                yield label, "dynamic", p["rt"], _slug(label)


def summarize(runs: list[Path], margin: float = 0.05) -> dict:
    """``{batch: {"pairs": [...], "within": n, "n": n, "median": r, "worst": r, "static_agree": n, "static_n": n}}``
    over the seeds of every run in ``runs``."""
    out: dict[int, dict] = {}
    for run in runs:
        if not (run / "frontier.json").is_file():
            raise SystemExit(f"{run}: no frontier.json there: expected a finished, timed `dyncnn frontier` run")
        saved = json.loads((run / "frontier.json").read_text())
        for seed in saved["seeds"]:
            bundles = run / "bundles" / f"seed{seed['seed']}"
            for label, kind, rt, slug in _entries(seed):
                recorded = {}                  # a static network's recorded counts per batch size, read once
                if kind == "static" and (bundles / slug / "manifest.json").exists():
                    recorded = read_manifest(bundles / slug).get("stage_threads", {}).get("batches", {})
                for key in rt:
                    if not key.startswith("tper-stage_b"):
                        continue
                    b = int(key.rsplit("_b", 1)[1])
                    t1, t2 = rt[f"t1_b{b}"]["median_ms"], rt[f"t2_b{b}"]["median_ms"]
                    ratio = rt[key]["median_ms"] / min(t1, t2)
                    row = out.setdefault(b, {"pairs": [], "static_agree": 0, "static_n": 0, "disagree": []})
                    row["pairs"].append({"run": run.name, "seed": seed["seed"], "model": label, "kind": kind,
                                         "ratio": ratio, "t1": t1, "t2": t2, "same_as": rt[key].get("same_as")})
                    rec = recorded.get(str(b))
                    if rec:
                        row["static_n"] += 1
                        if (t1, t2)[rec["threads"][0] - 1] <= min(t1, t2) * (1 + margin):
                            row["static_agree"] += 1
                        else:
                            ms = rec["stage_ms"]
                            row["disagree"].append(f"{run.name} {label}: recorded {rec['threads'][0]} "
                                                   f"({ms['1'][0]:.3f} / {ms['2'][0]:.3f} ms with 1 / 2), timed "
                                                   f"{t1:.3f} / {t2:.3f}")
    for row in out.values():
        r = [p["ratio"] for p in row["pairs"]]
        row.update(n=len(r), within=sum(x <= 1 + margin for x in r), median=statistics.median(r), worst=max(r))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="timed frontier run folders (one seed each, or merged ones' parts)")
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not args.runs:
        skipped(__file__, "give one or more run folders")
        return 0
    out = summarize([Path(r) for r in args.runs], args.margin)
    for b, row in sorted(out.items()):
        worst = max(row["pairs"], key=lambda q: q["ratio"])
        print(f"batch {b}: per stage within {args.margin:.0%} of the better of 1 and 2 threads for {row['within']} "
              f"of {row['n']} (model, run) pairs; median {row['median']:.3f}, worst {row['worst']:.2f} "
              f"({worst['run']} {worst['model']}: 1 thread {worst['t1']:.3f}, 2 threads {worst['t2']:.3f} ms)")
        print(f"  static networks: the recorded count ran within {args.margin:.0%} of the faster one in the timing "
              f"for {row['static_agree']} of {row['static_n']}")
        for line in row["disagree"]:
            print(f"    {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
