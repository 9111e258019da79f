"""CondenseNet (Huang, Liu, van der Maaten, Weinberger, CVPR 2018): a DenseNet that learns its group convolutions.

A dense layer is a learned group 1x1 convolution (``layers/learned_group.py``: BN-ReLU-masked 1x1 conv to
``bottleneck * k`` channels) followed by BN-ReLU-3x3 group convolution to ``k`` channels, concatenated to its
input. Unlike DenseNet, CondenseNet connects every layer to all earlier layers of the network ("fully dense"):
a stage change is a 2x2 average pool with no compressing 1x1 convolution, and the growth rate doubles from stage
to stage. There is no stem norm: the first BN is the first learned group convolution's pre-activation.

Training and deployment (the model API):
- ``set_progress(fraction)``: the trainer calls it before every step with the fraction of training done. The
  ``C - 1`` condensing steps of every learned group convolution fall evenly over the first half of training; the
  classifier drops half of its inputs (smallest L1 norm of their weight columns) at progress 0.5.
- ``group_lasso_loss()`` / ``regularization_loss()`` (``lasso_weight`` x the former): optional group lasso.
- ``convert()`` returns the inference network: index-select + grouped conv + channel shuffle per layer, and an
  index-select + smaller linear classifier. It computes exactly what the masked model computes. It refuses a
  model that is already converted, or whose condensing has not finished (progress < 0.5).
- ``create_model(name, converted=True)`` builds the converted architecture directly (to load a converted
  checkpoint or count its MACs); ``load_state_dict`` names missing, unexpected and mis-shaped keys.

Stage tables and their sources:
- ImageNet CondenseNet-74: 4-6-8-10-8 layers, growth 8-16-32-64-128, stem 3x3 stride 2 to 2 x 8 channels,
  bottleneck 4, G = C = 4 or 8 for both the 1x1 and the 3x3 convolution (paper Sec. 5.2; official repository
  ShichenLiu/CondenseNet README and ``main.py`` defaults ``--group-1x1 4 --group-3x3 4 --condense-factor 4``).
- CIFAR CondenseNet-{50, 74, 86, 98, 110, 122, 182}: three stages of (depth - 2) / 6 layers, growth 8-16-32,
  stem 3x3 stride 1 to 16 channels, G = C = 4 (official README table, ``--stages 14-14-14 --growth 8-16-32`` for
  CondenseNet-86). The paper's CondenseNet-182* uses growth 12-24-48 (official issue #11); the registered
  ``condensenet_cifar182`` keeps 8-16-32 like its siblings.
- Published figures (official README / REFERENCES.md): 74 G=C=4 529M FLOPs, 4.8M params; G=C=8 274M, 2.9M;
  CIFAR-10 CondenseNet-50/74/86/98/110/122: 28.6/51.9/65.8/81.3/98.2/116.7M FLOPs, 0.22/0.41/0.52/0.65/0.79/0.95M
  params. The official counter (``utils.py measure_model``) adds ReLU and pooling operations and counts the
  classifier uncondensed; dyncnn counts the multiply-accumulates of convolutions and linear layers of the
  converted model with FlopCounterMode. Measured: 74 G=C=4 516.6M (530.4M counted the official way), 4.77M
  params; G=C=8 261.6M (275.3M), 2.94M; CIFAR-86 62.4M (65.8M), 0.516M; CIFAR-50 27.2M (28.6M), 0.214M.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..layers.activations import get_act_layer
from ..layers.learned_group import (ConversionError, LearnedGroupConv, LearnedLinear, check_progress,
                                    convert_condensable, group_lasso_loss, set_progress, unfinished_layers)
from ..layers.reactivation import SparseFeatureReactivation
from ..layers.squeeze_excite import SqueezeExcite
from .base import Backbone, StageInfo
from .registry import register_model

LayerFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class DenseStageCfg:
    """One dense stage: ``depth`` dense layers adding ``growth`` channels each."""
    depth: int
    growth: int
    act: str = "relu"        # activation inside the stage's layers (CondenseNetV2: hard-swish from block 2)
    se: bool = False         # squeeze-excitation on each layer's new features (CondenseNetV2: from block 3)


@dataclass(frozen=True)
class CondenseNetCfg:
    """A whole CondenseNet: stage table plus the group / condensation settings shared by every layer."""
    stages: tuple[DenseStageCfg, ...]
    stem_stride: int = 2           # 2 for ImageNet, 1 for CIFAR
    stem_chs: int | None = None    # default: 2 x the first growth rate
    bottleneck: int = 4            # the 1x1 conv outputs bottleneck x growth channels
    groups_1x1: int = 4            # G of the learned group convolution
    groups_3x3: int = 4            # groups of the 3x3 convolution
    condense_factor: int = 4       # C of the learned group convolution
    sfr_groups: int = 0            # CondenseNetV2 sparse feature reactivation groups (0: none, CondenseNet V1)
    sfr_condense_factor: int = 0   # its condensation factor (0: same as sfr_groups)
    classifier_drop: float = 0.5   # fraction of classifier inputs dropped by learned importance (V1)


class PreActConv(nn.Sequential):
    """Norm -> act -> conv, the pre-activation order of DenseNet layers."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, groups: int = 1,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        super().__init__(OrderedDict([
            ("norm", norm_layer(in_chs)), ("act", act_layer()),
            ("conv", nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)),
        ]))


class DenseLayer(nn.Module):
    """Learned group 1x1 conv -> 3x3 group conv (-> SE) -> [features (updated by SFR), new features]."""

    def __init__(self, in_chs: int, stage: DenseStageCfg, cfg: CondenseNetCfg,
                 norm_layer: LayerFactory = nn.BatchNorm2d, drop_rate: float = 0.0):
        super().__init__()
        act = get_act_layer(stage.act)
        mid = cfg.bottleneck * stage.growth
        self.conv1 = LearnedGroupConv(in_chs, mid, cfg.groups_1x1, cfg.condense_factor, norm_layer, act, drop_rate)
        self.conv2 = PreActConv(mid, stage.growth, 3, cfg.groups_3x3, norm_layer, act)
        # The official SE of a dense layer: reduction 1, ReLU inside, sigmoid gate.
        self.se = (SqueezeExcite(stage.growth, rd_ratio=1.0, divisor=1, gate_layer=nn.Sigmoid)
                   if stage.se else nn.Identity())
        self.sfr = (SparseFeatureReactivation(stage.growth, in_chs, cfg.sfr_groups,
                                              cfg.sfr_condense_factor or cfg.sfr_groups, norm_layer, act)
                    if cfg.sfr_groups else None)

    def forward(self, x: Tensor) -> Tensor:
        new = self.se(self.conv2(self.conv1(x)))
        if self.sfr is not None:
            x = self.sfr(new, x)
        return torch.cat([x, new], 1)


def _check_cfg(cfg: CondenseNetCfg) -> None:
    if not cfg.stages:
        raise ValueError("CondenseNet needs at least one stage")
    if cfg.stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 (CIFAR) or 2 (ImageNet), got {cfg.stem_stride}")
    for i, s in enumerate(cfg.stages):
        if s.depth < 1 or s.growth < 1:
            raise ValueError(f"stage {i}: depth and growth must be >= 1, got {s}")
        mid = cfg.bottleneck * s.growth
        if mid % cfg.groups_1x1 or mid % cfg.groups_3x3 or s.growth % cfg.groups_3x3:
            raise ValueError(f"stage {i}: growth {s.growth} (bottleneck width {mid}) is not divisible by "
                             f"groups_1x1={cfg.groups_1x1} / groups_3x3={cfg.groups_3x3}; supported growth "
                             f"rates are multiples of {max(cfg.groups_1x1, cfg.groups_3x3)}")
        if cfg.sfr_groups and s.growth % cfg.sfr_groups:
            raise ValueError(f"stage {i}: growth {s.growth} is not divisible by sfr_groups={cfg.sfr_groups}")


class CondenseNet(Backbone):
    """The one builder of CondenseNet V1 and V2 stage tables (V2 adds reactivation, SE and its own head)."""

    def __init__(self, cfg: CondenseNetCfg, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 head_drop_rate: float = 0.0, lasso_weight: float = 0.0,
                 norm_layer: LayerFactory = nn.BatchNorm2d):
        super().__init__()
        _check_cfg(cfg)
        self.cfg, self.num_classes, self.in_chans = cfg, num_classes, in_chans
        self.lasso_weight = float(lasso_weight)
        self.is_converted = False
        self.progress = 0.0
        c = cfg.stem_chs or 2 * cfg.stages[0].growth
        self.stem = nn.Conv2d(in_chans, c, 3, stride=cfg.stem_stride, padding=1, bias=False)
        stages, info, stride = [], [], cfg.stem_stride
        for i, s in enumerate(cfg.stages):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 0:
                layers["pool"] = nn.AvgPool2d(2)    # the fully dense "transition": pooling only
                stride *= 2
            for j in range(s.depth):
                layers[f"layer{j + 1}"] = DenseLayer(c + j * s.growth, s, cfg, norm_layer, drop_rate)
            c += s.depth * s.growth
            stages.append(nn.Sequential(layers))
            info.append(StageInfo(f"stages.{i}", c, stride))
        self.stages = nn.Sequential(*stages)
        self.stage_info = info
        self.num_features = c
        self.final_norm = norm_layer(c)
        self.final_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(head_drop_rate)
        self._build_head(c, num_classes)
        self.min_input_size = 32
        self._init_weights()

    def _build_head(self, chs: int, num_classes: int) -> None:
        drop = self.cfg.classifier_drop
        self.classifier = LearnedLinear(chs, num_classes, drop) if drop > 0 else nn.Linear(chs, num_classes)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.final_act(self.final_norm(self.stages(self.stem(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pool(x).flatten(1))
        return x if pre_logits else self.classifier(x)

    # ---- condensing API --------------------------------------------------------------------------------------

    def set_progress(self, fraction: float) -> None:
        """Advance the condensing schedule to ``fraction`` of training done (the trainer calls this every step)."""
        self.progress = check_progress(fraction)
        set_progress(self, self.progress)

    def group_lasso_loss(self) -> Tensor:
        """Group-lasso penalty of every learned sparse layer still condensing (0 once condensing is done)."""
        return group_lasso_loss(self)

    def regularization_loss(self) -> Tensor:
        """``lasso_weight`` x :meth:`group_lasso_loss`; the trainer adds it to the loss."""
        if self.lasso_weight == 0:
            return self.stem.weight.new_zeros(())
        return self.lasso_weight * self.group_lasso_loss()

    def convert(self) -> CondenseNet:
        """The inference network (a new model; this one is left as it is), equal in output to this masked one."""
        name = type(self).__name__
        if self.is_converted:
            raise ConversionError(f"{name}.convert(): this model is already converted (it is the inference "
                                  f"network); convert() applies to the masked training model")
        pending = unfinished_layers(self)
        if pending:
            raise ConversionError(
                f"{name}.convert(): the condensing stages have not finished ({len(pending)} layers pending, "
                f"e.g. {', '.join(pending[:3])}); they end at progress 0.5 of training, the last progress set "
                f"was {self.progress:g}; train further or call set_progress(f) with f >= 0.5 first")
        new = copy.deepcopy(self)
        convert_condensable(new)
        new.is_converted = True
        spec = getattr(self, "dyncnn_spec", None)
        if spec:
            new.dyncnn_spec = {**spec, "cfg": {**spec.get("cfg", {}), "converted": True}}
        return new

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that names mismatched keys and says when converted-ness differs."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict)) if strict else []
        unexpected = sorted(set(state_dict) - set(own)) if strict else []
        shapes = sorted(f"{k} (model {tuple(own[k].shape)}, checkpoint {tuple(state_dict[k].shape)})"
                        for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
        if missing or unexpected or shapes:
            def few(items: list[str]) -> str:
                return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
            parts = [f"missing keys: {few(missing)}" if missing else "",
                     f"unexpected keys: {few(unexpected)}" if unexpected else "",
                     f"shape mismatches: {few(shapes)}" if shapes else ""]
            ckpt_converted = any(k.endswith(".index") for k in state_dict)
            hint = ""
            if ckpt_converted != self.is_converted:
                hint = ("; the checkpoint is of a converted model and this one is not: build it with "
                        "converted=True or call convert() first" if ckpt_converted else
                        "; the checkpoint is of an unconverted (masked training) model and this one is converted: "
                        "load it into the training model, then convert()")
            raise CheckpointError(f"state dict does not fit {type(self).__name__} "
                                  f"({'converted' if self.is_converted else 'training form'}): "
                                  + "; ".join(p for p in parts if p) + hint)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_condensenet(cfg: CondenseNetCfg, model_cls: type[CondenseNet] = CondenseNet, converted: bool = False,
                      **kwargs) -> CondenseNet:
    """Build a model from its table; ``converted=True`` gives the inference architecture (weights arbitrary)."""
    model = model_cls(cfg, **kwargs)
    if converted:
        model.set_progress(1.0)
        model = model.convert()
    return model


# ---- registered models -----------------------------------------------------------------------------------------

def _imagenet74_cfg(gc: int) -> CondenseNetCfg:
    stages = tuple(DenseStageCfg(d, k) for d, k in zip((4, 6, 8, 10, 8), (8, 16, 32, 64, 128)))
    return CondenseNetCfg(stages, stem_stride=2, groups_1x1=gc, groups_3x3=gc, condense_factor=gc)


CIFAR_DEPTHS = (50, 74, 86, 98, 110, 122, 182)


def cifar_cfg(depth: int, growth: tuple[int, int, int] = (8, 16, 32), groups: int = 4) -> CondenseNetCfg:
    """CIFAR CondenseNet-``depth``: three stages of (depth - 2) / 6 layers (each layer is two convolutions)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"CIFAR CondenseNet depth must be 6 n + 2 (published: {CIFAR_DEPTHS}), got {depth}")
    n = (depth - 2) // 6
    stages = tuple(DenseStageCfg(n, k) for k in growth)
    return CondenseNetCfg(stages, stem_stride=1, groups_1x1=groups, groups_3x3=groups, condense_factor=groups)


# The published figures are those of the converted (inference) network: `dyncnn zoo` profiles that form.
_CONVERTED = {"profile_cfg": {"converted": True}}


@register_model(name="condensenet74_c4_g4", published={"macs": 529e6, "params": 4.8e6, "input_size": 224, **_CONVERTED})
def condensenet74_c4_g4(num_classes: int = 1000, converted: bool = False, **kwargs) -> CondenseNet:
    return build_condensenet(_imagenet74_cfg(4), converted=converted, num_classes=num_classes, **kwargs)


@register_model(name="condensenet74_c8_g8", published={"macs": 274e6, "params": 2.9e6, "input_size": 224, **_CONVERTED})
def condensenet74_c8_g8(num_classes: int = 1000, converted: bool = False, **kwargs) -> CondenseNet:
    return build_condensenet(_imagenet74_cfg(8), converted=converted, num_classes=num_classes, **kwargs)


_CIFAR_PUBLISHED = {50: (28.6e6, 0.22e6), 74: (51.9e6, 0.41e6), 86: (65.8e6, 0.52e6), 98: (81.3e6, 0.65e6),
                    110: (98.2e6, 0.79e6), 122: (116.7e6, 0.95e6)}


def _register_cifar(depth: int) -> None:
    published = _CIFAR_PUBLISHED.get(depth)
    figures = {"macs": published[0], "params": published[1]} if published else {}
    figures.update(input_size=32, **_CONVERTED)

    def builder(num_classes: int = 10, converted: bool = False, **kwargs) -> CondenseNet:
        return build_condensenet(cifar_cfg(depth), converted=converted, num_classes=num_classes, **kwargs)

    builder.__name__ = builder.__qualname__ = f"condensenet_cifar{depth}"
    builder.__doc__ = f"CIFAR CondenseNet-{depth} (G = C = 4, growth 8-16-32), 10 classes by default."
    register_model(builder, name=builder.__name__, published=figures)
    globals()[builder.__name__] = builder


for _depth in CIFAR_DEPTHS:
    _register_cifar(_depth)
