"""The arithmetic of the accuracy-latency comparison, kept apart from training and timing so it is unit-tested.

- :func:`pareto_front`: the static models that no other static model beats on both latency and accuracy.
- :func:`front_latency_at`: the static front's latency at an accuracy, interpolated linearly in log-latency
  between the two front points around it (latency grows roughly geometrically with accuracy along a family).
- :func:`speedup_at_equal_accuracy`: the figure of merit. The dynamic model is compared with what the static
  front needs for the accuracy the dynamic model really reached on the test split, capped at the best static
  accuracy A*: a dynamic model less accurate than A* is compared with the (faster) static model of its own
  accuracy, never with the best one.
- :func:`best_on_validation`: the reference model A* is chosen by: the static model with the best validation
  accuracy, a tie broken by the lower validation loss.
- :func:`select_on_validation`: an operating point is chosen on the validation split alone (the cheapest that
  reaches the target), then measured once on the test split. "Reaches" is, by default in ``frontier``, a paired
  lower confidence bound on its validation accuracy minus the reference's (:func:`paired_lower_bound`): the
  cheapest of many candidates whose point estimate just meets the target is mostly a lucky one (the winner's
  curse: -0.7 to -0.9 points from validation to test with 35-120 candidates on 1,000 validation images).
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


def best_on_validation(models: dict[str, dict]) -> str:
    """The label of the best of ``models`` (label -> ``{"val_accuracy", "val_loss"}``): the highest validation
    accuracy; among models tied on it, the lowest validation loss (mean cross-entropy), the finer figure of the
    same images (two networks tied on 938 of 1,000 validation digits in a headline run trained 10 epochs); then
    the first (results written before the loss was kept have none: their ties go to the first)."""
    if not models:
        raise ValueError("no models to choose the best of")
    return max(models, key=lambda k: (models[k]["val_accuracy"], -models[k].get("val_loss", math.inf)))


#: The frontier's default ``z`` of the paired rule (``FrontierSettings.selection_z``; 0 is the point rule). Chosen
#: on validation data alone by ``benchmarks/bench_selection.py`` (choose on half of the validation digits, score on
#: the other half), see docs/choosing.md.
SELECTION_Z = 1.0


def paired_lower_bound(accuracy_gap: float, wins: int, losses: int, n: int, z: float) -> float:
    """One-sided lower confidence bound on a candidate's accuracy minus a reference's, both scored on the same
    ``n`` images: ``accuracy_gap`` (= (wins - losses) / n) less ``z`` standard errors of the paired difference
    (McNemar's setting: only the discordant images, ``wins`` where the candidate alone is right and ``losses``
    where the reference alone is, carry information; se^2 = ((wins + losses) / n - gap^2) / n). A candidate that
    agrees with the reference on every image (its full depth, when the reference is its last member) has gap 0
    and se 0."""
    if n <= 0 or wins < 0 or losses < 0 or wins + losses > n:
        raise ValueError(f"need 0 <= wins + losses <= n, n > 0; got wins={wins}, losses={losses}, n={n}")
    if z < 0:
        raise ValueError(f"the bound's z must be >= 0, got {z}")
    var = max((wins + losses) / n - ((wins - losses) / n) ** 2, 0.0) / n
    return accuracy_gap - z * math.sqrt(var)


def reaches_target(candidate: dict, target_accuracy: float, z: float = 0.0) -> bool:
    """Whether ``candidate`` counts as reaching ``target_accuracy`` (the reference's validation accuracy):
    ``z = 0``, its validation accuracy is at least the target (the point rule); ``z > 0``, the paired lower
    bound (:func:`paired_lower_bound`) on its validation accuracy minus the target is at least 0, which needs
    ``val_wins``, ``val_losses`` and ``val_n`` in the candidate (:func:`~dyncnn.frontier.search.paired_counts`)."""
    gap = candidate["val_accuracy"] - target_accuracy
    if z == 0:
        return gap >= -1e-12
    missing = [k for k in ("val_wins", "val_losses", "val_n") if k not in candidate]
    if missing:
        raise ValueError(f"the paired rule (z={z}) needs {missing} in every candidate (counts against the "
                         "reference on the validation images); z=0 is the point rule")
    return paired_lower_bound(gap, candidate["val_wins"], candidate["val_losses"], candidate["val_n"], z) >= -1e-12


def select_on_validation(candidates: Sequence[dict], target_accuracy: float, z: float = 0.0) -> dict:
    """The cheapest candidate (``{"val_accuracy", "val_cost", ...}``) that reaches ``target_accuracy``
    (:func:`reaches_target`: with ``z > 0``, by a paired lower confidence bound against the reference, so that a
    candidate lucky on the validation images is not taken); when none does, the most accurate one (ties: the
    cheaper). Test figures are not read."""
    if not candidates:
        raise ValueError("no operating points to choose from")
    reaching = [c for c in candidates if reaches_target(c, target_accuracy, z)]
    if reaching:
        return min(reaching, key=lambda c: (c["val_cost"], -c["val_accuracy"]))
    return max(candidates, key=lambda c: (c["val_accuracy"], -c["val_cost"]))
