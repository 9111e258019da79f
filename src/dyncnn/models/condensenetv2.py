"""CondenseNetV2 (Yang, Jiang, Cai, Wang, Song, Huang, Tian, CVPR 2021): CondenseNet with sparse feature reactivation.

Each dense layer of CondenseNet also updates the earlier features: a learned sparse 1x1 convolution of its new
output is added to them before the concatenation (``layers/reactivation.py``), learned and condensed by the same
schedule as the learned group convolution. The ImageNet models add hard-swish from block 2 (0-based, so the
third stage on), squeeze-excitation on every layer's new features from block 3, and a head of global pool ->
SE (reduction 16) -> linear to ``fc_chs`` -> hard-swish -> classifier. The classifier is not condensed.

It is built by the CondenseNet builder (``models/condensenet.py``) from a stage table, with the same
``set_progress`` / ``convert`` / ``group_lasso_loss`` / ``load_state_dict`` API.

Sources of every number:
- CondenseNetV2-A / B / C stage tables: official repository jianghaojun/CondenseNetV2, ``model/condensenetv2.py``
  (``cdnv2_a``: stages 1-1-4-6-8, growth 8-8-16-32-64, G = C = 8 for the 1x1, 3x3 and reactivation convolutions,
  fc 828; ``cdnv2_b``: 2-4-6-8-6, growth 6-12-24-48-96, all groups and factors 6, fc 1024; ``cdnv2_c``:
  4-6-8-10-8, growth 8-16-32-64-128, all 8, fc 1024; for all three: bottleneck 4, hard-swish from block 2, SE
  from block 3, head SE reduction 16, stem 3x3 stride 2 to 2 x the first growth rate). In that code the final
  BN is followed by ReLU, not hard-swish, and each layer's SE has reduction 1 and a sigmoid gate.
- Published converted figures (official README): A 46M FLOPs, 2.0M params; B 146M, 3.6M; C 309M, 6.1M
  (224 x 224). The official counter (``utils/tools.py measure_model``) adds ReLU/hard-swish/sigmoid and pooling
  operations; dyncnn counts the MACs of convolutions and linear layers (SE included) of the converted model with
  FlopCounterMode. Measured: A 43.1M (45.9M counted the official way), B 140.5M (146.5M), C 295.8M (309.7M);
  params 2.04M, 3.60M, 6.18M.
- CIFAR: the official code ships no CIFAR configuration. Its README reports CondenseNetV2-110 (41M FLOPs, 0.48M
  params) and -146 (62M, 0.78M) on CIFAR-10. ``condensenetv2_cifar`` follows the CIFAR CondenseNet layout (three
  stages of (depth - 2) / 6 layers, stem stride 1, head as CondenseNet V1's) with reactivation in every layer;
  growth 8-16-32 and G = C = 8 for all three convolutions (the settings of CondenseNetV2-A and -C) are our
  choice, not the authors'. It matches the published parameter count (0.486M vs 0.48M for depth 110, 0.806M vs
  0.78M for 146) but not the published cost (54.3M vs 41M conv+linear MACs for 110, 88.5M vs 62M for 146), so no
  published figures are registered for it: the layout that gives 41M is not documented.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from ..layers.squeeze_excite import SqueezeExcite
from .condensenet import CondenseNet, CondenseNetCfg, DenseStageCfg, build_condensenet, cifar_cfg
from .registry import register_model


@dataclass(frozen=True)
class CondenseNetV2Cfg(CondenseNetCfg):
    """CondenseNet table plus the V2 head: pool -> SE -> linear ``fc_chs`` -> hard-swish -> classifier."""
    fc_chs: int = 1024
    head_se_ratio: float = 1 / 16
    classifier_drop: float = 0.0     # the V2 classifier is not condensed


class CondenseNetV2(CondenseNet):
    """CondenseNet with sparse feature reactivation and the V2 head (the table decides the rest)."""

    def _build_head(self, chs: int, num_classes: int) -> None:
        cfg = self.cfg
        self.head_se = SqueezeExcite(chs, rd_ratio=cfg.head_se_ratio, divisor=1, gate_layer=nn.Sigmoid)
        self.fc = nn.Linear(chs, cfg.fc_chs)
        self.fc_act = nn.Hardswish()
        self.head_hidden_size = cfg.fc_chs
        self.classifier = nn.Linear(cfg.fc_chs, num_classes)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_se(self.pool(x)).flatten(1)
        x = self.head_drop(self.fc_act(self.fc(x)))
        return x if pre_logits else self.classifier(x)


def _imagenet_cfg(depths, growths, gc: int, fc_chs: int) -> CondenseNetV2Cfg:
    stages = tuple(DenseStageCfg(d, k, act="hard_swish" if i >= 2 else "relu", se=i >= 3)
                   for i, (d, k) in enumerate(zip(depths, growths)))
    return CondenseNetV2Cfg(stages, stem_stride=2, groups_1x1=gc, groups_3x3=gc, condense_factor=gc,
                            sfr_groups=gc, sfr_condense_factor=gc, fc_chs=fc_chs)


V2_CFGS = {
    "a": _imagenet_cfg((1, 1, 4, 6, 8), (8, 8, 16, 32, 64), 8, 828),
    "b": _imagenet_cfg((2, 4, 6, 8, 6), (6, 12, 24, 48, 96), 6, 1024),
    "c": _imagenet_cfg((4, 6, 8, 10, 8), (8, 16, 32, 64, 128), 8, 1024),
}


# The published figures are those of the converted (inference) network: `dyncnn zoo` profiles that form.
_CONVERTED = {"profile_cfg": {"converted": True}}


@register_model(name="condensenetv2_a", published={"macs": 46e6, "params": 2.0e6, "input_size": 224, **_CONVERTED})
def condensenetv2_a(num_classes: int = 1000, converted: bool = False, **kwargs) -> CondenseNetV2:
    return build_condensenet(V2_CFGS["a"], CondenseNetV2, converted, num_classes=num_classes, **kwargs)


@register_model(name="condensenetv2_b", published={"macs": 146e6, "params": 3.6e6, "input_size": 224, **_CONVERTED})
def condensenetv2_b(num_classes: int = 1000, converted: bool = False, **kwargs) -> CondenseNetV2:
    return build_condensenet(V2_CFGS["b"], CondenseNetV2, converted, num_classes=num_classes, **kwargs)


@register_model(name="condensenetv2_c", published={"macs": 309e6, "params": 6.1e6, "input_size": 224, **_CONVERTED})
def condensenetv2_c(num_classes: int = 1000, converted: bool = False, **kwargs) -> CondenseNetV2:
    return build_condensenet(V2_CFGS["c"], CondenseNetV2, converted, num_classes=num_classes, **kwargs)


CIFAR_V2_DEPTHS = (110, 146)


@register_model(name="condensenetv2_cifar", published={"input_size": 32, **_CONVERTED})
def condensenetv2_cifar(num_classes: int = 10, depth: int = 110, converted: bool = False, **kwargs) -> CondenseNet:
    """CIFAR CondenseNetV2-``depth`` (110 or 146): CIFAR CondenseNet layout, G = C = 8, reactivation everywhere."""
    if depth not in CIFAR_V2_DEPTHS:
        raise ValueError(f"condensenetv2_cifar: depth must be one of {CIFAR_V2_DEPTHS} (the paper's), got {depth}")
    cfg = replace(cifar_cfg(depth, groups=8), sfr_groups=8, sfr_condense_factor=8)
    return build_condensenet(cfg, converted=converted, num_classes=num_classes, **kwargs)
