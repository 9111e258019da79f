"""ResNets (He et al., CVPR 2016): the CIFAR family (ResNet-20 ... 110) and the ImageNet ResNet-18 / 50.

They are the backbones that the layer-skipping methods (SkipNet, BlockDrop, DynConv) gate block by block, so each
residual block is a :class:`ResidualBlock` with exactly three parts: ``branch`` (the residual function),
``shortcut`` (identity, zero-padded identity or 1x1 projection) and ``act`` (the activation after the sum).
A gate can run ``act(shortcut(x) + branch(x))`` for the samples that execute the block and ``act(shortcut(x))``
for the others; ``ResNet.block_info`` lists every block's module path, output channels and cumulative stride.

Every architecture is a stage table (:class:`ResStageCfg`) decoded by one builder (:class:`ResNet`). The ImageNet
models are layer-for-layer torchvision's ``resnet18`` / ``resnet50`` (ResNet v1.5: stride on the 3x3 conv of the
bottleneck): same parameters in the same order, same MACs, same initialisation, so a torchvision state dict loads
by position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvNormAct, make_divisible
from .base import Backbone, StageInfo
from .registry import register_model

LayerFactory = Callable[..., nn.Module]
SHORTCUTS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """Option A of He et al.: identity with stride-s subsampling and zero channels appended; no parameters.

    The new channels are split evenly before and after the input's, as in the paper's CIFAR models.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"zero-padded shortcut cannot reduce channels ({in_chs} -> {out_chs}); use shortcut='B'")
        extra = out_chs - in_chs
        self.stride, self.pad_before, self.pad_after = stride, extra // 2, extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


def make_shortcut(in_chs: int, out_chs: int, stride: int, kind: str, norm_layer: LayerFactory) -> nn.Module:
    """Identity when the shape is kept; otherwise option ``"A"`` (zero-pad) or ``"B"`` (1x1 conv + norm)."""
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    if kind == "A":
        return ZeroPadShortcut(in_chs, out_chs, stride)
    return ConvNormAct(in_chs, out_chs, 1, stride=stride, norm_layer=norm_layer, activation_layer=None)


class ResidualBlock(nn.Module):
    """``act(branch(x) + shortcut(x))``. Subclasses only build ``branch``, a sequence of ConvNormAct units whose
    last one has no activation (its norm is the one ``zero_init_residual`` zeroes)."""

    expansion: int = 1

    def __init__(self, branch: nn.Sequential, in_chs: int, out_chs: int, stride: int, shortcut: str,
                 norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.branch = branch
        self.shortcut = make_shortcut(in_chs, out_chs, stride, shortcut, norm_layer)
        self.act = act_layer(inplace=True)

    @property
    def last_norm(self) -> nn.Module:
        return self.branch[-1][1]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.branch(x) + self.shortcut(x))

    # -- the block's description for dynamic execution (dyncnn.dynamic.blocks.ResidualBranchBlock) ----------
    def branch_units(self) -> list[nn.Module]:
        return list(self.branch)

    def merge(self, x: Tensor, out: Tensor) -> Tensor:
        return self.act(out + self.shortcut(x))

    @property
    def identity_skip(self) -> bool:
        return isinstance(self.shortcut, nn.Identity)

    @property
    def plain_branch(self) -> bool:
        return True

    @property
    def post_act(self) -> nn.Module:
        return self.act

    @property
    def channel_gateable(self) -> bool:
        return len(self.branch) >= 2


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets); ``width`` channels out."""

    expansion = 1

    def __init__(self, in_chs: int, width: int, stride: int = 1, shortcut: str = "B",
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        out_chs = width * self.expansion
        branch = nn.Sequential(
            ConvNormAct(in_chs, width, 3, stride=stride, norm_layer=norm_layer, activation_layer=act_layer),
            ConvNormAct(width, out_chs, 3, norm_layer=norm_layer, activation_layer=None),
        )
        super().__init__(branch, in_chs, out_chs, stride, shortcut, norm_layer, act_layer)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided: ResNet v1.5 as in torchvision), 1x1 expand to ``4 * width`` channels."""

    expansion = 4

    def __init__(self, in_chs: int, width: int, stride: int = 1, shortcut: str = "B",
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        out_chs = width * self.expansion
        branch = nn.Sequential(
            ConvNormAct(in_chs, width, 1, norm_layer=norm_layer, activation_layer=act_layer),
            ConvNormAct(width, width, 3, stride=stride, norm_layer=norm_layer, activation_layer=act_layer),
            ConvNormAct(width, out_chs, 1, norm_layer=norm_layer, activation_layer=None),
        )
        super().__init__(branch, in_chs, out_chs, stride, shortcut, norm_layer, act_layer)


@dataclass(frozen=True)
class ResStageCfg:
    """One stage: ``depth`` blocks of type ``block``; the first has stride ``stride``."""
    block: type[ResidualBlock]
    depth: int
    width: int          # channels of the 3x3 convs; the stage outputs width * block.expansion
    stride: int


@dataclass(frozen=True)
class ResNetCfg:
    """A whole ResNet: stem (conv k x k / stride, optional 3x3 stride-2 max-pool) and the stage table."""
    stages: tuple[ResStageCfg, ...]
    stem_chs: int
    stem_kernel: int
    stem_stride: int
    stem_pool: bool


def cifar_cfg(depth: int) -> ResNetCfg:
    """He et al.'s CIFAR design: 3x3 conv 16, three stages of n basic blocks at 16/32/64 channels, n = (depth-2)/6."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110 are registered as "
                         f"resnet<depth>_cifar; 8, 14, 1202, ... also work), got {depth!r}")
    n = (depth - 2) // 6
    stages = tuple(ResStageCfg(BasicBlock, n, w, s) for w, s in ((16, 1), (32, 2), (64, 2)))
    return ResNetCfg(stages, stem_chs=16, stem_kernel=3, stem_stride=1, stem_pool=False)


_IMAGENET_DEPTHS: dict[int, tuple[type[ResidualBlock], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def imagenet_cfg(depth: int) -> ResNetCfg:
    """torchvision's ImageNet ResNets: 7x7/2 conv 64 + max-pool, four stages at 64/128/256/512 (x expansion)."""
    if depth not in _IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET_DEPTHS)} "
                         f"(registered: resnet18, resnet50), got {depth!r}")
    block, depths = _IMAGENET_DEPTHS[depth]
    stages = tuple(ResStageCfg(block, d, w, s) for d, w, s in zip(depths, (64, 128, 256, 512), (1, 2, 2, 2)))
    return ResNetCfg(stages, stem_chs=64, stem_kernel=7, stem_stride=2, stem_pool=True)


class ResNet(Backbone):
    """The one builder of every ResNet: decodes a :class:`ResNetCfg` into stem, stages of residual blocks, head.

    ``shortcut``: ``"B"`` (default; a 1x1 projection + norm wherever the shape changes, identity elsewhere, as in
    torchvision) or ``"A"`` (parameter-free zero-padded identity, He et al.'s CIFAR choice behind the published
    CIFAR parameter counts). ``width_mult`` scales every stage and stem width (rounded by ``make_divisible``).
    ``zero_init_residual`` zeroes the last norm of each branch so that every block starts as the identity.
    """

    def __init__(self, cfg: ResNetCfg, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 shortcut: str = "B", zero_init_residual: bool = False, drop_rate: float = 0.0,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS} (A: zero-padded identity, B: 1x1 projection), "
                             f"got {shortcut!r}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        self.num_classes, self.in_chans = num_classes, in_chans

        def scaled(w: int) -> int:
            return w if width_mult == 1.0 else make_divisible(w * width_mult, 8)

        chs = scaled(cfg.stem_chs)
        stem: list[nn.Module] = [ConvNormAct(in_chans, chs, cfg.stem_kernel, stride=cfg.stem_stride,
                                             norm_layer=norm_layer, activation_layer=act_layer)]
        if cfg.stem_pool:
            stem.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        stride = cfg.stem_stride * (2 if cfg.stem_pool else 1)

        stages, self.stage_info, self.block_info = [], [], []
        for i, sc in enumerate(cfg.stages):
            if sc.depth < 1:
                raise ValueError(f"stage {i} needs at least one block, got depth {sc.depth}")
            blocks = []
            for j in range(sc.depth):
                s = sc.stride if j == 0 else 1
                stride *= s
                blocks.append(sc.block(chs, scaled(sc.width), stride=s, shortcut=shortcut,
                                       norm_layer=norm_layer, act_layer=act_layer))
                chs = blocks[-1].out_chs
                self.block_info.append(StageInfo(f"stages.{i}.{j}", chs, stride))
            stages.append(nn.Sequential(*blocks))
            self.stage_info.append(StageInfo(f"stages.{i}", chs, stride))
        self.stages = nn.Sequential(*stages)
        self.num_features = chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(chs, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's scheme (He init, fan_out); the classifier keeps nn.Linear's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResidualBlock) and getattr(m.last_norm, "weight", None) is not None:
                    nn.init.zeros_(m.last_norm.weight)

    def blocks(self) -> list[ResidualBlock]:
        """The residual blocks in execution order (same order as ``block_info``)."""
        return [b for stage in self.stages for b in stage]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)


def resnet_cifar(depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """A CIFAR ResNet of any depth 6n+2 (e.g. 1202); the common depths are registered as ``resnet<d>_cifar``."""
    return ResNet(cifar_cfg(depth), num_classes=num_classes, **kwargs)


def resnet_imagenet(depth: int, num_classes: int = 1000, **kwargs) -> ResNet:
    """An ImageNet ResNet of depth 18, 34, 50, 101 or 152 (torchvision's layouts)."""
    return ResNet(imagenet_cfg(depth), num_classes=num_classes, **kwargs)


# Published CIFAR figures are He et al.'s (option A shortcuts, CIFAR-10 head); the default build uses option B,
# which adds about 1% parameters (the 1x1 projections at the two stage transitions).
def _cifar_published(params: float, **extra) -> dict:
    return {"params": params, "input_size": 32, "note": "He et al. 2016, option A shortcuts", **extra}


@register_model(name="resnet20_cifar", published=_cifar_published(0.27e6, macs=41e6))
def resnet20_cifar(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-20 for CIFAR: 3 basic blocks per stage."""
    return resnet_cifar(20, num_classes=num_classes, **kwargs)


@register_model(name="resnet32_cifar", published=_cifar_published(0.46e6))
def resnet32_cifar(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-32 for CIFAR: 5 basic blocks per stage."""
    return resnet_cifar(32, num_classes=num_classes, **kwargs)


@register_model(name="resnet44_cifar", published=_cifar_published(0.66e6))
def resnet44_cifar(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-44 for CIFAR: 7 basic blocks per stage."""
    return resnet_cifar(44, num_classes=num_classes, **kwargs)


@register_model(name="resnet56_cifar", published=_cifar_published(0.85e6))
def resnet56_cifar(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-56 for CIFAR: 9 basic blocks per stage."""
    return resnet_cifar(56, num_classes=num_classes, **kwargs)


@register_model(name="resnet110_cifar", published=_cifar_published(1.7e6))
def resnet110_cifar(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-110 for CIFAR: 18 basic blocks per stage (the SkipNet / BlockDrop backbone)."""
    return resnet_cifar(110, num_classes=num_classes, **kwargs)


@register_model(name="resnet18", published={"macs": 1.814e9, "params": 11_689_512, "input_size": 224})
def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18, layer-for-layer torchvision's ``resnet18``."""
    return resnet_imagenet(18, num_classes=num_classes, **kwargs)


@register_model(name="resnet50", published={"macs": 4.089e9, "params": 25_557_032, "input_size": 224})
def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 (v1.5), layer-for-layer torchvision's ``resnet50``."""
    return resnet_imagenet(50, num_classes=num_classes, **kwargs)
