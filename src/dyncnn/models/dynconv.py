"""DynConv models: a zoo backbone (ResNet, MobileNetV2) whose shape-preserving residual blocks get a pixel mask.

The backbone is kept as ``model.backbone`` with its own parameter names, so a static checkpoint loads into it
(``model.backbone.load_state_dict(static.state_dict())``) and the mask units are fine-tuned on top. Gated-model
contract (``dynamic/evaluation.py``): ``infer`` executes the masks sparsely and returns per-sample MACs, the
per-block fraction of active positions as ``fractions`` (``choices``: whether a block computed any position) and
the executed masks; eval ``forward`` is ``infer(x).logits``.

The budget is a fraction of the *gated* blocks' MACs (as in DynConv): the dense parts (stem, stride-2 blocks,
head) and the mask units are not counted against it, but they are in every reported MAC figure.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..dynamic.executor import CostLedger, Executor, ExitResult, eval_copy
from ..dynamic.protocols import check_gate_flag
from ..dynamic.spatial import (EXPORT_MESSAGE, GatedBranch, MaskUnit, MaskUnitCfg, SparseExportError, gated_branch,
                               masked_block_forward, sparse_block_forward)
from ..errors import check_image_batch
from ..layers.gates import budget_loss, check_budget, gumbel_sigmoid, layer_bounds_loss
from .base import Backbone, is_exporting
from .mobilenet import BlockCfg, MobileNet, MobileNetArch, mobilenet_v2
from .resnet import BasicBlock, ResNet, ResNetCfg, ResStageCfg, resnet_cifar
from .registry import register_model


@dataclass(frozen=True)
class DynConvCfg:
    budget: float = 0.5           # target fraction of the gated blocks' MACs, in (0, 1]
    mask_kernel: int = 1          # 1x1 or 3x3 mask unit
    interpolate: bool = False     # fill skipped positions from computed neighbours instead of the residual only
    tau: float = 1.0              # Gumbel temperature (DynConv keeps it at 1)
    cost_weight: float = 10.0     # weight of (network budget loss + per-block bounds loss)
    init_bias: float = 1.0        # mask logits start positive: (mostly) on, then pruned towards the budget
    anneal_noise: bool = True     # scale the Gumbel noise by (1 - progress): see DynConvNet._mask

    def __post_init__(self):
        check_budget(self.budget)
        if self.mask_kernel not in (1, 3):
            raise ValueError(f"mask_kernel must be 1 or 3, got {self.mask_kernel}")
        if not self.tau > 0 or self.cost_weight < 0:
            raise ValueError(f"expected tau > 0 and cost_weight >= 0, got tau={self.tau}, "
                             f"cost_weight={self.cost_weight}")


class _Tail(nn.Module):
    """The backbone after its last block (MobileNet's head conv, pooling, classifier) as one executor stage."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)   # not a submodule: its weights belong to the backbone

    def forward(self, h: Tensor) -> Tensor:
        b = self._backbone
        return b.forward_head(b.conv_head(h) if hasattr(b, "conv_head") else h)


class DynConvNet(nn.Module):
    """A backbone with a :class:`MaskUnit` in front of every gated residual block."""

    def __init__(self, backbone: Backbone, cfg: DynConvCfg = DynConvCfg()):
        super().__init__()
        if not isinstance(backbone, (ResNet, MobileNet)):
            raise ValueError(f"DynConv supports the zoo's ResNet and MobileNet backbones, got "
                             f"{type(backbone).__name__}")
        self.cfg, self.backbone = cfg, backbone
        self.num_classes, self.in_chans = backbone.num_classes, backbone.in_chans
        self._blocks: list[nn.Module] = [b for stage in backbone.stages for b in stage]
        names = [f"stages.{i}.{j}" for i, stage in enumerate(backbone.stages) for j in range(len(stage))]
        self._gated: list[GatedBranch | None] = [gated_branch(b) for b in self._blocks]
        if not any(self._gated):
            raise ValueError("the backbone has no shape-preserving residual block to gate")
        self.decision_names = [n for n, g in zip(names, self._gated) if g is not None]
        ucfg = MaskUnitCfg(cfg.mask_kernel, cfg.init_bias)
        self.mask_units = nn.ModuleList(MaskUnit(g.units[0].conv.in_channels, ucfg)
                                        for g in self._gated if g is not None)
        self.tail = _Tail(backbone)
        self.executor = Executor()
        self._force: bool | None = None    # True: every mask on (the static backbone); False: every mask off
        self.progress = 0.0
        self._reg: Tensor | None = None

    # --- training ---------------------------------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]: anneals the per-block bounds from loose to the budget."""
        self.progress = min(max(float(progress), 0.0), 1.0)

    def _mask(self, unit: MaskUnit, h: Tensor) -> Tensor:
        """Straight-through Gumbel mask. The hard decision is ``logit + noise >= 0`` whatever the temperature,
        so with short fine-tuning the logits stay close to 0 and test-time thresholding (no noise) disagrees with
        training; ``anneal_noise`` scales the logistic noise by ``1 - progress`` so that the decisions of the last
        steps are the test-time ones (DynConv keeps full noise and trains hundreds of epochs instead)."""
        if self._force is not None:
            return torch.full_like(h[:, :1], float(self._force))
        logits = unit(h)
        scale = 1.0 - self.progress if self.cfg.anneal_noise else 1.0
        if scale > 0:
            u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
            logits = logits + scale * (torch.log(u) - torch.log1p(-u))
        return gumbel_sigmoid(logits, self.cfg.tau, hard=True, noise=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.infer(x).logits
        h = self.backbone.stem(self.backbone.check_input(x))
        used, fracs, full, k = 0, [], 0, 0
        for block, g in zip(self._blocks, self._gated):
            if g is None:
                h = block(h)
                continue
            m = self._mask(self.mask_units[k], h)
            k += 1
            block_full = sum(g.unit_macs(*h.shape[-2:]))
            h, cost = masked_block_forward(g, h, m, self.cfg.interpolate)
            used, full = used + cost, full + block_full
            fracs.append(cost / block_full)
        self._reg = self.cfg.cost_weight * (budget_loss(used, full, self.cfg.budget)
                                            + layer_bounds_loss(fracs, self.cfg.budget, self.progress))
        return self.tail(h)

    def regularization_loss(self) -> Tensor:
        """The cost term of the last training forward (budget + annealed per-block bounds)."""
        return self._reg if self._reg is not None else torch.zeros(())

    # --- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _execute(self, x: Tensor, all_on: bool = False) -> tuple[ExitResult, list[Tensor]]:
        if is_exporting():    # decided: no dense-masked stand-in graph; see dynamic/spatial.py
            raise SparseExportError(EXPORT_MESSAGE)
        if self.training:     # BatchNorm's running statistics are folded into the sparse kernels: run on an
            return eval_copy(self)._execute(x, all_on)     # eval copy, never switching a shared model (see infer)
        check_image_batch(x, self.in_chans)
        x = self.backbone.check_input(x)
        n = x.shape[0]
        ledger, rows, ex = CostLedger(n), torch.arange(n), self.executor
        h = ex.run(self.backbone.stem, x, rows, ledger)
        masks, fracs, k = [], [], 0
        for block, g in zip(self._blocks, self._gated):
            if g is None:
                h = ex.run(block, h, rows, ledger)
                continue
            if self._force is not None and not all_on:      # forced: no mask unit runs
                mask = torch.full((n, *h.shape[-2:]), bool(self._force), dtype=torch.bool, device=h.device)
            else:       # all_on (full_macs) runs and charges the mask units whatever the forced state
                logits = ex.run(self.mask_units[k], h, rows, ledger)
                mask = torch.ones_like(logits[:, 0], dtype=torch.bool) if all_on else logits[:, 0] >= 0
            k += 1
            h, cost = sparse_block_forward(g, h, mask, self.cfg.interpolate)
            ledger.charge(rows, cost)
            masks.append(mask)
            fracs.append(mask.flatten(1).float().mean(1))
        logits = ex.run(self.tail, h, rows, ledger)
        fractions = torch.stack(fracs, 1)
        choices = (fractions > 0).to(torch.int64)
        return ExitResult(logits, choices.sum(1), ledger.macs.clone(), choices, fractions=fractions,
                          masks=masks), masks

    def infer(self, x: Tensor) -> ExitResult:
        """Sparse inference: an ``ExitResult`` with exit_index = the number of gated blocks that computed any
        position, choices = (N, gated blocks) 0/1 whether each block computed any position, fractions = the share
        of positions each block computed, masks = the executed positions, bool (N, H, W) per gated block."""
        return self._execute(x)[0]

    def masks(self, x: Tensor) -> list[Tensor]:
        """The executed positions of every gated block, bool (N, H_b, W_b)."""
        return self._execute(x)[1]

    def force(self, value: bool | None) -> None:
        """``True``: every mask on, no mask unit runs (the static backbone); ``False``: every mask off (only the
        blocks' shortcuts); ``None``: the mask units decide (:class:`~dyncnn.dynamic.protocols.Forceable`)."""
        self._force = check_gate_flag(value)

    def full_macs(self, x: Tensor) -> int:
        """Per-sample MACs with every mask on (backbone + mask units), whatever :meth:`force` has set."""
        return int(self._execute(x[:1], all_on=True)[0].macs[0])

    @torch.no_grad()
    def gated_full_macs(self, x: Tensor) -> int:
        """Per-sample MACs of the gated blocks alone with every mask on (what the budget is a fraction of)."""
        total = 0
        h = self.backbone.stem(x[:1])
        for block, g in zip(self._blocks, self._gated):
            if g is not None:
                total += sum(g.unit_macs(*h.shape[-2:]))
            h = block(h)
        return total


# --- backbones and registered models ------------------------------------------------------------------------------

def tiny_resnet_mnist(num_classes: int = 10, in_chans: int = 1, **kwargs) -> ResNet:
    """A small ResNet for 64x64 ScaledMNIST: stride-2 stem, 2 basic blocks per stage at 8/16/32 channels."""
    cfg = ResNetCfg(stages=(ResStageCfg(BasicBlock, 2, 8, 1), ResStageCfg(BasicBlock, 2, 16, 2),
                            ResStageCfg(BasicBlock, 2, 32, 2)),
                    stem_chs=8, stem_kernel=3, stem_stride=2, stem_pool=False)
    return ResNet(cfg, num_classes=num_classes, in_chans=in_chans, **kwargs)


_V2 = dict(block="ir", act="relu6")
TINY_MOBILENET_V2 = MobileNetArch(
    stages=((BlockCfg(out=8, expand_ratio=1, **_V2),),
            (BlockCfg(out=16, stride=2, repeat=2, expand_ratio=4, **_V2),),
            (BlockCfg(out=24, stride=2, repeat=2, expand_ratio=4, **_V2),)),
    stem_chs=8, act="relu6", head_chs=64)


def tiny_mobilenet_v2_mnist(num_classes: int = 10, in_chans: int = 1, **kwargs) -> MobileNet:
    """A small MobileNetV2 for 64x64 ScaledMNIST (stride-2 stem, inverted residuals at 8/16/24 channels)."""
    return MobileNet(TINY_MOBILENET_V2, num_classes, in_chans, 1.0, kwargs.pop("drop_rate", 0.0),
                     name="tiny_mobilenet_v2_mnist", **kwargs)


def _dynconv(backbone: Backbone, budget: float, mask_kernel: int, interpolate: bool, **cfg) -> DynConvNet:
    return DynConvNet(backbone, DynConvCfg(budget=budget, mask_kernel=mask_kernel, interpolate=interpolate, **cfg))


_CFG_KEYS = ("tau", "cost_weight", "init_bias", "anneal_noise")


def _split(kwargs: dict) -> tuple[dict, dict]:
    return ({k: kwargs.pop(k) for k in _CFG_KEYS if k in kwargs}, kwargs)


@register_model(name="dynconv_resnet32_cifar",
                published={"macs": 55.4e6, "top1": 93.6, "dataset": "CIFAR-10", "budget": 0.7, "input_size": 32,
                           "note": "Verelst & Tuytelaars, CVPR 2020 (DynConv), ResNet-32 at budget 0.7"})
def dynconv_resnet32_cifar(num_classes: int = 10, budget: float = 0.7, mask_kernel: int = 1,
                           interpolate: bool = False, **kwargs) -> DynConvNet:
    """DynConv on the CIFAR ResNet-32: a mask on each of its 13 stride-1 basic blocks."""
    cfg, kwargs = _split(kwargs)
    return _dynconv(resnet_cifar(32, num_classes=num_classes, **kwargs), budget, mask_kernel, interpolate, **cfg)


@register_model(name="dynconv_mobilenet_v2")
def dynconv_mobilenet_v2(num_classes: int = 1000, budget: float = 0.5, mask_kernel: int = 1,
                         interpolate: bool = False, **kwargs) -> DynConvNet:
    """DynConv on MobileNetV2: a mask on each inverted residual with an identity shortcut (10 of 17 blocks)."""
    cfg, kwargs = _split(kwargs)
    return _dynconv(mobilenet_v2(num_classes=num_classes, **kwargs), budget, mask_kernel, interpolate, **cfg)


@register_model(name="dynconv_tiny_resnet_mnist")
def dynconv_tiny_resnet_mnist(num_classes: int = 10, budget: float = 0.5, mask_kernel: int = 1,
                              interpolate: bool = False, in_chans: int = 1, **kwargs) -> DynConvNet:
    """DynConv on :func:`tiny_resnet_mnist` (ScaledMNIST, 64x64 canvas)."""
    cfg, kwargs = _split(kwargs)
    return _dynconv(tiny_resnet_mnist(num_classes, in_chans, **kwargs), budget, mask_kernel, interpolate, **cfg)


@register_model(name="dynconv_tiny_mobilenet_v2_mnist")
def dynconv_tiny_mobilenet_v2_mnist(num_classes: int = 10, budget: float = 0.5, mask_kernel: int = 1,
                                    interpolate: bool = False, in_chans: int = 1, **kwargs) -> DynConvNet:
    """DynConv on :func:`tiny_mobilenet_v2_mnist` (ScaledMNIST, 64x64 canvas)."""
    cfg, kwargs = _split(kwargs)
    return _dynconv(tiny_mobilenet_v2_mnist(num_classes, in_chans, **kwargs), budget, mask_kernel, interpolate,
                    **cfg)
