"""How fast could the searched cascade be with its members? Its measured speedup split into the members' ceiling,
what choosing on validation gives up, and what the timing adds (issue 29, "2.0x at 128x128 batch 1").

For every seed of a finished, timed ``dyncnn frontier`` run whose dynamic models include the cascade searched on
validation, the static networks' test logits are computed once from the run's checkpoints, and each member's cost
is the run's own measured milliseconds per image of that static network (1 thread, at each batch size timed).
Every speedup is read as the frontier reads it: the static front's latency at the cascade's accuracy (at most A*,
the best static test accuracy) over the cascade's latency. Columns, per batch size:

- ``ceiling, any chain``: the cheapest operating point of every 2- and 3-member chain of the static networks, its
  thresholds tuned *on the test split* to reach A* there (:func:`~dyncnn.frontier.search.search_cascades` given
  the test logits: an oracle no deployable rule can match, and the most these members allow);
- ``ceiling, its chain``: the same for the chain the frontier chose (members in its order);
- ``chosen, predicted``: the frontier's chosen operating point (members and thresholds from validation), its test
  exit shares priced with the members' costs;
- ``chosen, measured``: the frontier's figure (the cascade run by the bundle driver on the timed images);
- ``timed / all``: the predicted cost on the images the frontier timed (the first ``single_images`` test images at
  batch 1, the first ``batch_images`` at larger batches) over the predicted cost on the whole test split; the
  sampling error of a timing on a subset of the test images, which averages out over runs.

ceiling / predicted is what the choice on validation gives up (winner's curse, the coarser grid, the paired
rule's margin); predicted / measured is what the driver and the timing add (each member's head and call, the
sub-batches of the later members at larger batches, the timed subset, the machine's noise).

    python benchmarks/bench_cascade_ceiling.py RUN_DIR [RUN_DIR ...] [--points 101]

RUN_DIR: the ``--out`` of a finished ``dyncnn frontier`` run (frontier.json, models/seed*/).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

from dyncnn.dynamic.budget import assign_exits, exit_scores, fit_temperatures
from dyncnn.frontier.front import Point, front_latency_at, pareto_front, select_on_validation
from dyncnn.frontier.search import grid_candidates, search_cascades

from _finished_run import skipped, static_logits

SEARCHED = "cascade searched on validation"
COLUMNS = ("ceiling, any chain", "ceiling, its chain", "chosen, predicted", "chosen, measured", "timed / all")


def _speedup(front: list[Point], accuracy: float, ms: float) -> float:
    return front_latency_at(front, min(accuracy, front[-1].accuracy)) / ms


def _ceiling(logits: dict, y: torch.Tensor, cost: dict, target: float, points: int) -> dict:
    """The cheapest test-tuned operating point reaching ``target`` over every chain (``members``, ``val_accuracy``
    and ``val_cost`` are the test split's)."""
    return search_cascades(logits, y, cost, target, max_members=3, points=points)[0]


def _chain_ceiling(logits: dict, y: torch.Tensor, cum: list[float], target: float, points: int,
                   chain: list[str]) -> dict:
    """The same for ``chain`` alone, in its own order (the frontier's members, ordered by the search's costs)."""
    temps = [fit_temperatures(logits[k][None], y)[0] for k in chain]
    ex = torch.stack([logits[k] for k in chain])
    cands = grid_candidates(exit_scores(ex, temperatures=temps), ex.argmax(-1) == y, cum, temps, points)
    return select_on_validation(cands, target)


def seed_rows(run: Path, saved: dict, seed: dict, points: int) -> dict[int, dict]:
    """One row of :data:`COLUMNS` per batch size the run timed, for one seed of a finished run."""
    st = saved["settings"]
    logits, _, y = static_logits(run / "models" / f"seed{seed['seed']}", st["preset"], "test", st["test_repeats"])
    d = seed["dynamic"][SEARCHED]
    chosen = next(p for p in d["points"] if p["chosen"])
    members = d["members"]
    ex = torch.stack([logits[m] for m in members])
    scores = exit_scores(ex, temperatures=chosen["temperatures"])
    exits = assign_exits(scores, torch.tensor([*chosen["thresholds"], -float("inf")], dtype=scores.dtype))
    out = {}
    for b in st["batch_sizes"]:
        cond = f"t1_b{b}"
        cost = {k: v["rt"][cond]["median_ms"] for k, v in seed["static"].items()}
        front = pareto_front([Point(cost[k], v["test_accuracy"], k) for k, v in seed["static"].items()])
        astar = front[-1].accuracy
        cum = torch.tensor(list(itertools.accumulate(cost[m] for m in members)), dtype=torch.float64)
        timed = st["single_images"] if b == 1 else st["batch_images"] // b * b
        every = _ceiling(logits, y, cost, astar, points)
        best = _chain_ceiling(logits, y, cum.tolist(), astar, points, members)
        out[b] = {
            "ceiling, any chain": _speedup(front, every["val_accuracy"], every["val_cost"]),
            "ceiling, its chain": _speedup(front, best["val_accuracy"], best["val_cost"]),
            "chosen, predicted": _speedup(front, chosen["test_accuracy"], float(cum[exits].mean())),
            "chosen, measured": seed["merit"][cond]["models"][SEARCHED]["speedup"],
            "timed / all": float(cum[exits[:timed]].mean() / cum[exits].mean()),
            "any chain": " -> ".join(every["members"]), "chain": " -> ".join(members),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="finished `dyncnn frontier` run folders; without any (as in "
                                                      "`make bench`) the script says so and skips")
    p.add_argument("--points", type=int, default=101, help="quantile grid points per exit for the ceilings "
                                                           "(the frontier's search uses 21)")
    a = p.parse_args(argv)
    if not a.runs:
        skipped(__file__, "give one or more run folders as arguments")
        return 0
    torch.set_num_threads(1)
    rows: dict[int, list[dict]] = {}
    for run in a.runs:
        saved = json.loads((run / "frontier.json").read_text())
        for seed in saved["seeds"]:
            if SEARCHED not in seed["dynamic"]:
                print(f"{run} seed {seed['seed']}: no {SEARCHED!r} among its models; left out")
                continue
            for b, r in seed_rows(run, saved, seed, a.points).items():
                rows.setdefault(b, []).append(r)
                print(f"{run} seed {seed['seed']} batch {b}: " + ", ".join(f"{c} {r[c]:.2f}" for c in COLUMNS) +
                      f" (chose {r['chain']}; the any-chain ceiling {r['any chain']})", flush=True)
    if not rows:
        print("no run had the searched cascade")
        return 1
    print(f"\nspeedup over the static front at equal accuracy, 1 thread; mean over "
          f"{len(next(iter(rows.values())))} (run, seed) pairs\n")
    print("| batch | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for b, rs in rows.items():
        print(f"| {b} | " + " | ".join(f"{statistics.fmean(r[c] for r in rs):.2f}" + ("" if c == "timed / all"
                                                                                      else "x")
                                       for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
