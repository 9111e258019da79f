"""SkipNet's hybrid reinforcement-learning stage (Wang et al., ECCV 2018), after the supervised training of the
gates (see :mod:`dyncnn.models.skipnet`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ...dynamic.rl import reinforce_loss, sample_bernoulli
from ...models.skipnet import SkipNet
from . import collate


def reinforce_finetune(model: SkipNet, train_set: Dataset, steps: int, batch_size: int = 64, lr: float = 1e-3,
                       cost_weight: float | None = None, explore: float = 0.1, finetune_backbone: bool = True,
                       seed: int = 0) -> list[dict]:
    """SkipNet's hybrid reinforcement-learning stage: the gate decisions are sampled from
    Bernoulli(sigmoid(logit)) (mixed with ``explore`` towards 1/2), the reward of a sample is
    ``-CE - cost_weight * (its MACs / full MACs)``, the baseline is the reward of the thresholded gates on the
    same sample (self-critical), and the cross-entropy also trains the backbone when ``finetune_backbone``.
    Adam on the trainable parameters; returns one record (mean reward, used fraction) per step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not 0.0 <= explore < 0.5:
        raise ValueError(f"explore must be in [0, 0.5), got {explore}")
    lam = model.cfg.cost_weight if cost_weight is None else float(cost_weight)
    params = [p for n, p in model.named_parameters() if finetune_backbone or not n.startswith("backbone.")]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        x, y = collate(train_set, torch.randint(len(train_set), (batch_size,), generator=g).tolist())
        full = float(model.full_macs(x))
        model.train()
        logits_of, logps = model.gate_logits(), []

        def sample(j: int, h: Tensor) -> Tensor:
            p = torch.sigmoid(logits_of(j, h)).unsqueeze(1)
            a, lp = sample_bernoulli((1 - 2 * explore) * p + explore)
            logps.append(lp)
            return a.squeeze(1)
        logits, _, used = model._dense(x, sample)
        ce = F.cross_entropy(logits, y, reduction="none")
        reward = -ce.detach() - lam * used.detach() / full
        model.eval()
        with torch.no_grad():
            greedy_of = model.gate_logits()
            b_logits, _, b_used = model._dense(x, lambda j, h: (greedy_of(j, h) >= 0).float())
            baseline = -F.cross_entropy(b_logits, y, reduction="none") - lam * b_used / full
        model.train()
        loss = reinforce_loss(torch.stack(logps, 1).sum(1), reward, baseline)
        if finetune_backbone:
            loss = loss + ce.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"reward": float(reward.mean()), "macs_fraction": float(used.mean()) / full})
    model.eval()
    return history
