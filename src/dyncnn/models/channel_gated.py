"""Channel-gated (dynamic-width) networks: the zoo's ResNets and MobileNetV2 with per-sample width levels per block.

The mechanism and the choice of nested width levels are explained in :mod:`dyncnn.dynamic.width`. Each builder
takes the gate configuration (``budget``, ``groups``, cost weights, temperatures) and the backbone's
(``num_classes``, ``in_chans``, ``width_mult`` and, in ``backbone_cfg``, anything else the backbone accepts).
The backbone is an ordinary zoo model at ``model.backbone``: load a trained static checkpoint there and fine-tune.
"""
from __future__ import annotations

from ..dynamic.width import ChannelGatedNet
from .mobilenet import mobilenet_v2
from .registry import register_model
from .resnet import resnet_cifar


def _gated(backbone, budget: float, groups: int, gate_cfg: dict) -> ChannelGatedNet:
    return ChannelGatedNet(backbone, groups=groups, budget=budget, **gate_cfg)


def _resnet(depth: int, num_classes: int, in_chans: int, width_mult: float, budget: float, groups: int,
            backbone_cfg: dict | None, gate_cfg: dict) -> ChannelGatedNet:
    backbone = resnet_cifar(depth, num_classes=num_classes, in_chans=in_chans, width_mult=width_mult,
                            **(backbone_cfg or {}))
    return _gated(backbone, budget, groups, gate_cfg)


@register_model(name="channel_gated_resnet20_cifar")
def channel_gated_resnet20_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                                 budget: float = 0.5, groups: int = 4, backbone_cfg: dict | None = None,
                                 **gate_cfg) -> ChannelGatedNet:
    """ResNet-20 (CIFAR) with gated widths in each basic block."""
    return _resnet(20, num_classes, in_chans, width_mult, budget, groups, backbone_cfg, gate_cfg)


@register_model(name="channel_gated_resnet32_cifar")
def channel_gated_resnet32_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                                 budget: float = 0.5, groups: int = 4, backbone_cfg: dict | None = None,
                                 **gate_cfg) -> ChannelGatedNet:
    """ResNet-32 (CIFAR) with gated widths in each basic block."""
    return _resnet(32, num_classes, in_chans, width_mult, budget, groups, backbone_cfg, gate_cfg)


@register_model(name="channel_gated_resnet110_cifar")
def channel_gated_resnet110_cifar(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                                  budget: float = 0.5, groups: int = 4, backbone_cfg: dict | None = None,
                                  **gate_cfg) -> ChannelGatedNet:
    """ResNet-110 (CIFAR) with gated widths in each basic block."""
    return _resnet(110, num_classes, in_chans, width_mult, budget, groups, backbone_cfg, gate_cfg)


@register_model(name="channel_gated_resnet14_tiny")
def channel_gated_resnet14_tiny(num_classes: int = 10, in_chans: int = 1, width_mult: float = 0.5,
                                budget: float = 0.5, groups: int = 4, backbone_cfg: dict | None = None,
                                **gate_cfg) -> ChannelGatedNet:
    """Tiny ResNet-14 (CIFAR layout, 8/16/32 channels, one input channel) for ScaledMNIST, tests and demos; its
    static backbone is ``resnet_cifar(14, in_chans=1, width_mult=0.5)``."""
    return _resnet(14, num_classes, in_chans, width_mult, budget, groups, backbone_cfg, gate_cfg)


@register_model(name="channel_gated_resnet20_tiny")
def channel_gated_resnet20_tiny(num_classes: int = 10, in_chans: int = 1, width_mult: float = 0.5,
                                budget: float = 0.5, groups: int = 4, backbone_cfg: dict | None = None,
                                **gate_cfg) -> ChannelGatedNet:
    """ResNet-20 (CIFAR layout, 8/16/32 channels, one input channel) for ScaledMNIST: three basic blocks per stage
    instead of the ResNet-14's two give the gates more redundancy to remove; static backbone
    ``resnet_cifar(20, in_chans=1, width_mult=0.5)``."""
    return _resnet(20, num_classes, in_chans, width_mult, budget, groups, backbone_cfg, gate_cfg)


@register_model(name="channel_gated_mobilenet_v2")
def channel_gated_mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                               budget: float = 0.5, groups: int = 4, backbone_cfg: dict | None = None,
                               **gate_cfg) -> ChannelGatedNet:
    """MobileNetV2 with gated expansion widths in every inverted residual that expands (all but the first)."""
    backbone = mobilenet_v2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult,
                            **(backbone_cfg or {}))
    return _gated(backbone, budget, groups, gate_cfg)


@register_model(name="channel_gated_mobilenet_v2_tiny")
def channel_gated_mobilenet_v2_tiny(num_classes: int = 10, in_chans: int = 1, width_mult: float = 0.25,
                                    budget: float = 0.5, groups: int = 4, backbone_cfg: dict | None = None,
                                    **gate_cfg) -> ChannelGatedNet:
    """MobileNetV2 at width 0.25 with one input channel, for ScaledMNIST and tests."""
    backbone = mobilenet_v2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult,
                            **(backbone_cfg or {}))
    return _gated(backbone, budget, groups, gate_cfg)
