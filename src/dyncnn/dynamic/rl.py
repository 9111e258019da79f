"""Reinforcement-learning helpers shared by the learned policies of dyncnn.

BlockDrop and SkipNet's fine-tuning use REINFORCE on Bernoulli decisions with a self-critical baseline; the
glance-and-focus policies (GFNet, AdaFocus) use PPO on a Gaussian patch location with discounted returns. The
helpers below are small, stateless functions (plus a rollout buffer) so that each model keeps its own loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributions import Bernoulli, Normal


# --- Bernoulli policies (BlockDrop, SkipNet) ---------------------------------------------------------------

def sample_bernoulli(probs: Tensor, explore: float = 0.0) -> tuple[Tensor, Tensor]:
    """Sample binary actions from ``probs`` (clamped to [explore, 1 - explore] for exploration, BlockDrop's
    ``alpha``); returns (actions, summed log-probability per sample)."""
    p = probs.clamp(explore, 1 - explore) if explore > 0 else probs
    dist = Bernoulli(probs=p.clamp(1e-6, 1 - 1e-6))
    actions = dist.sample()
    return actions, dist.log_prob(actions).sum(dim=-1)


def blockdrop_reward(actions: Tensor, correct: Tensor, gamma: float = 5.0) -> Tensor:
    """BlockDrop's reward: 1 - (blocks used / K)^2 when the prediction is correct, else -gamma."""
    used = actions.float().mean(dim=-1)
    return torch.where(correct.bool(), 1.0 - used ** 2, torch.full_like(used, -float(gamma)))


def reinforce_loss(log_prob: Tensor, reward: Tensor, baseline: Tensor | float = 0.0) -> Tensor:
    """REINFORCE with a baseline: -(reward - baseline) * log pi(a). With the self-critical baseline, the
    baseline is the reward of the policy's own greedy (thresholded) decision on the same sample."""
    advantage = (reward - baseline).detach()
    return -(advantage * log_prob).mean()


# --- Gaussian location policies and PPO (GFNet, AdaFocus) ---------------------------------------------------

def gaussian_log_prob(action: Tensor, mean: Tensor, std: float) -> Tensor:
    """Log-density of ``action`` under N(mean, std^2 I), summed over the last axis."""
    return Normal(mean, std).log_prob(action).sum(dim=-1)


def sample_gaussian(mean: Tensor, std: float, low: float = 0.0, high: float = 1.0) -> tuple[Tensor, Tensor]:
    """Sample a location around ``mean`` (GFNet: std 0.1 in training), clipped to [low, high]; returns
    (action, log-probability of the unclipped sample)."""
    raw = mean + std * torch.randn_like(mean)
    return raw.clamp(low, high), gaussian_log_prob(raw, mean, std)


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Returns G_t = sum_k gamma^k r_{t+k} for rewards of shape (T, N) (time first)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def ppo_loss(new_log_prob: Tensor, old_log_prob: Tensor, advantage: Tensor, clip: float = 0.2) -> Tensor:
    """PPO's clipped surrogate objective (negated, to minimise)."""
    ratio = torch.exp(new_log_prob - old_log_prob.detach())
    adv = advantage.detach()
    return -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


@dataclass
class RolloutBuffer:
    """Transitions of a recurrent policy collected over T steps for a batch, for PPO updates.

    Each ``add`` stores one step: the policy's inputs (``states``: any tensors the model needs to recompute the
    action distribution, detached), the action, its log-probability, the critic's value and the reward.
    """
    states: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    log_probs: list = field(default_factory=list)
    values: list = field(default_factory=list)
    rewards: list = field(default_factory=list)

    def add(self, state, action: Tensor, log_prob: Tensor, value: Tensor, reward: Tensor) -> None:
        detach = (lambda t: t.detach() if isinstance(t, Tensor) else t)
        self.states.append(tuple(detach(s) for s in state) if isinstance(state, tuple) else detach(state))
        self.actions.append(action.detach())
        self.log_probs.append(log_prob.detach())
        self.values.append(value.detach())
        self.rewards.append(reward.detach())

    def __len__(self) -> int:
        return len(self.rewards)

    def returns_and_advantages(self, gamma: float) -> tuple[Tensor, Tensor]:
        """(returns, advantages), both (T, N); the advantage is the return minus the critic's value,
        normalised to zero mean and unit variance (the usual PPO practice)."""
        returns = discounted_returns(torch.stack(self.rewards), gamma)
        adv = returns - torch.stack(self.values)
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8) if adv.numel() > 1 else adv
        return returns, adv

    def clear(self) -> None:
        for lst in (self.states, self.actions, self.log_probs, self.values, self.rewards):
            lst.clear()


def entropy_bernoulli(probs: Tensor) -> Tensor:
    """Mean entropy of Bernoulli decisions (an exploration bonus)."""
    p = probs.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log()).mean()


def gaussian_entropy(std: float, dims: int) -> float:
    return dims * (0.5 * math.log(2 * math.pi * math.e) + math.log(std))
