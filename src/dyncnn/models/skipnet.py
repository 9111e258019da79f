"""SkipNet (Wang et al., ECCV 2018): a light gate before each residual block decides per sample whether it runs.

Training (supervised stage): the gates make hard 0/1 decisions with straight-through Gumbel-sigmoid (``HardGate``),
a skipped block is masked (``h = g * block(h) + (1 - g) * h``), and ``regularization_loss()`` returns
``cost_weight * budget_loss(per-sample MACs, full MACs, budget)`` where the per-sample MACs are
``fixed + sum_k g_k * macs_k``, differentiable through the gates. ``set_progress`` anneals the Gumbel temperature.
Optional second stage: :func:`dyncnn.train.recipes.skipnet.reinforce_finetune` (SkipNet's hybrid RL: REINFORCE on
Bernoulli gate decisions, reward = -cross-entropy - cost_weight * used MAC fraction, self-critical baseline, plus the cross-entropy).
Inference executes the decisions (``logit >= 0``): see :mod:`dyncnn.dynamic.skipping`.

Good practice, as in the paper: train the static backbone first, copy its weights into the gated model
(``model.backbone.load_state_dict(...)``), then train with the gates.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor, nn

from ..dynamic.executor import CostLedger, measure_macs
from ..dynamic.skipping import Decide, FeedForwardGate, LayerSkipNetwork, RecurrentGate
from ..layers.gates import HardGate, anneal, budget_loss, check_budget, gumbel_sigmoid
from .mobilenet import mobilenet_v2
from .registry import register_model
from .resnet import resnet_cifar

GATES = ("feedforward", "recurrent")


@dataclass(frozen=True)
class SkipNetConfig:
    budget: float = 0.5                    # target fraction of full_macs (every gate on)
    gate: str = "feedforward"              # "feedforward" (one gate per block) or "recurrent" (shared LSTM)
    gated_blocks: tuple[int, ...] | None = None   # block indices to gate; None: every skippable block
    cost_weight: float = 2.0               # weight of the budget loss
    tau_start: float = 1.0                 # Gumbel temperature, annealed geometrically to tau_end
    tau_end: float = 0.3
    gate_bias: float = 2.0                 # initial gate logit (> 0: gates start on)
    gate_noise: bool = False               # Gumbel noise in training (default: SkipNet's plain straight-through,
    #                                        which trained better here: 0.870 vs 0.820 accuracy at a 0.5 budget)
    rnn_hidden: int = 16
    gate_hidden: int = 0                   # feed-forward gate: 0 = pool -> linear; > 0 = pool -> MLP (more
    #                                        capacity for decisions that differ per sample)
    cost_ramp: float = 0.0                 # warm-up: the budget loss weight ramps 0 -> cost_weight linearly over
    #                                        this fraction of training (0: full weight from the first step)

    def __post_init__(self):
        check_budget(self.budget)
        if not 0.0 <= self.cost_ramp <= 1.0:
            raise ValueError(f"cost_ramp must be a fraction of training in [0, 1], got {self.cost_ramp}")
        if self.gate_hidden < 0:
            raise ValueError(f"gate_hidden must be >= 0, got {self.gate_hidden}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.cost_weight < 0:
            raise ValueError(f"cost_weight must be >= 0, got {self.cost_weight}")


def block_in_chs(block: nn.Module) -> int:
    return int(block.in_chs if hasattr(block, "in_chs") else block.cfg.in_chs)


class SkipNet(LayerSkipNetwork):
    """A backbone with one SkipNet gate before each gated block (see the module doc)."""

    def __init__(self, backbone: nn.Module, cfg: SkipNetConfig = SkipNetConfig()):
        super().__init__(backbone, cfg.gated_blocks)
        self.cfg = cfg
        self.hard = HardGate(cfg.tau_start)
        in_chs = [block_in_chs(self._blocks[k]) for k in self.gated]
        self.gates: nn.Module = (nn.ModuleList(FeedForwardGate(c, cfg.gate_bias, cfg.gate_hidden)
                                               for c in in_chs)
                                 if cfg.gate == "feedforward" else RecurrentGate(in_chs, cfg.rnn_hidden, cfg.gate_bias))
        self._used: tuple[Tensor, int] | None = None
        self._cost_scale = 1.0 if cfg.cost_ramp == 0 else 0.0

    def force(self, value: bool | None) -> None:
        super().force(value)
        self.hard.force = value

    def set_progress(self, progress: float) -> None:
        self.hard.set_tau(anneal(progress, self.cfg.tau_start, self.cfg.tau_end))
        ramp = self.cfg.cost_ramp
        self._cost_scale = 1.0 if ramp == 0 else min(1.0, max(0.0, progress) / ramp)

    # -- gate evaluation ----------------------------------------------------------------------------------
    def gate_logits(self, run: Callable | None = None) -> Callable[[int, Tensor], Tensor]:
        """A function ``(j, h) -> logits (N,)`` for one pass over the blocks (it carries the recurrent state).
        ``run(stage, state)`` evaluates a gate stage (the executor at inference; a plain call by default)."""
        run = run or (lambda stage, state: stage(state))
        if isinstance(self.gates, nn.ModuleList):
            return lambda j, h: run(self.gates[j], h)
        mem: dict[str, Tensor] = {}

        def logits(j: int, h: Tensor) -> Tensor:
            hx, cx = mem.get("hx"), mem.get("cx")
            if hx is None:
                hx, cx = self.gates.init_state(h)
            out, mem["hx"], mem["cx"] = run(self.gates.steps[j], (h, hx, cx))
            return out
        return logits

    def _decisions(self, x: Tensor, rows: Tensor, ledger: CostLedger) -> Decide:
        logits = self.gate_logits(lambda stage, state: self.executor.run(stage, state, rows, ledger))
        return lambda j, h: logits(j, h) >= 0

    def _decision_macs(self, x1: Tensor, inputs: list[Tensor]) -> int:
        total = 0

        def run(stage, state):
            nonlocal total
            total += measure_macs(stage, state)
            return stage(state)
        logits = self.gate_logits(run)
        for j, h in enumerate(inputs):
            logits(j, h)
        return total

    # -- training -----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.infer(x).logits
        logits_of = self.gate_logits()
        logits, _, used = self._dense(x, lambda j, h: self._train_gate(logits_of(j, h)))
        self._used = (used, self.full_macs(x))
        return logits

    def _train_gate(self, logits: Tensor) -> Tensor:
        if self.cfg.gate_noise or self.hard.force is not None:
            return self.hard(logits)
        # Without noise the training path is the inference path (threshold at 0), gradient of sigmoid(logit/tau).
        return gumbel_sigmoid(logits, self.hard.tau, hard=True, noise=False)

    def regularization_loss(self) -> Tensor:
        """``cost_weight * budget_loss`` of the last training forward's per-sample MACs (zero before any), the
        weight scaled by the warm-up ramp (``cost_ramp``)."""
        if self._used is None:
            return torch.zeros(())
        used, full = self._used
        return self._cost_scale * self.cfg.cost_weight * budget_loss(used, full, self.cfg.budget)


# --- registered models ---------------------------------------------------------------------------------------

_CFG_FIELDS = {f.name for f in fields(SkipNetConfig)}


def _split_cfg(kwargs: dict) -> tuple[SkipNetConfig, dict]:
    cfg = {k: kwargs.pop(k) for k in list(kwargs) if k in _CFG_FIELDS}
    if cfg.get("gated_blocks") is not None:
        cfg["gated_blocks"] = tuple(int(i) for i in cfg["gated_blocks"])
    return SkipNetConfig(**cfg), kwargs


def skipnet_resnet(depth: int, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                   **kwargs) -> SkipNet:
    """SkipNet over a CIFAR ResNet of any depth 6n+2; ``kwargs``: SkipNetConfig fields, then ResNet options."""
    cfg, rest = _split_cfg(kwargs)
    return SkipNet(resnet_cifar(depth, num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **rest),
                   cfg)


_PUB = {"input_size": 32, "note": "SkipNet (Wang et al. 2018), CIFAR-10 ResNet-110: 93.3% at 49.5% of the MACs"}


@register_model(name="skipnet_resnet110_cifar", published=_PUB)
def skipnet_resnet110_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, **kwargs) -> SkipNet:
    """SkipNet gates over ResNet-110 for CIFAR (54 blocks, 52 skippable)."""
    return skipnet_resnet(110, num_classes, in_chans, width_mult, **kwargs)


@register_model(name="skipnet_resnet56_cifar", published={"input_size": 32})
def skipnet_resnet56_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, **kwargs) -> SkipNet:
    """SkipNet gates over ResNet-56 for CIFAR (27 blocks, 25 skippable)."""
    return skipnet_resnet(56, num_classes, in_chans, width_mult, **kwargs)


@register_model(name="skipnet_resnet32_cifar", published={"input_size": 32})
def skipnet_resnet32_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, **kwargs) -> SkipNet:
    """SkipNet gates over ResNet-32 for CIFAR (15 blocks, 13 skippable)."""
    return skipnet_resnet(32, num_classes, in_chans, width_mult, **kwargs)


@register_model(name="skipnet_resnet20_cifar", published={"input_size": 32})
def skipnet_resnet20_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, **kwargs) -> SkipNet:
    """SkipNet gates over ResNet-20 for CIFAR (9 blocks, 7 skippable); with a small ``width_mult`` and
    ``in_chans=1`` the ScaledMNIST-sized variant."""
    return skipnet_resnet(20, num_classes, in_chans, width_mult, **kwargs)


@register_model(name="skipnet_mobilenet_v2", published={"input_size": 224})
def skipnet_mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                         **kwargs) -> SkipNet:
    """SkipNet gates over MobileNetV2's inverted residuals with a residual connection (10 of 17 blocks)."""
    cfg, rest = _split_cfg(kwargs)
    return SkipNet(mobilenet_v2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **rest), cfg)
