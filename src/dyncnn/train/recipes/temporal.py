"""Training of temporally adaptive models: AdaFocus's three stages and its PPO patch policy (the recipe
:func:`dyncnn.train.recipes.fit_model` runs for :class:`~dyncnn.models.adafocus.AdaFocus`).

GFNet and AdaFocus train in stages because a policy cannot learn where to look before the encoders can make use
of what they see:

1. **random patches**: glance network, local network and classifier learn on uniformly random patches (mean
   cross-entropy over the per-frame logits);
2. **policy**: ``policy="ppo"``: encoders and classifier frozen, the Gaussian patch policy (std 0.1) learns by PPO
   with the reward "gain in true-class probability from one frame to the next" (gamma 0.7, clip 0.2, Adam 3e-4);
   ``policy="differentiable"`` (AdaFocusV2): everything trains end to end through the bilinear crop instead;
3. **fine-tuning**: the glance network and the policy frozen, the local network and classifier adapt to the
   patches the learned policy picks (its mean).

Each Trainer-driven stage writes to ``out_dir/stage{k}`` and the final model to ``out_dir/last.safetensors`` (a
normal checkpoint: ``dyncnn eval OUT`` rebuilds it by name).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ...dynamic.rl import RolloutBuffer, gaussian_log_prob
from ...models.adafocus import AdaFocus
from ..checkpoint import load_checkpoint, save_checkpoint
from ..trainer import TrainConfig, Trainer, TrainResult, epoch_batches
from . import collate, register_recipe
from .ppo import PPOSettings, ppo_update, progress_rewards


@dataclass
class AdaFocusStages:
    random_epochs: int | None = None    # stage 1; None: the TrainConfig's epochs
    policy_epochs: int = 1              # stage 2 (PPO epochs over the data, or end-to-end epochs)
    finetune_epochs: int = 1            # stage 3
    ppo_lr: float = 3e-4
    gamma: float = 0.7
    clip: float = 0.2
    ppo_updates: int = 2                # PPO optimisation epochs per rollout batch
    value_coef: float = 0.5
    finetune_lr_scale: float = 0.1      # stage-3 learning rate = this x the TrainConfig's

    @property
    def ppo(self) -> PPOSettings:
        return PPOSettings(self.ppo_lr, self.gamma, self.clip, self.ppo_updates, self.value_coef)

    def __post_init__(self):
        if min(self.policy_epochs, self.finetune_epochs, self.ppo_updates) < 0 or \
                (self.random_epochs is not None and self.random_epochs < 0):
            raise ValueError("stage epochs and ppo_updates must be >= 0")


def ppo_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             stages: AdaFocusStages) -> dict:
    """One PPO round on a batch: a Gaussian rollout with everything frozen, then ``ppo_updates`` clipped-surrogate
    updates of the actor and critic (re-running only the small recurrent policy on the stored glance features)."""
    with torch.no_grad():
        logits, ro = model.dense(x, "gaussian")
    rewards = progress_rewards(logits, y)                                # (T, N)
    old_logp = gaussian_log_prob(ro["actions"], ro["means"], model.std).T          # (T, N)
    buffer = RolloutBuffer()
    for k in range(rewards.shape[0]):
        buffer.add(ro["glance"][:, k], ro["actions"][:, k], old_logp[k], ro["values"][:, k], rewards[k])

    def reevaluate():        # the small recurrent policy again on the stored glance features
        means, values = model.actor_sequence(ro["glance"])
        return gaussian_log_prob(ro["actions"], means, model.std).T, values.T
    loss = ppo_update(optimizer, reevaluate, buffer, stages.ppo)
    return {"reward": float(rewards.sum(0).mean()), "loss": loss,
            "acc": float((logits[-1].argmax(1) == y).float().mean())}


def train_policy_ppo(model: nn.Module, train_set: Dataset, stages: AdaFocusStages, batch_size: int, seed: int = 0,
                     progress: bool = False) -> list[dict]:
    """Stage 2 (PPO): only ``model.policy_parameters()`` change; batch norms stay in eval mode."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    params = model.policy_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=stages.ppo_lr)
    model.eval()
    history = []
    start = time.perf_counter()
    try:
        torch.manual_seed(seed + 7)
        for epoch in range(stages.policy_epochs):
            stats = [ppo_step(model, optimizer, *collate(train_set, b), stages)
                     for b in epoch_batches(len(train_set), batch_size, seed, 1000 + epoch)]
            rec = {"epoch": epoch + 1, "stage": 2, **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
                   "seconds": time.perf_counter() - start}
            history.append(rec)
            if progress:
                print(f"ppo epoch {epoch + 1}/{stages.policy_epochs}: return {rec['reward']:.4f} "
                      f"train acc {rec['acc']:.4f} {rec['seconds']:.0f}s", flush=True)
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    return history


def _freeze(modules: list[nn.Module]) -> list[tuple[nn.Parameter, bool]]:
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


@register_recipe(AdaFocus)
def fit_adafocus(model: AdaFocus, train_set: Dataset, val_set: Dataset | None, config: TrainConfig,
                 out_dir: str | Path | None = None, resume: bool = False, extra: dict | None = None,
                 stages: AdaFocusStages | None = None) -> TrainResult:
    """The three stages (module docstring). ``config`` is stage 1's; later stages derive theirs from it."""
    stages = stages or AdaFocusStages()
    out = Path(out_dir) if out_dir is not None else None
    sub = (lambda k: out / f"stage{k}") if out is not None else (lambda k: None)
    history: list[dict] = []
    steps, start = 0, time.perf_counter()
    e1 = config.epochs if stages.random_epochs is None else stages.random_epochs
    if e1:
        model.train_mode = "random"
        r = Trainer(model, train_set, val_set, replace(config, epochs=e1), sub(1), extra=extra).fit(resume)
        history += [{**h, "stage": 1} for h in r.history]
        steps += r.steps
    if stages.policy_epochs:
        if model.policy == "ppo":
            done = out is not None and resume and (sub(2) / "last.safetensors").exists()
            if done:
                load_checkpoint(sub(2) / "last.safetensors", model)
            else:
                h2 = train_policy_ppo(model, train_set, stages, config.batch_size, config.seed, config.progress)
                history += h2
                if out is not None:
                    save_checkpoint(sub(2) / "last.safetensors", model, None, {"stage": 2, "history": h2}, extra)
        else:
            model.train_mode = "differentiable"
            r = Trainer(model, train_set, val_set, replace(config, epochs=stages.policy_epochs), sub(2),
                        extra=extra).fit(resume)
            history += [{**h, "stage": 2} for h in r.history]
            steps += r.steps
    result = None
    if stages.finetune_epochs:
        model.train_mode = "mean"
        saved = _freeze([model.glance, model.actor, model.critic])
        try:
            cfg3 = replace(config, epochs=stages.finetune_epochs, lr=config.lr * stages.finetune_lr_scale,
                           warmup_epochs=0.0)
            result = Trainer(model, train_set, val_set, cfg3, sub(3), extra=extra).fit(resume)
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
        history += [{**h, "stage": 3} for h in result.history]
        steps += result.steps
    final = next((h["val_acc"] for h in reversed(history) if "val_acc" in h), float("nan"))
    best = max((h["val_acc"] for h in history if "val_acc" in h), default=float("nan"))
    if out is not None:
        save_checkpoint(out / "last.safetensors", model, None,
                        {"step": steps, "epoch": len(history), "history": history, "config": asdict(config),
                         "stages": asdict(stages)}, extra)
    return TrainResult(history=history, best_val_acc=best, final_val_acc=final, steps=steps,
                       seconds=time.perf_counter() - start)
