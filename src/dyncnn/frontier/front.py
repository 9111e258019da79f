"""The arithmetic of the accuracy-latency comparison, kept apart from training and timing so it is unit-tested.

- :func:`pareto_front`: the static models that no other static model beats on both latency and accuracy.
- :func:`front_latency_at`: the static front's latency at an accuracy, interpolated linearly in log-latency
  between the two front points around it (latency grows roughly geometrically with accuracy along a family).
- :func:`speedup_at_equal_accuracy`: the figure of merit. The dynamic model is compared with what the static
  front needs for the accuracy the dynamic model really reached on the test split, capped at the best static
  accuracy A*: a dynamic model less accurate than A* is compared with the (faster) static model of its own
  accuracy, never with the best one.
- :func:`select_on_validation`: an operating point is chosen on the validation split alone (the cheapest whose
  validation accuracy reaches the target), then measured once on the test split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Point:
    """One operating point: ``latency`` (ms per image, or MACs) and ``accuracy``; ``label`` names it."""
    latency: float
    accuracy: float
    label: str = ""


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points not dominated by another (lower or equal latency and higher accuracy), by increasing latency.

    Along the returned front, latency and accuracy both increase strictly.
    """
    if not points:
        raise ValueError("the static front needs at least one point")
    for p in points:
        if not (p.latency > 0 and math.isfinite(p.latency)) or not 0 <= p.accuracy <= 1:
            raise ValueError(f"a front point needs a positive finite latency and an accuracy in [0, 1], got {p}")
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.latency, -p.accuracy)):
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


def front_latency_at(front: Sequence[Point], accuracy: float) -> float:
    """Latency the static ``front`` needs to reach ``accuracy``.

    Below the front's cheapest point it is that point's latency (no static model is cheaper); between two front
    points, linear in log-latency; above the best static accuracy it is undefined (``ValueError``).
    """
    front = pareto_front(front)
    if accuracy <= front[0].accuracy:
        return front[0].latency
    if accuracy > front[-1].accuracy + 1e-12:
        raise ValueError(f"accuracy {accuracy:.4f} is above the best static accuracy {front[-1].accuracy:.4f}")
    for lo, hi in zip(front, front[1:]):
        if lo.accuracy <= accuracy <= hi.accuracy:
            t = (accuracy - lo.accuracy) / (hi.accuracy - lo.accuracy)
            return math.exp(math.log(lo.latency) + t * (math.log(hi.latency) - math.log(lo.latency)))
    return front[-1].latency


@dataclass(frozen=True)
class Speedup:
    speedup: float             # static front latency at the compared accuracy / dynamic latency
    compared_at: float         # the accuracy at which the front is read: min(dynamic accuracy, A*)
    best_static: float         # A*
    accuracy_gap: float        # dynamic accuracy - A* (negative: less accurate than the best static model)
    static_latency: float
    dynamic_latency: float


def speedup_at_equal_accuracy(front: Sequence[Point], dynamic: Point) -> Speedup:
    """The figure of merit of one dynamic operating point against the static front (see module doc)."""
    front = pareto_front(front)
    best = front[-1].accuracy
    at = min(dynamic.accuracy, best)
    static = front_latency_at(front, at)
    if not dynamic.latency > 0:
        raise ValueError(f"the dynamic latency must be positive, got {dynamic.latency}")
    return Speedup(static / dynamic.latency, at, best, dynamic.accuracy - best, static, dynamic.latency)


def select_on_validation(candidates: Sequence[dict], target_accuracy: float) -> dict:
    """The cheapest candidate (``{"val_accuracy", "val_cost", ...}``) whose validation accuracy reaches
    ``target_accuracy``; when none does, the most accurate one (ties: the cheaper). Test figures are not read."""
    if not candidates:
        raise ValueError("no operating points to choose from")
    reaching = [c for c in candidates if c["val_accuracy"] >= target_accuracy - 1e-12]
    if reaching:
        return min(reaching, key=lambda c: (c["val_cost"], -c["val_accuracy"]))
    return max(candidates, key=lambda c: (c["val_accuracy"], -c["val_cost"]))
