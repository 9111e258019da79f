"""Mixture-of-experts networks: a zoo backbone whose later blocks are replaced by :class:`ConvMoE` layers.

Each replaced block becomes E experts shaped like its residual function (an inverted residual's expand ->
depthwise -> project, a basic block's two 3x3 convolutions, optionally narrower by ``expert_ratio``) that share
the block's shortcut and final activation. Inference runs the chain stem -> blocks -> head through the
:class:`Executor`, so each sample is charged exactly the router, shortcut and experts it used.

``upcycle=True`` starts every expert as a copy of the block it replaces (sparse upcycling): with the weights of a
sample summing to 1 (``renormalize``, ``straight_through``, or E = k = 1, or ``force(expert)``) the network then
equals the backbone. Narrower experts (``expert_ratio < 1``) start as the block's leading channels. Upcycling a
TRAINED backbone and fine-tuning is what reaches the backbone's accuracy on ScaledMNIST: trained from scratch,
the routers' logits stay far below the routing noise, every expert sees a random quarter of the data and the
network ends below its static backbone (benchmarks/bench_moe_routing.py).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor, nn

from ..dynamic.executor import CostLedger, ExitResult, Executor, eval_copy, measure_macs
from ..layers import ConvNormAct
from ..layers.moe import ConvMoE, MoEConfig
from .base import Backbone
from .mobilenet import InvertedResidual, mobilenet_v2
from .registry import register_model
from .resnet import BasicBlock, ResidualBlock, resnet_cifar


def backbone_units(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The chain ``forward_features`` runs, as (module path, module): stem, every block of ``stages``, conv_head.

    Supports the zoo's backbones built as ``stem`` + ``stages`` (+ ``conv_head``): ResNet, MobileNet, TinyMobileNet.
    """
    if not (hasattr(backbone, "stem") and isinstance(getattr(backbone, "stages", None), nn.Sequential)
            and hasattr(backbone, "forward_head")):
        raise ValueError(f"{type(backbone).__name__} is not a stem + stages backbone (ResNet, MobileNet, "
                         f"TinyMobileNet are)")
    units = [("stem", backbone.stem)]
    for i, stage in enumerate(backbone.stages):
        if type(stage) is nn.Sequential:          # a stage of blocks (subclasses such as DepthwiseSeparableConv
            units += [(f"stages.{i}.{j}", b) for j, b in enumerate(stage)]   # are blocks themselves)
        else:
            units.append((f"stages.{i}", stage))
    if isinstance(getattr(backbone, "conv_head", None), nn.Module):
        units.append(("conv_head", backbone.conv_head))
    return units


def _reinit(module: nn.Module) -> None:
    """Fresh weights for a copied expert (He fan-out convolutions, unit norms), so the experts differ."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


@torch.no_grad()
def copy_leading(src: nn.Module, dst: nn.Module) -> None:
    """Copy into every parameter and buffer of ``dst`` the leading slice of the matching one of ``src`` (same
    module structure, ``dst`` narrower or equal): a slimmed copy of a trained block (its first channels), the
    starting point of narrower experts or paths upcycled from a trained network."""
    src_state = src.state_dict()
    for name, t in dst.state_dict().items():
        if name not in src_state or src_state[name].dim() != t.dim():
            raise ValueError(f"copy_leading: {name!r} has no counterpart of the same rank in the source")
        s = src_state[name]
        if t.dim() == 0:
            t.copy_(s)
            continue
        if any(a > b for a, b in zip(t.shape, s.shape)):
            raise ValueError(f"copy_leading: {name!r} is wider in the target {tuple(t.shape)} than in the "
                             f"source {tuple(s.shape)}")
        t.copy_(s[tuple(slice(0, n) for n in t.shape)])


def split_block(block: nn.Module, expert_ratio: float = 1.0) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """(an expert shaped like the block's residual function, shared shortcut or None, shared post-activation)."""
    if isinstance(block, InvertedResidual):
        cfg = block.cfg
        if expert_ratio == 1.0:
            expert = copy.deepcopy(block)
        else:
            expert = InvertedResidual(replace(cfg, mid_chs=max(1, round(cfg.mid_chs * expert_ratio))))
        expert.has_skip = False
        return expert, (nn.Identity() if block.has_skip else None), None
    if isinstance(block, ResidualBlock):
        if expert_ratio == 1.0:
            expert = copy.deepcopy(block.branch)
        elif isinstance(block, BasicBlock):
            hidden = max(1, round(block.branch[0][0].out_channels * expert_ratio))
            expert = nn.Sequential(ConvNormAct(block.in_chs, hidden, 3, stride=block.stride),
                                   ConvNormAct(hidden, block.out_chs, 3, activation_layer=None))
        else:
            raise ValueError(f"expert_ratio != 1 is supported for BasicBlock and InvertedResidual, not "
                             f"{type(block).__name__}")
        return expert, block.shortcut, block.act
    if expert_ratio != 1.0:
        raise ValueError(f"expert_ratio != 1 is supported for BasicBlock and InvertedResidual, not "
                         f"{type(block).__name__}")
    return copy.deepcopy(block), None, None


def _in_chs(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"cannot find the input width of {type(block).__name__}")


class MoENetwork(nn.Module):
    """A backbone with ``moe_blocks`` (module paths such as ``"stages.2.3"``) replaced by :class:`ConvMoE` layers.

    Gated-model contract: training forward returns logits and records the load-balancing losses
    (``regularization_loss() = balance_weight * sum of the layers' losses``); eval forward is ``infer(x).logits``;
    ``infer`` returns per-sample MACs and choices (N, layers * E: 1 = that expert ran for the sample).
    """

    def __init__(self, backbone: Backbone, moe_blocks: Sequence[str], cfg: MoEConfig = MoEConfig(),
                 balance_weight: float = 0.01, expert_ratio: float = 1.0, upcycle: bool = False):
        super().__init__()
        if balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {balance_weight!r}")
        if not expert_ratio > 0:
            raise ValueError(f"expert_ratio must be > 0, got {expert_ratio!r}")
        units = dict(backbone_units(backbone))
        blocks = [p for p in units if p.startswith("stages.")]
        if not moe_blocks:
            raise ValueError(f"moe_blocks must name at least one block; available: {', '.join(blocks)}")
        missing = [p for p in moe_blocks if p not in blocks]
        if missing:
            raise ValueError(f"moe_blocks names missing blocks {missing}; available: {', '.join(blocks)}")
        if len(set(moe_blocks)) != len(moe_blocks):
            raise ValueError(f"moe_blocks lists a block twice: {list(moe_blocks)}")
        self.cfg, self.balance_weight, self.moe_blocks = cfg, float(balance_weight), list(moe_blocks)
        for path in moe_blocks:
            block = units[path]
            parts = [split_block(block, expert_ratio) for _ in range(cfg.num_experts)]
            experts = [p[0] for p in parts]
            for ex in experts:
                if not upcycle:
                    _reinit(ex)
                elif expert_ratio != 1.0:      # a narrower expert starts as the block's leading channels
                    copy_leading(getattr(block, "branch", block), ex)
            moe = ConvMoE(experts, _in_chs(block), cfg, shortcut=parts[0][1], post=parts[0][2])
            parent_path, _, idx = path.rpartition(".")
            parent = backbone.get_submodule(parent_path)
            parent[int(idx)] = moe
        self.backbone = backbone
        self.num_classes, self.in_chans = backbone.num_classes, backbone.in_chans
        self._units = backbone_units(backbone)
        self._head = backbone.forward_head          # one bound method: a stable key for the executor's cache
        self.executor = Executor()
        self.decision_names = [f"{p}.expert{e}" for p in moe_blocks for e in range(cfg.num_experts)]

    def moe_layers(self) -> list[ConvMoE]:
        return [m for _, m in self._units if isinstance(m, ConvMoE)]

    def force(self, expert: int | None) -> None:
        """Route every sample of every MoE layer to ``expert`` (None: learned routing)
        (:class:`~dyncnn.dynamic.protocols.Forceable`)."""
        for m in self.moe_layers():
            m.force_expert = expert

    def set_progress(self, progress: float) -> None:   # no schedule; present for the trainer's hook
        pass

    def regularization_loss(self) -> Tensor:
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if not losses or not self.balance_weight:
            return torch.zeros(())
        return self.balance_weight * torch.stack(losses).sum()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.infer(x).logits
        for m in self.moe_layers():
            m.aux_loss = None
        return self.backbone(x)

    @torch.no_grad()
    def infer(self, x: Tensor) -> ExitResult:
        """Executed inference: each MoE layer runs each expert only on its samples; per-sample MACs and choices."""
        x = self.backbone.check_input(x)
        if self.training:     # never switch a shared model to eval and back (see MultiExitNetwork.infer)
            return eval_copy(self).infer(x)
        n = x.shape[0]
        ledger, rows, ex = CostLedger(n), torch.arange(n), self.executor
        choices = []
        for _, unit in self._units:
            if isinstance(unit, ConvMoE):
                x, routing = unit.dispatch(x, ex, rows, ledger)
                choices.append(routing.used(unit.num_experts))
            else:
                x = ex.run(unit, x, rows, ledger)
        logits = ex.run(self._head, x, rows, ledger)
        used = torch.cat(choices, 1).to(torch.int64).cpu()
        return ExitResult(logits, used.sum(1), ledger.macs, used)

    def forward_dense(self, x: Tensor) -> Tensor:
        """The simulated MoE of published code: every expert of every layer on every sample, then masked."""
        for _, unit in self._units:
            x = unit.dense(x) if isinstance(unit, ConvMoE) else unit(x)
        return self._head(x)

    def full_macs(self, x: Tensor) -> int:
        """Per-sample MACs with every expert of every layer on (the dense form)."""
        was = self.training
        self.eval()
        try:
            return measure_macs(self.forward_dense, x[:1])
        finally:
            self.train(was)


def _moe_cfg(num_experts: int, top_k: int, capacity_factor: float | None, noisy_gating: bool,
             renormalize: bool | None, balance: str, straight_through: bool) -> MoEConfig:
    return MoEConfig(num_experts, top_k, capacity_factor, noisy_gating, renormalize, balance, straight_through)


def _default_blocks(backbone: nn.Module, stages: Sequence[int]) -> list[str]:
    return [p for p, _ in backbone_units(backbone) if p.startswith("stages.") and int(p.split(".")[1]) in stages]


def _build(backbone: Backbone, default_stages: Sequence[int], moe_blocks: Sequence[str] | None, num_experts: int,
           top_k: int, capacity_factor: float | None, noisy_gating: bool, renormalize: bool | None, balance: str,
           straight_through: bool, balance_weight: float, expert_ratio: float, upcycle: bool) -> MoENetwork:
    cfg = _moe_cfg(num_experts, top_k, capacity_factor, noisy_gating, renormalize, balance, straight_through)
    blocks = list(moe_blocks) if moe_blocks is not None else _default_blocks(backbone, default_stages)
    return MoENetwork(backbone, blocks, cfg, balance_weight, expert_ratio, upcycle)


_MOE_DEFAULTS = dict(moe_blocks=None, num_experts=4, top_k=1, capacity_factor=None, noisy_gating=True,
                     renormalize=None, balance="switch", straight_through=False, balance_weight=0.01,
                     expert_ratio=1.0, upcycle=False)


def _split(kwargs: dict) -> tuple[dict, dict]:
    moe = {k: kwargs.pop(k, v) for k, v in _MOE_DEFAULTS.items()}
    return moe, kwargs


@register_model(name="moe_mobilenet_v2")
def moe_mobilenet_v2(num_classes: int = 1000, **kwargs) -> MoENetwork:
    """MobileNetV2 whose last three stages (96, 160, 320 channels) are top-k MoE layers of E inverted residuals."""
    moe, rest = _split(kwargs)
    return _build(mobilenet_v2(num_classes=num_classes, **rest), (4, 5, 6), **moe)


@register_model(name="moe_resnet32_cifar")
def moe_resnet32_cifar(num_classes: int = 10, **kwargs) -> MoENetwork:
    """CIFAR ResNet-32 whose last stage (5 basic blocks, 64 channels) is made of top-k MoE layers."""
    moe, rest = _split(kwargs)
    return _build(resnet_cifar(32, num_classes=num_classes, **rest), (2,), **moe)


@register_model(name="moe_resnet_tiny")
def moe_resnet_tiny(num_classes: int = 10, in_chans: int = 1, **kwargs) -> MoENetwork:
    """For ScaledMNIST (32x32 canvases): ResNet-14 at width 0.5 (8/16/32 channels), the last two stages MoE."""
    moe, rest = _split(kwargs)
    rest.setdefault("width_mult", 0.5)
    return _build(resnet_cifar(14, num_classes=num_classes, in_chans=in_chans, **rest), (1, 2), **moe)
