"""Threads per stage: how well each rule for choosing a plan (a thread count per stage) picks, on a finished run's
multi-exit bundles (issue 29, "per stage at least as fast as the better of 1 and 2 threads for every model").

For every multi-exit model of a finished ``dyncnn frontier`` run, at its chosen operating point, every plan of 1
and 2 threads is timed ``--rounds`` times, ``--batch`` images a call over ``--images`` validation images, the
plans interleaved in each round and each pass after the frontier's 0.2 s pause
(:func:`dyncnn.export.runtime.measure_stage_plans` with ``per_round=True``). Then the rounds are cut into
disjoint groups, and each rule picks a plan from each group alone:

- ``median, N rounds``: the fastest median of the group's N rounds, the fewest threads within 5% (the choice
  before the paired rule, :func:`~dyncnn.export.runtime.pick_plan` given one figure per plan);
- ``paired, N rounds``: :func:`~dyncnn.export.runtime.pick_plan` given the group's rounds (a plan of more
  threads must beat 1 thread in every round, by 5% at the median).

Each pick is scored on the rounds outside its group: its median milliseconds over the better of the two uniform
plans' (1 thread everywhere, 2 threads everywhere), the frontier's "per stage" against "the better of 1 and 2
threads". Printed per rule: the mean score, the worst, and the share of picks more than 5% slower.

    python benchmarks/bench_plan_rule.py --run runs/v8/fA_s0 [--batch 64] [--rounds 15] [--images 256]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.export.runtime import measure_stage_plans, pick_plan
from dyncnn.frontier.runner import SETTLE_S, _slug, data_tensors, load_data

from _finished_run import finished_run

RULES = (("median", 3), ("median", 5), ("paired", 3), ("paired", 5))


def _score(per: dict[tuple, list[float]], rule: str, group: list[int]) -> float:
    """The pick of ``rule`` on the rounds of ``group``, scored on the other rounds."""
    mine = {p: [v[i] for i in group] for p, v in per.items()}
    pick = pick_plan({p: float(np.median(v)) for p, v in mine.items()} if rule == "median" else mine)
    rest = [i for i in range(len(next(iter(per.values())))) if i not in group]
    truth = {p: statistics.median(v[i] for i in rest) for p, v in per.items()}
    n = len(pick)
    return truth[pick] / min(truth[(1,) * n], truth[(2,) * n])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="a finished frontier run folder (frontier.json, bundles/); without "
                                               "it (as in `make bench`) the script says so and skips")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--images", type=int, default=256, help="validation images per pass")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.rounds < 2 * max(n for _, n in RULES):
        p.error(f"--rounds must be at least {2 * max(n for _, n in RULES)}: each rule picks from a group of rounds "
                f"and is scored on the others, got {a.rounds}")
    found = finished_run(a.run, __file__)
    if found is None:
        return 0
    run, saved, s = found
    res = saved["seeds"][0]
    x_val = data_tensors(load_data(s)["val"])[0].numpy()[:a.images]
    torch.set_num_threads(2)
    scores: dict[tuple, list[float]] = {r: [] for r in RULES}
    report: dict = {"run": str(run), "batch": a.batch, "rounds": a.rounds, "images": len(x_val), "models": {}}
    print(f"{run}: seed {res['seed']}, {s.canvas}x{s.canvas}, batch {a.batch}, {a.rounds} rounds of "
          f"{len(x_val)} validation images, plans of 1 and 2 threads", flush=True)
    for label, entry in res["dynamic"].items():
        chosen = next(q for q in entry["points"] if q["chosen"])
        policy = ExitPolicy(chosen["thresholds"], "max_prob", chosen["temperatures"])
        folder = run / "bundles" / f"seed{res['seed']}" / _slug(label)
        per = measure_stage_plans(folder, x_val, (1, 2), policy, rounds=a.rounds, settle_s=SETTLE_S,
                                  batch=a.batch, per_round=True)
        row = {}
        for rule in RULES:
            got = [_score(per, rule[0], list(range(g, g + rule[1])))
                   for g in range(0, a.rounds - rule[1] + 1, rule[1])]
            scores[rule] += got
            row[f"{rule[0]}, {rule[1]} rounds"] = got
        best = min(per, key=lambda q: statistics.median(per[q]))
        print(f"  {label}: fastest plan over all rounds {'-'.join(map(str, best))}; " +
              "; ".join(f"{k} {statistics.mean(v):.3f}" for k, v in row.items()), flush=True)
        report["models"][label] = {"ms": {"-".join(map(str, q)): v for q, v in per.items()}, "scores": row}
    print("\n| rule | picks | mean of pick / better uniform plan | worst | picks over 1.05 |")
    print("|---|---|---|---|---|")
    for (rule, n), v in scores.items():
        print(f"| {rule}, {n} rounds | {len(v)} | {statistics.mean(v):.3f} | {max(v):.3f} | "
              f"{sum(x > 1.05 for x in v) / len(v):.0%} |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
