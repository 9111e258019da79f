"""BlockDrop's training schedule (Wu et al., CVPR 2018): the policy on the frozen pre-trained backbone with the
curriculum, then policy and backbone jointly (see :mod:`dyncnn.models.blockdrop` for the model and its losses)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ...models.blockdrop import BlockDrop
from ..checkpoint import save_checkpoint
from ..trainer import TrainConfig, Trainer, TrainResult
from . import register_recipe


def fit_two_phase(model: BlockDrop, train_set, val_set, policy_config: TrainConfig, joint_config: TrainConfig,
                  out_dir=None, resume: bool = False, extra: dict | None = None) -> list[TrainResult]:
    """BlockDrop's schedule: the policy on the frozen backbone with the curriculum (``out_dir/policy``), then policy
    and backbone jointly (``out_dir/joint``); the final model is also saved as ``out_dir/last.safetensors``.
    Returns both phases' results."""
    results = []
    for phase, cfg in (("policy", policy_config), ("joint", joint_config)):
        model.set_phase(phase)
        sub = None if out_dir is None else Path(out_dir) / phase
        results.append(Trainer(model, train_set, val_set, cfg, out_dir=sub, extra=extra).fit(resume=resume))
    if out_dir is not None:
        save_checkpoint(Path(out_dir) / "last.safetensors", model, extra=extra)
    return results


@register_recipe(BlockDrop)
def fit_blockdrop(model: BlockDrop, train_set, val_set, config: TrainConfig, out_dir=None, resume: bool = False,
                  extra: dict | None = None) -> TrainResult:
    """``dyncnn train``: with ``joint_epochs > 0`` the two phases (``config`` for the policy phase, then
    ``joint_epochs`` at ``joint_lr_scale * config.lr``), else one Trainer run in the configured phase."""
    if model.cfg.joint_epochs == 0:
        return Trainer(model, train_set, val_set, config, out_dir=out_dir, extra=extra).fit(resume=resume)
    joint = TrainConfig(**{**asdict(config), "epochs": model.cfg.joint_epochs,
                           "lr": config.lr * model.cfg.joint_lr_scale, "warmup_epochs": 0.0})
    return fit_two_phase(model, train_set, val_set, config, joint, out_dir, resume, extra)[-1]
