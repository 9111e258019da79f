"""Which selection rule survives new data, judged on the validation split alone (no test image is rendered).

The frontier chooses a cascade and its operating point as the cheapest candidate that "reaches" the validation
accuracy of the best static model. With many candidates scored on the same images, the cheapest one that just
reaches the target is mostly a lucky one (the winner's curse). This script splits the validation *digits* in two
halves (both renderings of a digit on the same side), chooses on half A with each rule, and scores the choice on
half B, over many random splits and every trained seed of a finished ``dyncnn frontier --only-train`` run:

- the rule ``z``: :func:`~dyncnn.frontier.front.paired_lower_bound` on (candidate - reference) must be >= 0, the
  reference being the best static model on half A; ``z = 0`` is the point rule (the candidate's accuracy >= the
  reference's);
- what is chosen: the cascade search (:func:`~dyncnn.frontier.search.search_cascades`, every 2- and 3-member cascade
  of the static models, their threshold grids), with each member's MACs per image as its cost (the frontier uses
  measured batch-1 latencies; MACs keep this free of timing noise);
- which cascades are searched (``--last``): ``any`` (every chain) or ``reference`` (only the chains that end with
  the best static model on half A, the frontier's ``cascade_last`` default);
- reported on half B, mean over splits and seeds: the chosen cascade's accuracy minus the best static accuracy on
  half B (``gap to A*``, the frontier's figure, in points), the share of choices more than 0.3 points below it,
  the worst choice, and the MAC speedup over the reference (its MACs / the cascade's mean MACs on B).

    python benchmarks/bench_selection.py RUN_DIR [--splits 40] [--z 0 0.5 1 1.5 2] [--last any reference]

RUN_DIR is the ``--out`` of ``dyncnn frontier --preset P --only-train`` (its models/seed*/ checkpoints); the data
settings (canvas, clutter, data seed) are read from the checkpoints.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from dyncnn.dynamic.budget import assign_exits, exit_scores, fit_temperatures
from dyncnn.frontier.front import best_on_validation
from dyncnn.frontier.search import can_end_cascade, search_cascades

from _finished_run import skipped, static_logits


def seed_logits(seed_dir: Path, preset: str, val_repeats: int) -> tuple[dict, dict, torch.Tensor, int]:
    """Validation logits and MACs per image of every static model of ``preset`` trained in ``seed_dir``, and the
    number of validation digits."""
    logits, macs, y = static_logits(seed_dir, preset, "val", val_repeats)
    return logits, macs, y, len(y) // val_repeats


def one_split(logits: dict, macs: dict, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, z: float,
              last: str = "any") -> dict:
    """Choose on rows ``a`` with rule ``z`` (``last``: "reference", only the cascades ending with the best static
    model on ``a``), score on rows ``b``."""
    acc = {k: lambda rows, k=k: float((logits[k][rows].argmax(1) == y[rows]).double().mean()) for k in logits}
    reference = best_on_validation({k: {"val_accuracy": acc[k](a), "val_loss": float(F.cross_entropy(
        logits[k][a].double(), y[a]))} for k in logits})       # as the frontier chooses its reference
    ends = reference if last == "reference" and can_end_cascade(macs, reference) else None
    ranking = search_cascades({k: v[a] for k, v in logits.items()}, y[a], macs, acc[reference](a), z=z,
                              reference=reference, last=ends)
    top = ranking[0]
    members = top["members"]
    temps = [fit_temperatures(logits[k][a][None], y[a])[0] for k in members]
    lb = torch.stack([logits[k][b] for k in members])
    scores = exit_scores(lb, temperatures=temps)
    exits = assign_exits(scores, torch.tensor([*top["thresholds"], -float("inf")], dtype=scores.dtype))
    right = (lb.argmax(-1) == y[b])[exits, torch.arange(len(b))]
    cum = torch.tensor(macs[members[0]]).new_tensor([sum(macs[m] for m in members[:i + 1])
                                                     for i in range(len(members))])
    best_b = max(acc[k](b) for k in logits)
    return {"gap": float(right.double().mean()) - best_b, "mac_speedup": macs[reference] / float(cum[exits].mean()),
            "reaches": top["reaches"], "members": " -> ".join(members)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="--out folders of `dyncnn frontier --only-train`; without "
                                                    "any (as in `make bench`) the script says so and skips")
    p.add_argument("--preset", default="demo")
    p.add_argument("--splits", type=int, default=40)
    p.add_argument("--val-repeats", type=int, default=2, help="as the frontier's FrontierSettings.val_repeats")
    p.add_argument("--z", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    p.add_argument("--last", nargs="+", default=["any"], choices=["any", "reference"],
                   help="the cascades searched: every chain (any), or those ending with the best static model")
    args = p.parse_args(argv)
    if not args.runs:
        skipped(__file__, "give one or more run folders as arguments")
        return 0
    rules = [(z, last) for last in args.last for z in args.z]
    rows: dict[tuple, list[dict]] = {r: [] for r in rules}
    for run in args.runs:
        for seed_dir in sorted((run / "models").glob("seed*")):
            logits, macs, y, digits = seed_logits(seed_dir, args.preset, args.val_repeats)
            g = torch.Generator().manual_seed(1234)
            for _ in range(args.splits):
                half = torch.randperm(digits, generator=g)[:digits // 2]
                in_a = torch.zeros(digits, dtype=torch.bool)
                in_a[half] = True
                in_a = in_a.repeat(len(y) // digits)            # rendering i is digit i % digits
                a, b = in_a.nonzero()[:, 0], (~in_a).nonzero()[:, 0]
                for z, last in rules:
                    rows[z, last].append(one_split(logits, macs, y, a, b, z, last))
            print(f"{run} {seed_dir.name}: {args.splits} splits done", flush=True)
    print(f"\nchosen on half A, scored on half B ({len(rows[rules[0]])} choices: runs x seeds x splits)\n")
    print("| z | cascades end with | gap to A* on B (points, mean) | median | share below -0.3 points | worst | "
          "MAC speedup (mean) |")
    print("|---|---|---|---|---|---|---|")
    for (z, last), rs in rows.items():
        gaps = [100 * r["gap"] for r in rs]
        print(f"| {z:g} | {'the best static model' if last == 'reference' else 'any model'} | "
              f"{statistics.fmean(gaps):+.2f} | {statistics.median(gaps):+.2f} | "
              f"{sum(g < -0.3 for g in gaps) / len(gaps):.0%} | {min(gaps):+.2f} | "
              f"{statistics.fmean(r['mac_speedup'] for r in rs):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
