"""Training losses of multi-exit networks."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


class MultiExitLoss:
    """Weighted sum of the exits' cross-entropy, optionally distilling every early exit from the last one.

    loss = sum_k w_k CE(z_k, y) + alpha * T^2 * sum_{k<K} w_k KL(softmax(z_K / T) || softmax(z_k / T))
    (the last exit's output is detached as the teacher). Weights default to 1 per exit (MSDNet).
    """

    def __init__(self, weights: Sequence[float] | None = None, distill: float = 0.0, temperature: float = 3.0,
                 label_smoothing: float = 0.0):
        self.weights = list(weights) if weights is not None else None
        self.distill, self.temperature, self.label_smoothing = distill, temperature, label_smoothing

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
            teacher = F.softmax(outputs[-1].detach() / t, dim=1)
            kd = sum(w * F.kl_div(F.log_softmax(z / t, dim=1), teacher, reduction="batchmean")
                     for w, z in zip(weights[:-1], outputs[:-1]))
            loss = loss + self.distill * t * t * kd
        return loss
