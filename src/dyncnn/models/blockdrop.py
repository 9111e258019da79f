"""BlockDrop (Wu et al., CVPR 2018): a small policy network looks at a down-sampled image and decides, for every
gated residual block at once, whether it runs (probability >= 0.5 at test).

Training is REINFORCE (``dynamic/rl.py``): actions are sampled from Bernoulli(p') with BlockDrop's bounded
exploration ``p' = alpha * p + (1 - alpha) * (1 - p)``; the reward is ``1 - (used / K)^2`` when the backbone's
prediction is correct, ``-gamma`` otherwise; the baseline is the reward of the thresholded policy on the same
sample (self-critical); the curriculum keeps the first ``K - c`` gated blocks on, with ``c`` growing from 1 to
``K`` over the first ``curriculum`` fraction of training (``set_progress``). The backbone is frozen (kept in eval
mode, no gradient) unless ``finetune_backbone``, in which case the cross-entropy trains it jointly.

With a ``budget``, ``regularization_loss()`` adds ``cost_weight * budget_loss`` of the *expected* per-sample
MACs (``fixed + sum_k p_k * macs_k``, differentiable in the policy) — not in the paper, whose only lever is
``gamma``; it lets the same model be trained to a MAC target. The policy network's MACs are charged to every
sample at inference.

Through the trainer: ``forward`` samples and stores what ``training_loss(outputs, target)`` needs.

The paper's two phases (:func:`dyncnn.train.recipes.blockdrop.fit_two_phase`, or ``joint_epochs > 0`` for
``dyncnn train`` / :func:`dyncnn.train.recipes.fit_model`):
(1) the policy alone on the FROZEN pre-trained backbone, with the curriculum; (2) joint fine-tuning of policy and
backbone (cross-entropy added), every gated block free. ``set_phase("policy" | "joint")`` switches between them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.executor import CostLedger, measure_macs
from ..dynamic.skipping import Decide, LayerSkipNetwork
from ..layers.gates import budget_loss, check_budget
from ..dynamic.rl import blockdrop_reward, reinforce_loss, sample_bernoulli
from .registry import register_model
from .resnet import resnet_cifar
from .tiny import TinyMobileNet


@dataclass(frozen=True)
class BlockDropConfig:
    budget: float | None = None            # optional target fraction of full_macs (see the module doc)
    gated_blocks: tuple[int, ...] | None = None
    policy_widths: tuple[int, ...] = (8, 16, 32)   # the TinyMobileNet policy's stage widths
    downsample: int = 2                    # the policy sees the image average-pooled by this factor
    gamma: float = 5.0                     # penalty of a wrong prediction
    alpha: float = 0.8                     # exploration: p' = alpha p + (1 - alpha)(1 - p)
    curriculum: float = 0.5                # fraction of training over which the free blocks grow 1 -> K (0: off)
    finetune_backbone: bool = False
    cost_weight: float = 2.0               # weight of the budget loss (with a budget only)
    policy_bias: float = 2.0               # initial policy logit (> 0: every block starts on)
    joint_epochs: int = 0                  # recipe: epochs of the joint phase after the policy phase (0: one
    #                                        phase, as configured by finetune_backbone)
    joint_lr_scale: float = 0.2            # recipe: joint-phase learning rate = this * the policy phase's

    def __post_init__(self):
        if self.joint_epochs < 0 or self.joint_lr_scale <= 0:
            raise ValueError(f"joint_epochs must be >= 0 and joint_lr_scale > 0, got {self.joint_epochs}, "
                             f"{self.joint_lr_scale}")
        if self.budget is not None:
            check_budget(self.budget)
        if not 0.5 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0.5, 1], got {self.alpha}")
        if not 0.0 <= self.curriculum <= 1.0:
            raise ValueError(f"curriculum must be a fraction of training in [0, 1], got {self.curriculum}")
        if self.downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {self.downsample}")


class BlockDrop(LayerSkipNetwork):
    """A backbone whose gated blocks are switched per sample by a policy network (see the module doc)."""

    def __init__(self, backbone: nn.Module, cfg: BlockDropConfig = BlockDropConfig(),
                 policy: nn.Module | None = None):
        super().__init__(backbone, cfg.gated_blocks)
        self.cfg = cfg
        if policy is None:
            policy = TinyMobileNet(num_classes=self.num_gated, in_chans=self.in_chans, widths=cfg.policy_widths)
            nn.init.normal_(policy.fc.weight, 0.0, 0.01)
            nn.init.constant_(policy.fc.bias, cfg.policy_bias)
        self.policy = policy
        self._policy_fn = self.policy_logits       # one stable callable (the executor caches costs by callable)
        self._free = self.num_gated
        self._saved: tuple | None = None
        self._finetune = cfg.finetune_backbone
        self._curriculum = cfg.curriculum
        if not cfg.finetune_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @property
    def phase(self) -> str:
        return "joint" if self._finetune else "policy"

    def set_phase(self, phase: str) -> None:
        """``"policy"``: backbone frozen (no gradient, batch-norm statistics kept), the curriculum as configured;
        ``"joint"``: the backbone trains with the policy (cross-entropy added), no curriculum (every gated block
        free). Build the optimizer after switching: it only takes parameters that require gradients."""
        if phase not in ("policy", "joint"):
            raise ValueError(f"phase must be 'policy' or 'joint', got {phase!r}")
        self._finetune = phase == "joint"
        self._curriculum = 0.0 if self._finetune else self.cfg.curriculum
        self._free = self.num_gated
        self.backbone.requires_grad_(self._finetune)
        self.train(self.training)

    def train(self, mode: bool = True) -> "BlockDrop":
        super().train(mode)
        if not getattr(self, "_finetune", True):
            self.backbone.eval()       # a frozen backbone keeps its batch-norm statistics
        return self

    def set_progress(self, progress: float) -> None:
        """Curriculum: the last ``c`` gated blocks are decided by the policy, the others forced on."""
        k, c = self.num_gated, self._curriculum
        self._free = k if c == 0 else max(1, min(k, math.ceil(k * progress / c)))

    def policy_logits(self, x: Tensor) -> Tensor:
        d = self.cfg.downsample
        return self.policy(F.avg_pool2d(x, d) if d > 1 else x)

    # -- inference ------------------------------------------------------------------------------------------
    def _decisions(self, x: Tensor, rows: Tensor, ledger: CostLedger) -> Decide:
        take = self.executor.run(self._policy_fn, x, rows, ledger) >= 0
        return lambda j, h: take[:, j]

    def _decision_macs(self, x1: Tensor, inputs: list[Tensor]) -> int:
        return measure_macs(self._policy_fn, x1)

    # -- training -----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.infer(x).logits
        probs = torch.sigmoid(self.policy_logits(x))
        n, forced = x.shape[0], self.num_gated - self._free
        explore = self.cfg.alpha * probs + (1 - self.cfg.alpha) * (1 - probs)
        free, log_prob = sample_bernoulli(explore[:, forced:])
        actions = torch.cat([probs.new_ones(n, forced), free], dim=1)
        greedy = (probs.detach() >= 0.5).float()
        greedy[:, :forced] = 1
        grad = contextlib.nullcontext() if self._finetune else torch.no_grad()
        with grad:
            logits, _, _ = self._dense(x, lambda j, h: actions[:, j])
        with torch.no_grad():
            self.eval()
            greedy_logits, _, _ = self._dense(x, lambda j, h: greedy[:, j])
            self.train()
        fixed, block_macs, decision = self.cost_table(x)
        expected = fixed + decision + probs @ block_macs.to(probs.device)
        self._saved = (log_prob, actions, greedy, greedy_logits.argmax(1), expected, self.full_macs(x))
        return logits

    def training_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """REINFORCE with the self-critical baseline (+ cross-entropy when the backbone is fine-tuned)."""
        if self._saved is None:
            raise RuntimeError("training_loss needs a training-mode forward first")
        log_prob, actions, greedy, greedy_pred, _, _ = self._saved
        reward = blockdrop_reward(actions, outputs.argmax(1) == target, self.cfg.gamma)
        baseline = blockdrop_reward(greedy, greedy_pred == target, self.cfg.gamma)
        loss = reinforce_loss(log_prob, reward, baseline)
        if self._finetune:
            loss = loss + F.cross_entropy(outputs, target)
        return loss

    def regularization_loss(self) -> Tensor:
        if self._saved is None or self.cfg.budget is None:
            return torch.zeros(())
        expected, full = self._saved[4:]
        return self.cfg.cost_weight * budget_loss(expected, full, self.cfg.budget)


_CFG_FIELDS = {f.name for f in fields(BlockDropConfig)}


def blockdrop_resnet(depth: int, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                     **kwargs) -> BlockDrop:
    """BlockDrop over a CIFAR ResNet of depth 6n+2; ``kwargs``: BlockDropConfig fields, then ResNet options."""
    cfg = {k: kwargs.pop(k) for k in list(kwargs) if k in _CFG_FIELDS}
    for key in ("gated_blocks", "policy_widths"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(int(i) for i in cfg[key])
    backbone = resnet_cifar(depth, num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kwargs)
    return BlockDrop(backbone, BlockDropConfig(**cfg))


_PUB = {"input_size": 32, "note": "BlockDrop (Wu et al. 2018), CIFAR-10 ResNet-110: 93.6% at 1.81e8 FLOPs"}


@register_model(name="blockdrop_resnet110_cifar", published=_PUB)
def blockdrop_resnet110_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                              **kwargs) -> BlockDrop:
    """BlockDrop over ResNet-110 for CIFAR (52 of 54 blocks gated)."""
    return blockdrop_resnet(110, num_classes, in_chans, width_mult, **kwargs)


@register_model(name="blockdrop_resnet32_cifar", published={"input_size": 32})
def blockdrop_resnet32_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                             **kwargs) -> BlockDrop:
    """BlockDrop over ResNet-32 for CIFAR (13 of 15 blocks gated)."""
    return blockdrop_resnet(32, num_classes, in_chans, width_mult, **kwargs)


@register_model(name="blockdrop_resnet20_cifar", published={"input_size": 32})
def blockdrop_resnet20_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                             **kwargs) -> BlockDrop:
    """BlockDrop over ResNet-20 for CIFAR (7 of 9 blocks gated); small ``width_mult`` + ``in_chans=1`` for
    ScaledMNIST."""
    return blockdrop_resnet(20, num_classes, in_chans, width_mult, **kwargs)
