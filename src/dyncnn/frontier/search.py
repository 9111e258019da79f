"""Operating points and cascade members chosen on the validation split alone.

- :func:`grid_candidates`: every threshold set of a 2- or 3-exit model on a quantile grid of its validation
  confidences, each with its validation accuracy and predicted cost. The MSDNet sweep (``q``) spreads samples
  over the exits in fixed geometric proportions; a cascade of unequal members often wants another split (most
  samples out after the first member, almost none after the second), which the grid finds.
- :func:`search_cascades`: which trained static networks to chain. Every 2- and 3-member cascade of the static
  models, cheapest first, is scored on the validation split (member logits computed once, per-member
  temperatures, the grid above, the members' measured batch-1 latencies as the cost); the cascade to build is
  the one whose cheapest operating point reaching the target validation accuracy costs least (the frontier
  searches only the cascades that end with the best static model: ``last``). This is what a
  practitioner does with a zoo of trained models ("Wisdom of Committees", Wang et al., ICLR 2022), and it reads
  no test figure.
- :func:`with_paired_counts`: each candidate's wins and losses against a reference model on the same validation
  images, for the paired lower bound that ``select_on_validation`` applies with ``z > 0``.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..dynamic.budget import assign_exits, exit_scores, fit_temperatures
from .front import reaches_target, select_on_validation


def grid_candidates(val_scores: Tensor, val_correct: Tensor, cum_cost: Sequence[float], temperatures,
                    points: int = 41) -> list[dict]:
    """Threshold sets of a model with 2 or 3 exits on a ``points``-quantile grid of each non-final exit's
    validation confidence (``val_scores``, (K, N)); ``val_correct`` (K, N) says whether each exit is right, and
    ``cum_cost[k]`` is the cost of leaving at exit k. A sample leaves at the first exit whose confidence meets
    its threshold (``assign_exits``). Sets that send the same numbers of samples to each exit appear once.
    Returns ``_sweep_candidates``-shaped dicts; an empty list for other numbers of exits."""
    k_exits, n = val_scores.shape
    if k_exits not in (2, 3) or n == 0:
        return []
    if len(cum_cost) != k_exits:
        raise ValueError(f"need one cost per exit ({k_exits}), got {len(cum_cost)}")
    q = torch.linspace(0, 1, points, dtype=torch.float64)
    grids = [torch.quantile(val_scores[k].double(), q).unique() for k in range(k_exits - 1)]
    grids = [torch.cat([g, torch.tensor([float("inf")], dtype=torch.float64)]) for g in grids]   # "never"
    s, c = val_scores.double(), val_correct.double()
    cost = torch.as_tensor(list(cum_cost), dtype=torch.float64)
    leave0 = (s[0][None] >= grids[0][:, None]).double()                                 # (G0, N)
    if k_exits == 2:
        frac = torch.stack([leave0.mean(1), 1 - leave0.mean(1)], -1)                      # (G0, 2)
        acc = (leave0 * c[0] + (1 - leave0) * c[1]).mean(1)
        ths = [(float(t),) for t in grids[0]]
    else:
        leave1 = (s[1][None] >= grids[1][:, None]).double()                              # (G1, N)
        stay0 = 1 - leave0
        f0 = leave0.mean(1)[:, None].expand(-1, len(grids[1]))
        f1 = stay0 @ leave1.T / n                                                         # (G0, G1)
        frac = torch.stack([f0, f1, 1 - f0 - f1], -1).reshape(-1, 3)
        right = (leave0 * c[0]).sum(1)[:, None] + (stay0 * c[1]) @ leave1.T + (stay0 * c[2]) @ (1 - leave1).T
        acc = (right / n).reshape(-1)
        ths = [(float(a), float(b)) for a in grids[0] for b in grids[1]]
    val_cost = frac @ cost
    out, seen = [], set()
    for i, th in enumerate(ths):
        key = tuple(round(float(f) * n) for f in frac[i])
        if key in seen:
            continue
        seen.add(key)
        out.append({"q": None, "thresholds": list(th), "temperatures": list(temperatures),
                    "val_accuracy": float(acc[i]), "val_cost": float(val_cost[i]),
                    "val_exit_fractions": [float(f) for f in frac[i]]})
    return out


def with_paired_counts(candidates: Sequence[dict], val_scores: Tensor, val_correct: Tensor,
                       reference_correct: Tensor) -> list[dict]:
    """``candidates`` (dicts with ``thresholds``) of a model whose exits have validation confidences
    ``val_scores`` and correctness ``val_correct`` ((K, N) each), each with ``val_wins`` (images it gets right and
    the reference wrong), ``val_losses`` (the reverse) and ``val_n`` added; ``reference_correct`` (N,) says which
    validation images the reference model (the best static one) gets right."""
    ref = torch.as_tensor(reference_correct, dtype=torch.bool)
    if val_scores.shape != val_correct.shape or ref.shape != val_scores.shape[1:]:
        raise ValueError(f"need scores and correctness of shape (K, N) and a reference of shape (N,), got "
                         f"{tuple(val_scores.shape)}, {tuple(val_correct.shape)}, {tuple(ref.shape)}")
    cols = torch.arange(val_scores.shape[1])
    out = []
    for c in candidates:
        th = torch.tensor([*c["thresholds"], -math.inf], dtype=val_scores.dtype)
        right = val_correct[assign_exits(val_scores, th), cols].bool()
        out.append({**c, "val_wins": int((right & ~ref).sum()), "val_losses": int((~right & ref).sum()),
                    "val_n": len(ref)})
    return out


def committee_logits(logits: Sequence[Tensor]) -> list[Tensor]:
    """The exits of a fused cascade with its laterals untrained (:mod:`dyncnn.models.fused_cascade`): exit ``k``'s
    logits are the sum of the log-probabilities of members ``<= k``."""
    out, total = [], None
    for lg in logits:
        lp = torch.log_softmax(lg.double(), -1)
        total = lp if total is None else total + lp
        out.append(total)
    return out


def can_end_cascade(cost: Mapping[str, float], label: str) -> bool:
    """Whether some cascade of the models in ``cost`` ends with ``label``: members run cheapest first, so one that
    costs less must exist."""
    return any(c < cost[label] for c in cost.values())


def search_cascades(val_logits: Mapping[str, Tensor], val_targets: Tensor, cost: Mapping[str, float],
                    target_accuracy: float, max_members: int = 3, points: int = 21, z: float = 0.0,
                    reference: str | None = None, committee: bool = False, last: str | None = None) -> list[dict]:
    """Score every cascade of 2..``max_members`` of the given models (``val_logits``: label -> (N, C) validation
    logits; ``cost``: label -> latency of running that model on one image), members in increasing ``cost``;
    with ``last``, only the cascades that end with that model (the frontier passes its reference, the best static
    model on validation: the images no cheaper member is sure of then reach the network the cascade must match).

    Each cascade's operating point is chosen by :func:`~dyncnn.frontier.front.select_on_validation` among its
    :func:`grid_candidates` (exit cost = the running sum of its members' costs); with ``z > 0``, by the paired
    lower bound against the model labelled ``reference`` (whose validation accuracy is ``target_accuracy``).
    Returns one dict per cascade,
    ``{"members", "val_accuracy", "val_cost", "thresholds", "reaches"}``, best first: those that reach
    ``target_accuracy`` by increasing cost, then the others by decreasing accuracy. ``committee``: score each
    chain as the fused cascade's exits instead (exit ``k`` = the members' summed log-probabilities up to ``k``,
    :func:`committee_logits`; temperatures fitted per exit of each chain)."""
    if max_members < 2:
        raise ValueError(f"a cascade has at least 2 members, got max_members={max_members}")
    if set(val_logits) != set(cost):
        raise ValueError(f"need a cost for every model: logits for {sorted(val_logits)}, costs for {sorted(cost)}")
    if z > 0 and reference not in val_logits:
        raise ValueError(f"the paired rule (z={z}) needs the reference among the models {sorted(val_logits)}, "
                         f"got {reference!r}")
    if last is not None and last not in val_logits:
        raise ValueError(f"last={last!r} names none of the models {sorted(val_logits)}")
    if last is not None and not can_end_cascade(cost, last):
        raise ValueError(f"no cascade ends with {last!r}: it is the cheapest model ({cost[last]:g}); a cascade's "
                         f"members run cheapest first")
    labels = sorted(val_logits, key=lambda k: cost[k])
    y = torch.as_tensor(val_targets)
    temps = {k: fit_temperatures(val_logits[k][None], y)[0] for k in labels}
    scores = {k: exit_scores(val_logits[k][None], temperatures=[temps[k]])[0] for k in labels}
    correct = {k: val_logits[k].argmax(-1) == y for k in labels}
    rows = []
    for n in range(2, min(max_members, len(labels)) + 1):
        for combo in itertools.combinations(labels, n):
            if last is not None and combo[-1] != last:
                continue
            cum = list(itertools.accumulate(cost[k] for k in combo))
            if committee:
                exits = torch.stack(committee_logits([val_logits[k] for k in combo]))
                t_k = fit_temperatures(exits, y)
                s_k, c_k = exit_scores(exits, temperatures=t_k), exits.argmax(-1) == y
            else:
                t_k = [temps[k] for k in combo]
                s_k, c_k = torch.stack([scores[k] for k in combo]), torch.stack([correct[k] for k in combo])
            cands = grid_candidates(s_k, c_k, cum, t_k, points)
            if z > 0:
                cands = with_paired_counts(cands, s_k, c_k, correct[reference])
            best = select_on_validation(cands, target_accuracy, z)
            rows.append({"members": list(combo), "val_accuracy": best["val_accuracy"], "val_cost": best["val_cost"],
                         "thresholds": best["thresholds"], "reaches": reaches_target(best, target_accuracy, z)})
    return sorted(rows, key=lambda r: (not r["reaches"], r["val_cost"] if r["reaches"] else -r["val_accuracy"]))
