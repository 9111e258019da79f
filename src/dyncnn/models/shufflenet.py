"""ShuffleNet V1 and V2 as stage tables decoded by one builder.

Both families are: stem (3x3 stride-2 convolution, 24 channels at 1x, + 3x3 stride-2 max-pool) -> three stages of
4 / 8 / 4 units whose first unit has stride 2 -> [1x1 head convolution, V2 only] -> global pool -> classifier.
A :class:`ShuffleNetArch` holds the stage table at the chosen width; :func:`build_stages` decodes it into
:class:`ShuffleUnitCfg` rows (the resolved widths of each unit) and builds a :class:`ShuffleV1Unit` or a
:class:`ShuffleV2Unit` from each.

ShuffleNetV1 (Zhang et al., CVPR 2018). Where the paper leaves the layout open we took the reading of the
official code (megvii-model/ShuffleNet-Series), checked against the published cost: conv+linear MACs at 224 are
identical to that code's and parameters differ only by the classifier bias (1,000), which we keep.

- the bottleneck is 1/4 of the unit's *full* output width, also in a stride-2 unit whose branch only produces
  ``out - in`` channels: 1x g=3 gives 137.5M MACs / 1.87M params, g=8 138.4M / 2.43M (published 138M / 1.9M
  and 138M / 2.4M; a quarter of the branch width instead gives 127M / 128M, 7% low);
- the channel shuffle sits between the first grouped 1x1 convolution and the depthwise 3x3 (the paper's Fig. 2;
  the official code shuffles after the depthwise convolution, which is the same function up to a permutation
  of the depthwise filters); the first unit of stage 2, whose 1x1 convolution is dense (24 input channels are
  too few to group), has no shuffle, since a dense convolution already mixes every channel;
- no ReLU after the depthwise convolution nor after the last 1x1 convolution; ReLU after the addition /
  concatenation (the pooled shortcut of a ReLU output is non-negative, so this equals the code's ReLU on the
  branch alone);
- width ``s`` scales Table 1's stage widths, rounded by ``make_divisible`` to a multiple of 4 x groups (so the
  bottleneck splits into the groups; a no-op at the official widths); the stem is 12 / 24 / 24 / 48 channels at
  0.5x / 1x / 1.5x / 2x as in the official code, rounded to a multiple of the groups (12 -> 16 at g=8). With it,
  0.5x-2x at g=3 and g=8 reproduce the official table (38 / 138 / 292 / 524M and 40 / 138 / 290 / 522M).

ShuffleNetV2 (Ma et al., ECCV 2018) follows the paper's layout (the official code), not torchvision's: the first
unit of a stage keeps the input width on its shortcut branch (depthwise 3x3 s2 + 1x1) and its main branch
outputs ``out - in`` channels; the bottleneck is ``out / 2`` everywhere. Stage widths are the paper's Table 5
(not a formula: 0.5x is 48, 1x 116, 1.5x 176, 2x 244 in stage 2). 1x / 1.5x / 2x land within 0.15% of the
published 146 / 299 / 591M; 0.5x counts 40.48M against the published 41M (-1.3%), the same as the official code
gives under this convention (its 41M is not reproduced by conv+linear MACs of any layout we know).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from ..layers import ChannelShuffle, ConvNormAct, GroupConv2d, make_divisible
from .base import Backbone, StageInfo
from .registry import register_model

ModuleFactory = Callable[..., nn.Module]

# Stem width per width multiplier, the official code's (rounded to a multiple of the groups, so that the first
# stride-2 branch, out - stem channels, splits into the groups: 12 -> 16 for g=8).
V1_STEM_WIDTHS = {0.5: 12, 1.0: 24, 1.5: 24, 2.0: 48}
V1_WIDTHS = tuple(V1_STEM_WIDTHS)
# Table 1 of the ShuffleNetV1 paper: output channels of stages 2-4 at width 1x, per number of groups.
V1_STAGE_WIDTHS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088),
                   8: (384, 768, 1536)}
V1_GROUPS = tuple(V1_STAGE_WIDTHS)
# Table 5 of the ShuffleNetV2 paper: stages 2-4 and conv5 per width.
V2_STAGE_WIDTHS = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024), 1.5: (176, 352, 704, 1024),
                   2.0: (244, 488, 976, 2048)}
STAGE_REPEATS = (4, 8, 4)
STEM_CHS = 24


@dataclass(frozen=True)
class StageCfg:
    """One stage: ``repeat`` units producing ``out`` channels, the first with ``stride``."""
    out: int
    repeat: int
    stride: int = 2


@dataclass(frozen=True)
class ShuffleNetArch:
    """A whole network at its final width. ``unit`` picks the unit type ("v1" or "v2")."""
    unit: str
    stages: tuple[StageCfg, ...]
    bottleneck_ratio: float          # bottleneck width / unit output width (V1: 1/4, V2: 1/2)
    groups: int = 1                  # V1: groups of the 1x1 convolutions (the shuffle's groups)
    stem_chs: int = STEM_CHS
    head_chs: int = 0                # 1x1 convolution after the last stage (V2's conv5); 0: none


@dataclass(frozen=True)
class ShuffleUnitCfg:
    """The resolved widths of one unit, what the unit classes are built from."""
    in_chs: int
    out_chs: int
    mid_chs: int
    stride: int = 1
    groups: int = 1                  # V1: groups of the 1x1 convolutions
    first_groups: int = 1            # V1: groups of the first 1x1 convolution (1 in the first unit of stage 2)


def group_conv_norm_act(in_chs: int, out_chs: int, groups: int, norm_layer: ModuleFactory,
                        act_layer: ModuleFactory | None) -> nn.Sequential:
    """Grouped 1x1 ``GroupConv2d`` (which checks that the widths split into the groups) + norm [+ activation].

    Laid out like ``ConvNormAct`` (children 0, 1, 2), which cannot take another convolution class.
    """
    layers = [GroupConv2d(in_chs, out_chs, 1, groups=groups), norm_layer(out_chs)]
    if act_layer is not None:
        layers.append(act_layer(inplace=True))
    return nn.Sequential(*layers)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, merged with the shortcut, then ReLU.

    Stride 1: the branch outputs ``out_chs`` and is added to the input. Stride 2: the shortcut is a 3x3 stride-2
    average pool of the input, and the branch outputs ``out_chs - in_chs`` channels concatenated after it.
    """

    def __init__(self, cfg: ShuffleUnitCfg, norm_layer: ModuleFactory = nn.BatchNorm2d,
                 act_layer: ModuleFactory = nn.ReLU):
        super().__init__()
        if not ((cfg.stride == 1 and cfg.in_chs == cfg.out_chs) or (cfg.stride == 2 and cfg.out_chs > cfg.in_chs)):
            raise ValueError(f"ShuffleV1Unit: expected stride 1 with in_chs == out_chs or stride 2 with "
                             f"out_chs > in_chs, got {cfg}")
        self.cfg = cfg
        branch_out = cfg.out_chs - cfg.in_chs if cfg.stride == 2 else cfg.out_chs
        self.conv_pw = group_conv_norm_act(cfg.in_chs, cfg.mid_chs, cfg.first_groups, norm_layer, act_layer)
        self.shuffle = ChannelShuffle(cfg.groups) if cfg.first_groups > 1 else nn.Identity()
        self.conv_dw = ConvNormAct(cfg.mid_chs, cfg.mid_chs, 3, stride=cfg.stride, groups=cfg.mid_chs,
                                   norm_layer=norm_layer, activation_layer=None)
        self.conv_pwl = group_conv_norm_act(cfg.mid_chs, branch_out, cfg.groups, norm_layer, None)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if cfg.stride == 2 else nn.Identity()
        self.act = act_layer(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_pwl(self.conv_dw(self.shuffle(self.conv_pw(x))))
        out = torch.cat((self.shortcut(x), y), dim=1) if self.cfg.stride == 2 else x + y
        return self.act(out)


class ShuffleV2Unit(nn.Module):
    """Channel split -> (identity | 1x1, depthwise 3x3, 1x1) -> concatenate -> channel shuffle (2 groups).

    Stride 2: no split; the shortcut branch (depthwise 3x3 s2, 1x1) keeps ``in_chs`` channels and the main branch
    outputs ``out_chs - in_chs``, the layout of the paper's code.
    """

    def __init__(self, cfg: ShuffleUnitCfg, norm_layer: ModuleFactory = nn.BatchNorm2d,
                 act_layer: ModuleFactory = nn.ReLU):
        super().__init__()
        if not ((cfg.stride == 1 and cfg.in_chs == cfg.out_chs) or (cfg.stride == 2 and cfg.out_chs > cfg.in_chs)):
            raise ValueError(f"ShuffleV2Unit: expected stride 1 with in_chs == out_chs or stride 2 with "
                             f"out_chs > in_chs, got {cfg}")
        if cfg.out_chs % 2:
            raise ValueError(f"ShuffleV2Unit: out_chs must be even (split and shuffle in 2 groups), got {cfg}")
        self.cfg = cfg
        conv = partial(ConvNormAct, norm_layer=norm_layer)
        branch_in = cfg.in_chs if cfg.stride == 2 else cfg.in_chs // 2
        branch_out = cfg.out_chs - branch_in
        if cfg.stride == 2:
            self.branch_proj = nn.Sequential(
                conv(cfg.in_chs, cfg.in_chs, 3, stride=2, groups=cfg.in_chs, activation_layer=None),
                conv(cfg.in_chs, cfg.in_chs, 1, activation_layer=act_layer))
        else:
            self.branch_proj = nn.Identity()
        self.branch_main = nn.Sequential(
            conv(branch_in, cfg.mid_chs, 1, activation_layer=act_layer),
            conv(cfg.mid_chs, cfg.mid_chs, 3, stride=cfg.stride, groups=cfg.mid_chs, activation_layer=None),
            conv(cfg.mid_chs, branch_out, 1, activation_layer=act_layer))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.stride == 1:
            # two slices, not chunk(): ExecuTorch's XNNPACK split with a dynamic batch plans its outputs at the
            # export batch (a batch of another size fails at run time); slices are the same views in eager
            half = x.shape[1] // 2
            x_proj, x_main = x[:, :half], x[:, half:]
        else:
            x_proj = x_main = x
        return self.shuffle(torch.cat((self.branch_proj(x_proj), self.branch_main(x_main)), dim=1))


_UNITS: dict[str, type[nn.Module]] = {"v1": ShuffleV1Unit, "v2": ShuffleV2Unit}


def build_stages(arch: ShuffleNetArch, norm_layer: ModuleFactory, act_layer: ModuleFactory,
                 stride: int = 4, prefix: str = "stages") -> tuple[nn.Sequential, list[StageInfo], int]:
    """Decode ``arch.stages`` into units; returns the stages, their :class:`StageInfo` and the output width.

    ``stride`` is the reduction of the stem that feeds the first stage (conv s2 + max-pool s2).
    """
    if arch.unit not in _UNITS:
        raise ValueError(f"unknown ShuffleNet unit {arch.unit!r}; expected one of {sorted(_UNITS)}")
    unit_cls = _UNITS[arch.unit]
    in_chs, built, info = arch.stem_chs, [], []
    for i, stage in enumerate(arch.stages):
        mid_chs = int(stage.out * arch.bottleneck_ratio)
        units = []
        for r in range(stage.repeat):
            s = stage.stride if r == 0 else 1
            first_groups = 1 if i == 0 and r == 0 else arch.groups   # stem output: too few channels to group
            cfg = ShuffleUnitCfg(in_chs, stage.out, mid_chs, s, arch.groups, first_groups)
            units.append(unit_cls(cfg, norm_layer, act_layer))
            in_chs, stride = stage.out, stride * s
        built.append(nn.Sequential(*units))
        info.append(StageInfo(f"{prefix}.{i}", in_chs, stride))
    return nn.Sequential(*built), info, in_chs


def shufflenet_v1_arch(groups: int = 3, width_mult: float = 1.0) -> ShuffleNetArch:
    """Table 1 of the paper for ``groups``, scaled by ``width_mult`` (rounded to a multiple of 4 x groups)."""
    if not isinstance(groups, int) or groups not in V1_STAGE_WIDTHS:
        raise ValueError(f"ShuffleNetV1: groups must be one of {list(V1_GROUPS)}, got {groups!r}")
    if not isinstance(width_mult, (int, float)) or width_mult not in V1_WIDTHS:
        raise ValueError(f"ShuffleNetV1: width_mult must be one of {list(V1_WIDTHS)}, got {width_mult!r}")
    widths = [make_divisible(c * width_mult, 4 * groups) for c in V1_STAGE_WIDTHS[groups]]
    return ShuffleNetArch("v1", tuple(StageCfg(w, n) for w, n in zip(widths, STAGE_REPEATS)),
                          bottleneck_ratio=0.25, groups=groups,
                          stem_chs=make_divisible(V1_STEM_WIDTHS[width_mult], groups))


def shufflenet_v2_arch(width_mult: float = 1.0) -> ShuffleNetArch:
    """Table 5 of the paper for ``width_mult``."""
    if not isinstance(width_mult, (int, float)) or width_mult not in V2_STAGE_WIDTHS:
        raise ValueError(f"ShuffleNetV2: width_mult must be one of {list(V2_STAGE_WIDTHS)}, got {width_mult!r}")
    *widths, head = V2_STAGE_WIDTHS[width_mult]
    return ShuffleNetArch("v2", tuple(StageCfg(w, n) for w, n in zip(widths, STAGE_REPEATS)),
                          bottleneck_ratio=0.5, head_chs=head)


class ShuffleNet(Backbone):
    """Stem -> max-pool -> stages -> [1x1 head conv] -> global pool -> dropout -> classifier.

    ``forward_features`` returns the last map (after the head convolution if there is one);
    ``forward_head(x, pre_logits=True)`` returns the pooled vector the classifier sees.
    """

    def __init__(self, arch: ShuffleNetArch, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 norm_layer: ModuleFactory = nn.BatchNorm2d, act_layer: ModuleFactory = nn.ReLU):
        super().__init__()
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"ShuffleNet: expected num_classes >= 0 and in_chans >= 1, "
                             f"got num_classes={num_classes}, in_chans={in_chans}")
        self.arch, self.num_classes, self.in_chans = arch, num_classes, in_chans
        self.stem = ConvNormAct(in_chans, arch.stem_chs, 3, stride=2, norm_layer=norm_layer,
                                activation_layer=act_layer)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stages, info, chs = build_stages(arch, norm_layer, act_layer)
        if arch.head_chs:
            self.conv_head = ConvNormAct(chs, arch.head_chs, 1, norm_layer=norm_layer, activation_layer=act_layer)
            info.append(StageInfo("conv_head", arch.head_chs, info[-1].stride))
            chs = arch.head_chs
        else:
            self.conv_head = nn.Identity()
        self.stage_info, self.num_features = info, chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(chs, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv_head(self.stages(self.maxpool(self.stem(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)


# --- registered models ---------------------------------------------------------------------------------------

_V1_PUBLISHED = {3: {"macs": 138e6, "params": 1.9e6, "input_size": 224},
                 8: {"macs": 138e6, "params": 2.4e6, "input_size": 224}}
_V2_PUBLISHED = {0.5: (41e6, 1.4e6), 1.0: (146e6, 2.3e6), 1.5: (299e6, 3.5e6), 2.0: (591e6, 7.4e6)}
_WIDTH_TAGS = {0.5: "x0_5", 1.0: "x1_0", 1.5: "x1_5", 2.0: "x2_0"}


@register_model(name="shufflenet_v1", published=_V1_PUBLISHED[3])
def shufflenet_v1(num_classes: int = 1000, in_chans: int = 3, groups: int = 3, width_mult: float = 1.0,
                  **kwargs) -> ShuffleNet:
    """ShuffleNetV1 with ``groups`` in {1, 2, 3, 4, 8} and ``width_mult`` in {0.5, 1.0, 1.5, 2.0}."""
    return ShuffleNet(shufflenet_v1_arch(groups, width_mult), num_classes, in_chans, **kwargs)


@register_model(name="shufflenet_v2", published=dict(zip(("macs", "params"), _V2_PUBLISHED[1.0]),
                                                      input_size=224))
def shufflenet_v2(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, **kwargs) -> ShuffleNet:
    """ShuffleNetV2 (paper layout) with ``width_mult`` in {0.5, 1.0, 1.5, 2.0}; dropout 0.2 at 2x, as officially."""
    kwargs.setdefault("drop_rate", 0.2 if width_mult == 2.0 else 0.0)
    return ShuffleNet(shufflenet_v2_arch(width_mult), num_classes, in_chans, **kwargs)


def _fixed(builder: Callable[..., ShuffleNet], name: str, **fixed) -> Callable[..., ShuffleNet]:
    """A builder of one configuration: ``fixed`` arguments cannot be overridden (that would be another model)."""
    def build(**kwargs) -> ShuffleNet:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise ValueError(f"{name} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; "
                             f"use the generic {builder.__name__!r} to choose them")
        return builder(**fixed, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{builder.__name__} with {', '.join(f'{k}={v!r}' for k, v in fixed.items())}."
    return build


def _register_variants() -> None:
    """Register ``shufflenet_v1_g{G}_x{W}`` and ``shufflenet_v2_x{W}`` as fixed configurations."""
    for width, tag in _WIDTH_TAGS.items():
        for g in V1_GROUPS:
            name = f"shufflenet_v1_g{g}_{tag}"
            register_model(_fixed(shufflenet_v1, name, groups=g, width_mult=width), name=name,
                           published=_V1_PUBLISHED.get(g) if width == 1.0 else None)
        name = f"shufflenet_v2_{tag}"
        macs, params = _V2_PUBLISHED[width]
        register_model(_fixed(shufflenet_v2, name, width_mult=width), name=name,
                       published={"macs": macs, "params": params, "input_size": 224})


_register_variants()
