"""DenseNets (Huang et al., CVPR 2017): CIFAR DenseNet-BC and the ImageNet DenseNet-121.

DenseNet is the backbone that MSDNet and CondenseNet are measured against. A dense layer is BN-ReLU-1x1 conv
(``bn_size * k`` channels)-BN-ReLU-3x3 conv (``k`` channels) whose output is concatenated to its input; a
transition is BN-ReLU-1x1 conv (``compression`` x channels)-2x2 average pool.

Every architecture is a stage table (:class:`DenseStageCfg`) decoded by one builder (:class:`DenseNet`). Stage
``i > 0`` is ``transition`` then ``block``, so each stage ends on its dense block's concatenated output, the
natural place for an early exit. The ImageNet model is layer-for-layer torchvision's ``densenet121``: same
parameters in the same order, same MACs, same initialisation, so a torchvision state dict loads by position.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvNormAct
from .base import Backbone, StageInfo
from .registry import register_model

LayerFactory = Callable[..., nn.Module]


class DenseLayer(nn.Sequential):
    """BN-ReLU-1x1 conv (bn_size * k)-BN-ReLU-3x3 conv (k): the ``k`` new channels of one dense layer."""

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        mid = bn_size * growth_rate
        super().__init__(OrderedDict([
            ("norm1", norm_layer(in_chs)), ("act1", act_layer(inplace=True)),
            ("conv1", nn.Conv2d(in_chs, mid, 1, bias=False)),
            ("norm2", norm_layer(mid)), ("act2", act_layer(inplace=True)),
            ("conv2", nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)),
        ]))
        self.in_chs, self.out_chs, self.drop_rate = in_chs, growth_rate, float(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        # The in-place activations act on norm outputs, never on the concatenated input that later layers share.
        x = super().forward(x)
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, in_chs: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        super().__init__({f"layer{i + 1}": DenseLayer(in_chs + i * growth_rate, growth_rate, bn_size, drop_rate,
                                                      norm_layer, act_layer) for i in range(num_layers)})
        self.in_chs, self.out_chs = in_chs, in_chs + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1) if len(features) > 1 else x))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool: compresses the channels and halves the resolution between blocks."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: LayerFactory = nn.BatchNorm2d,
                 act_layer: LayerFactory = nn.ReLU):
        super().__init__(OrderedDict([
            ("norm", norm_layer(in_chs)), ("act", act_layer(inplace=True)),
            ("conv", nn.Conv2d(in_chs, out_chs, 1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))
        self.in_chs, self.out_chs = in_chs, out_chs


@dataclass(frozen=True)
class DenseStageCfg:
    """One dense block: ``num_layers`` layers adding ``growth_rate`` channels each, bottleneck ``bn_size * k``."""
    num_layers: int
    growth_rate: int
    bn_size: int = 4


@dataclass(frozen=True)
class DenseNetCfg:
    """A whole DenseNet. ``imagenet_stem``: 7x7/2 conv-BN-ReLU + 3x3/2 max-pool; otherwise a bare 3x3 conv
    (Huang et al.'s CIFAR stem; the first dense layer's BN-ReLU follows it)."""
    stages: tuple[DenseStageCfg, ...]
    stem_chs: int
    imagenet_stem: bool
    compression: float = 0.5


def cifar_bc_cfg(depth: int = 100, growth_rate: int = 12, compression: float = 0.5) -> DenseNetCfg:
    """DenseNet-BC for CIFAR: three blocks of (depth - 4) / 6 bottleneck layers, stem of 2k channels."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC CIFAR depth must be 6n+4 with n >= 1 (e.g. 100, 190, 250; default 100), "
                         f"got {depth!r}")
    if growth_rate < 1:
        raise ValueError(f"growth_rate must be >= 1, got {growth_rate}")
    n = (depth - 4) // 6
    return DenseNetCfg(tuple(DenseStageCfg(n, growth_rate) for _ in range(3)), stem_chs=2 * growth_rate,
                       imagenet_stem=False, compression=compression)


_IMAGENET_DEPTHS = {121: (32, (6, 12, 24, 16), 64)}


def imagenet_cfg(depth: int = 121) -> DenseNetCfg:
    """torchvision's ImageNet DenseNets (k = 32, 64 stem channels)."""
    if depth not in _IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet DenseNet depth must be one of {sorted(_IMAGENET_DEPTHS)} "
                         f"(registered: densenet121), got {depth!r}")
    k, layers, stem = _IMAGENET_DEPTHS[depth]
    return DenseNetCfg(tuple(DenseStageCfg(n, k) for n in layers), stem_chs=stem, imagenet_stem=True)


class DenseNet(Backbone):
    """The one builder of every DenseNet: stem, stages of (transition, dense block), final BN-ReLU, linear head.

    ``drop_rate`` is dropout before the classifier (timm's convention); ``layer_drop_rate`` is dropout after each
    dense layer (torchvision's ``drop_rate``; Huang et al. use 0.2 on CIFAR without augmentation).
    """

    def __init__(self, cfg: DenseNetCfg, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 layer_drop_rate: float = 0.0, norm_layer: LayerFactory = nn.BatchNorm2d,
                 act_layer: LayerFactory = nn.ReLU):
        super().__init__()
        if not 0.0 < cfg.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {cfg.compression}")
        self.num_classes, self.in_chans = num_classes, in_chans
        chs = cfg.stem_chs
        if cfg.imagenet_stem:
            self.stem = nn.Sequential(
                ConvNormAct(in_chans, chs, 7, stride=2, norm_layer=norm_layer, activation_layer=act_layer),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            stride = 4
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, chs, 3, padding=1, bias=False))
            stride = 1

        stages, self.stage_info = [], []
        for i, sc in enumerate(cfg.stages):
            if sc.num_layers < 1:
                raise ValueError(f"dense block {i} needs at least one layer, got {sc.num_layers}")
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 0:
                parts["transition"] = Transition(chs, int(math.floor(chs * cfg.compression)), norm_layer, act_layer)
                chs, stride = parts["transition"].out_chs, stride * 2
            parts["block"] = DenseBlock(sc.num_layers, chs, sc.growth_rate, sc.bn_size, layer_drop_rate,
                                        norm_layer, act_layer)
            chs = parts["block"].out_chs
            stages.append(nn.Sequential(parts))
            self.stage_info.append(StageInfo(f"stages.{i}", chs, stride))
        self.stages = nn.Sequential(*stages)
        self.final_norm = nn.Sequential(norm_layer(chs), act_layer(inplace=True))
        self.num_features = chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(chs, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's scheme (from the original Lua code): He init (fan_in), unit BN, zero classifier bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image -> final BN-ReLU feature map (``stage_info`` points at the pre-norm dense-block outputs)."""
        return self.final_norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)


@register_model(name="densenet_bc_cifar", published={"params": 0.8e6, "input_size": 32,
                                                      "note": "Huang et al. 2017, DenseNet-BC-100, k=12"})
def densenet_bc_cifar(num_classes: int = 10, depth: int = 100, growth_rate: int = 12, compression: float = 0.5,
                      **kwargs) -> DenseNet:
    """DenseNet-BC for CIFAR (default: depth 100, k = 12, compression 0.5)."""
    return DenseNet(cifar_bc_cfg(depth, growth_rate, compression), num_classes=num_classes, **kwargs)


@register_model(name="densenet121", published={"macs": 2.834e9, "params": 7_978_856, "input_size": 224})
def densenet121(num_classes: int = 1000, **kwargs) -> DenseNet:
    """DenseNet-121, layer-for-layer torchvision's ``densenet121``."""
    return DenseNet(imagenet_cfg(121), num_classes=num_classes, **kwargs)
