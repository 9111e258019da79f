"""GFNet's three training stages (Wang et al. 2020): the recipe :func:`dyncnn.train.recipes.fit_model` runs for
:class:`~dyncnn.models.gfnet.GFNet`.

- Stage I: encoders + recurrent classifier on uniformly random patches, loss = mean cross-entropy over the steps
  (a plain :class:`~dyncnn.train.Trainer` run: GFNet's training forward returns the per-step logits).
- Stage II: encoders and classifier fixed, PPO on the recurrent actor-critic policy. The reward of moving to a
  patch is the gain in the true class's softmax probability from the previous step; discounted returns with
  gamma 0.7, clipped surrogate with clip 0.2, Adam with lr 3e-4, Gaussian actions with std 0.1 (the published
  settings). The action's log-probability is that of the unclipped sample; the patch is cropped at the clipped one.
  When the training data knows where its objects are (``dyncnn.data.canvas.digit_centers``), the policy is first
  warm-started for ``locate_epochs`` by regressing those positions (:func:`locate_step`), then PPO refines it.
- Stage III: the local encoder and the classifier are fine-tuned with the learned (mean) policy (a Trainer run).

Each stage writes its checkpoints to ``out_dir/stage{1,2,3}`` and resumes from them; the final model is saved as
``out_dir/last.safetensors`` (``dyncnn eval`` / ``calibrate`` / ``export`` read it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ...dynamic.patches import crop_patches
from ...dynamic.rl import RolloutBuffer, gaussian_log_prob
from ...errors import DyncnnError
from ...models.gfnet import GFNet
from ..checkpoint import load_checkpoint, save_checkpoint
from ..trainer import TrainConfig, Trainer, TrainResult, epoch_batches, evaluate
from . import collate, register_recipe
from .ppo import PPOSettings, ppo_update


@dataclass(frozen=True)
class GlanceStagesConfig:
    """Stage II / III settings; ``None`` epochs mean half of stage I's (at least one)."""
    ppo_epochs: int | None = None
    locate_epochs: int = 1                  # supervised policy warm-start epochs (data with object positions)
    locate_lr: float = 3e-3
    finetune_epochs: int | None = None
    finetune_lr_scale: float = 0.1          # stage III lr = stage I lr x this
    ppo_lr: float = 3e-4
    gamma: float = 0.7
    clip: float = 0.2
    ppo_updates: int = 2                    # PPO passes over each rollout
    value_coef: float = 0.5

    @property
    def ppo(self) -> PPOSettings:
        return PPOSettings(self.ppo_lr, self.gamma, self.clip, self.ppo_updates, self.value_coef)

    @classmethod
    def from_extra(cls, extra: dict | None) -> "GlanceStagesConfig":
        opts = dict((extra or {}).get("gfnet") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise DyncnnError(f"unknown GFNet stage options {unknown}; expected some of {sorted(known)}")
        return cls(**opts)


def ppo_step(model, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, cfg: GlanceStagesConfig) -> dict:
    """One PPO update of ``model.policy`` on a batch: roll out the steps with sampled patch centres (encoders and
    classifier frozen, no gradient), then ``cfg.ppo_updates`` clipped-surrogate + value-loss passes."""
    std, p, side = model.cfg.std, model.cfg.patch_size, x.shape[-1]
    buf = RolloutBuffer()
    with torch.no_grad():
        n = x.shape[0]
        h, hp = x.new_zeros(n, model.cfg.hidden_dim), x.new_zeros(n, model.cfg.policy_dim)
        s = model.glance_step(x, h)
        prob = torch.softmax(s["logits"], 1).gather(1, y[:, None]).squeeze(1)
        first = prob
        for k in range(1, model.num_steps):
            state = (s["feat"], s["where"], hp)
            mean, hp = model.policy(*state)
            value = model.policy.value(hp)
            raw = mean + std * torch.randn_like(mean)
            log_prob = gaussian_log_prob(raw, mean, std)
            center = raw.clamp(0, 1)
            last = k == model.num_steps - 1
            s = model.focus_step(crop_patches(x, center, p), s["h"],
                                 None if last else model.patch_origin(center, side), side)
            new_prob = torch.softmax(s["logits"], 1).gather(1, y[:, None]).squeeze(1)
            buf.add(state, raw, log_prob, value, new_prob - prob)
            prob = new_prob

    def reevaluate():        # the policy again on the stored states: each step's log-probability and value
        new_lp, values = [], []
        for t, (f, w, h0) in enumerate(buf.states):
            mean, hp_t = model.policy(f, w, h0)
            new_lp.append(gaussian_log_prob(buf.actions[t], mean, std))
            values.append(model.policy.value(hp_t))
        return torch.stack(new_lp), torch.stack(values)
    loss = ppo_update(optimizer, reevaluate, buf, cfg.ppo)
    return {"loss": loss, "gain": float((prob - first).mean())}


def locate_step(model, x: Tensor, digit_centers: Tensor, optimizer: torch.optim.Optimizer) -> dict:
    """Supervised warm-start of the policy before PPO (a stage-II "teacher" from the data's object positions):
    the locator's soft-argmax regresses the object centre (on the glance and on every focus patch but the last)
    and every chosen patch centre regresses the centre that puts the object in the middle of the patch. PPO then
    starts from a policy that looks at the object instead of at a random place (its reward gain per epoch is far
    too small to find it from scratch in a few epochs)."""
    p, side = model.cfg.patch_size, x.shape[-1]
    target = ((digit_centers * side - p / 2) / (side - p)).clamp(0, 1) if side > p else digit_centers * 0 + 0.5
    n = x.shape[0]
    h, hp = x.new_zeros(n, model.cfg.hidden_dim), x.new_zeros(n, model.cfg.policy_dim)
    s = model.glance_step(x, h)
    loss = F.mse_loss(s["where"], digit_centers)
    err = []
    for k in range(1, model.num_steps):
        center, hp = model.policy(s["feat"], s["where"], hp)
        loss = loss + F.mse_loss(center, target)
        err.append((center.detach() - target).abs().amax(1).mul(side - p).mean())
        last = k == model.num_steps - 1
        c = center.detach()
        s = model.focus_step(crop_patches(x, c, p), s["h"], None if last else model.patch_origin(c, side), side)
        if not last:
            loss = loss + F.mse_loss(s["where"], digit_centers)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), "pixel_error": float(torch.stack(err).mean())}


def _digit_centers(dataset) -> Tensor | None:
    from ...data.canvas import digit_centers
    try:
        return digit_centers(dataset)
    except TypeError:
        return None


def train_policy(model, train_set, val_set, config: TrainConfig, cfg: GlanceStagesConfig, out_dir: Path,
                 resume: bool, extra: dict) -> TrainResult:
    """Stage II: PPO epochs over ``train_set``; validation accuracy (last step, mean policy) after each epoch."""
    centers = _digit_centers(train_set)
    warm = cfg.locate_epochs if centers is not None else 0
    epochs = warm + (cfg.ppo_epochs or max(1, config.epochs // 2))
    model.set_train_stage(2)
    opt = torch.optim.Adam(model.policy.parameters(), lr=cfg.ppo_lr)
    path, history, start_epoch = out_dir / "last.safetensors", [], 0
    if resume and path.exists():
        _, meta = load_checkpoint(path, model, opt, restore_rng=True)
        history = list(meta["train_state"].get("history", []))
        start_epoch = int(meta["train_state"].get("epoch", 0))
    torch.manual_seed(config.seed + 1)
    t0, steps, best = time.perf_counter(), 0, max((h["val_acc"] for h in history), default=float("-inf"))
    for epoch in range(start_epoch, epochs):
        model.train()
        batches = epoch_batches(len(train_set), config.batch_size, config.seed + 1, epoch)
        bar = tqdm(batches, desc=f"PPO epoch {epoch + 1}/{epochs}", leave=False, disable=None if config.progress
                   else True)
        gains, errs = [], []
        supervised = epoch < warm
        for g in opt.param_groups:
            g["lr"] = cfg.locate_lr if supervised else cfg.ppo_lr
        for idx in bar:
            x, y = collate(train_set, idx)
            if supervised:
                stats = locate_step(model, x, centers[idx], opt)
                errs.append(stats["pixel_error"])
            else:
                stats = ppo_step(model, x, y, opt, cfg)
                gains.append(stats["gain"])
            steps += 1
            bar.set_postfix(loss=f"{stats['loss']:.3f}", refresh=False)
        record = {"stage": 2, "epoch": epoch + 1, "seconds": time.perf_counter() - t0}
        if supervised:
            record["locate_pixel_error"] = sum(errs) / max(len(errs), 1)
        else:
            record["train_prob_gain"] = sum(gains) / max(len(gains), 1)
        if val_set is not None:
            record["val_acc"] = evaluate(model, val_set, config.eval_batch_size)["acc"]
            best = max(best, record["val_acc"])
        history.append(record)
        if config.progress:
            tqdm.write(f"stage II epoch {epoch + 1}/{epochs}  "
                       + (f"locate error {record['locate_pixel_error']:.1f}px" if supervised else
                          f"prob gain {record['train_prob_gain']:.4f}")
                       + (f"  val acc {record['val_acc']:.4f}" if "val_acc" in record else ""))
        save_checkpoint(path, model, opt, {"stage": 2, "epoch": epoch + 1, "history": history}, extra=extra)
    last = history[-1] if history else {}
    return TrainResult(history=history, best_val_acc=best, final_val_acc=last.get("val_acc", float("nan")),
                       steps=steps, seconds=time.perf_counter() - t0)


@register_recipe(GFNet)
def fit_glance_stages(model: GFNet, train_set, val_set, config: TrainConfig, out_dir, resume: bool = False,
                      extra: dict | None = None) -> TrainResult:
    """Stages I, II, III in ``out_dir/stage1..3`` (see the module docstring); returns the combined result."""
    out_dir = Path(out_dir)
    extra = dict(extra or {})
    cfg = GlanceStagesConfig.from_extra(extra)
    results = []
    model.set_train_stage(1)
    results.append(Trainer(model, train_set, val_set, config, out_dir / "stage1", extra=extra).fit(resume))
    results.append(train_policy(model, train_set, val_set, config, cfg, out_dir / "stage2", resume, extra))
    model.set_train_stage(3)
    config3 = replace(config, epochs=cfg.finetune_epochs or max(1, config.epochs // 2),
                      lr=config.lr * cfg.finetune_lr_scale, warmup_epochs=0.0)
    results.append(Trainer(model, train_set, val_set, config3, out_dir / "stage3", extra=extra).fit(resume))
    model.set_train_stage(1)          # everything trainable again, as a freshly built model
    model.eval()
    history = [dict(h, stage=h.get("stage", s + 1)) for s, r in enumerate(results) for h in r.history]
    save_checkpoint(out_dir / "last.safetensors", model, None, {"stages": 3, "history": history}, extra=extra)
    return TrainResult(history=history, best_val_acc=max(r.best_val_acc for r in results),
                       final_val_acc=results[-1].final_val_acc, steps=sum(r.steps for r in results),
                       seconds=sum(r.seconds for r in results))
