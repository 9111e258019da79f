"""Training losses of multi-exit networks."""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


TEACHERS = ("last", "next")


class MultiExitLoss:
    """Weighted sum of the exits' cross-entropy, optionally distilling every early exit from a later one.

    loss = sum_k w_k CE(z_k, y) + alpha * T^2 * sum_{k<K} w_k KL(softmax(z_t(k) / T) || softmax(z_k / T))

    with the teacher's logits z_t(k) detached: the last exit for ``teacher="last"`` (t(k) = K, the one-for-all
    distillation of IMTA's official code), the next exit for ``teacher="next"`` (t(k) = k + 1: each exit learns
    from the one just deeper, the chain of IMTA's inline subnetwork collaboration as the lecture presents it).
    Weights default to 1 per exit (MSDNet). ``alpha`` is ``distill``.
    """

    def __init__(self, weights: Sequence[float] | None = None, distill: float = 0.0, temperature: float = 3.0,
                 label_smoothing: float = 0.0, teacher: str = "last"):
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        if not (math.isfinite(distill) and distill >= 0):
            raise ValueError(f"distill must be a finite number >= 0, got {distill!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.weights = list(weights) if weights is not None else None
        self.distill, self.temperature, self.label_smoothing = distill, temperature, label_smoothing
        self.teacher = teacher

    def __call__(self, outputs, target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            outputs = [outputs]
        weights = self.weights or [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} exit weights for {len(outputs)} exits")
        loss = sum(w * F.cross_entropy(z, target, label_smoothing=self.label_smoothing)
                   for w, z in zip(weights, outputs))
        if self.distill > 0 and len(outputs) > 1:
            t = self.temperature
            teachers = outputs[1:] if self.teacher == "next" else [outputs[-1]] * (len(outputs) - 1)
            kd = sum(w * F.kl_div(F.log_softmax(z / t, dim=1), F.softmax(z_t.detach() / t, dim=1),
                                  reduction="batchmean")
                     for w, z, z_t in zip(weights[:-1], outputs[:-1], teachers))
            loss = loss + self.distill * t * t * kd
        return loss

    def __repr__(self) -> str:
        return (f"MultiExitLoss(weights={self.weights}, distill={self.distill}, temperature={self.temperature}, "
                f"label_smoothing={self.label_smoothing}, teacher={self.teacher!r})")
