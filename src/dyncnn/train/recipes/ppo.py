"""The one PPO of the staged glance recipes (GFNet's patch policy, AdaFocus's per-frame policy).

Both learn a Gaussian patch location (std 0.1) with the reward "gain in the true class's probability from the
previous step", discounted returns (gamma 0.7), a clipped surrogate (clip 0.2) and a value loss, Adam at 3e-4, a
few passes over each rollout (the published settings). What differs is only how a family rolls out its steps and
re-evaluates the stored actions; :func:`ppo_update` is the rest, shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...dynamic.rl import RolloutBuffer, ppo_loss


@dataclass(frozen=True)
class PPOSettings:
    lr: float = 3e-4
    gamma: float = 0.7
    clip: float = 0.2
    updates: int = 2            # optimisation passes over each rollout
    value_coef: float = 0.5


def progress_rewards(logits: list[Tensor], target: Tensor) -> Tensor:
    """GFNet / AdaFocus reward (T, N): the gain in true-class probability from the previous step (the first step
    gains over chance, 1 / classes)."""
    p = torch.stack([F.softmax(z.float(), 1).gather(1, target[:, None]).squeeze(1) for z in logits])
    prev = torch.cat([torch.full_like(p[:1], 1.0 / logits[0].shape[1]), p[:-1]])
    return p - prev


def ppo_update(optimizer: torch.optim.Optimizer, reevaluate: Callable[[], tuple[Tensor, Tensor]],
               buffer: RolloutBuffer, settings: PPOSettings) -> float:
    """``settings.updates`` clipped-surrogate + value-loss steps on one rollout. ``reevaluate()`` runs the policy
    again on the stored states and returns the new log-probabilities of the stored actions and the critic's
    values, both (T, N) like the buffer's rewards. Returns the last loss."""
    returns, adv = buffer.returns_and_advantages(settings.gamma)
    old = torch.stack(buffer.log_probs)
    loss = torch.zeros(())
    for _ in range(settings.updates):
        new_logp, values = reevaluate()
        loss = ppo_loss(new_logp, old, adv, settings.clip) + settings.value_coef * F.mse_loss(values, returns)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())
