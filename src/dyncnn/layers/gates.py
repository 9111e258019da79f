"""Hard gates for dynamic networks: straight-through Gumbel in training, a deterministic threshold at inference,
and the cost losses that push a network towards a MAC budget.

Every gated mechanism of dyncnn (layer skipping, channel gating, pixel masks, skipping RNNs) makes binary or
one-of-n decisions. In training the decision must carry a gradient: the forward pass uses the hard 0/1 value and
the backward pass the gradient of a relaxed (Gumbel) sample, the straight-through estimator. At inference the
decision is deterministic: ``logit >= 0`` (probability >= 0.5) for a binary gate, ``argmax`` for a choice among n.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_budget(budget: float, name: str = "budget") -> float:
    """A MAC budget is a fraction of the full network's MACs in (0, 1]."""
    b = float(budget)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"{name} must be a fraction of the full MACs in (0, 1], got {budget!r}")
    return b


def _check_tau(tau: float) -> float:
    if not tau > 0:
        raise ValueError(f"the Gumbel temperature must be > 0, got {tau!r}")
    return float(tau)


def gumbel_sigmoid(logits: Tensor, tau: float = 1.0, hard: bool = True, noise: bool = True) -> Tensor:
    """Binary Gumbel-sigmoid sample of ``sigmoid(logits)``.

    With ``hard`` the forward value is exactly 0 or 1 and the gradient is that of the relaxed sample
    (straight-through). ``noise=False`` drops the logistic noise (a deterministic relaxation).
    """
    tau = _check_tau(tau)
    if noise:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)      # logistic noise = difference of two Gumbels
    soft = torch.sigmoid(logits / tau)
    if not hard:
        return soft
    return (soft >= 0.5).to(soft.dtype) - soft.detach() + soft


def gumbel_softmax(logits: Tensor, tau: float = 1.0, hard: bool = True, dim: int = -1) -> Tensor:
    """One-of-n straight-through Gumbel-softmax sample (``torch.nn.functional.gumbel_softmax``)."""
    return F.gumbel_softmax(logits, tau=_check_tau(tau), hard=hard, dim=dim)


class HardGate(nn.Module):
    """Turns gate logits into decisions: straight-through Gumbel-sigmoid in training, ``logits >= 0`` in eval.

    ``tau`` may be annealed during training (``set_tau``; models do it from ``set_progress``). ``force`` pins
    every decision on (``True``) or off (``False``), e.g. to reproduce the static backbone.
    """

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = _check_tau(tau)
        self.force: bool | None = None

    def set_tau(self, tau: float) -> None:
        self.tau = _check_tau(tau)

    def forward(self, logits: Tensor) -> Tensor:
        if self.force is not None:
            return torch.full_like(logits, float(self.force))
        if self.training:
            return gumbel_sigmoid(logits, self.tau, hard=True)
        return (logits >= 0).to(logits.dtype)


def anneal(progress: float, start: float, end: float) -> float:
    """Geometric interpolation from ``start`` (progress 0) to ``end`` (progress 1), e.g. for a temperature."""
    p = min(max(float(progress), 0.0), 1.0)
    return start * (end / start) ** p


def budget_loss(used: Tensor, full: Tensor | float, budget: float) -> Tensor:
    """Network-level cost loss: (mean used fraction - budget)^2.

    ``used`` holds the MACs (or any cost) each sample used in training (differentiable through the gates);
    ``full`` the cost of the full network.
    """
    budget = check_budget(budget)
    frac = used.float().mean() / float(full)
    return (frac - budget) ** 2


def layer_bounds_loss(fractions: Sequence[Tensor], budget: float, progress: float = 1.0,
                      start_slack: float = 1.0) -> Tensor:
    """DynConv's per-layer bounds: each layer's mean used fraction is pushed into [lower, upper], where the bounds
    start wide (``budget -/+ start_slack``) and anneal to the budget itself as ``progress`` goes 0 -> 1 (a cosine
    schedule). Keeps any single layer from collapsing to all-on or all-off early in training.
    """
    budget = check_budget(budget)
    slack = start_slack * 0.5 * (1 + torch.cos(torch.tensor(min(max(progress, 0.0), 1.0) * torch.pi))).item()
    lower, upper = max(budget - slack, 0.0), min(budget + slack, 1.0)
    loss = torch.zeros(())
    for f in fractions:
        f = f.float().mean()
        loss = loss + (F.relu(f - upper) ** 2 + F.relu(lower - f) ** 2)
    return loss / max(len(fractions), 1)
