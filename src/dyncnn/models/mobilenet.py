"""MobileNet V1, V2 and V3 as stage tables decoded by one builder.

Every network here is a stem convolution, a list of stages (each a tuple of :class:`BlockCfg` rows), an optional
1x1 head convolution and a classifier. The rows are written at width 1.0; :func:`build_stages` scales them by
``width_mult`` (channel rounding only through :func:`make_divisible`) and builds either a depthwise-separable
unit (V1) or an :class:`InvertedResidual` (V2, V3). V2 and V3 reproduce torchvision's ``mobilenet_v2``,
``mobilenet_v3_large`` and ``mobilenet_v3_small`` layer for layer (same parameters, MACs, initialisation and
state-dict order); V1 has the layout of timm's ``mobilenetv1_100`` (ReLU6, no head convolution).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from torch import Tensor, nn

from ..layers import ConvNormAct, DepthwiseSeparableConv, SqueezeExcite, get_act_layer, make_divisible
from .base import Backbone, StageInfo
from .registry import register_model

ModuleFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class BlockCfg:
    """One row of a stage table, at width 1.0: ``repeat`` blocks, the first with ``stride``.

    The hidden (expanded) width is either given directly as ``mid`` (MobileNetV3's tables, scaled by the width
    multiplier like every other width) or as ``expand_ratio`` times the block's input (MobileNetV2).
    """
    block: str                    # "ir": inverted residual, "ds": depthwise-separable (MobileNetV1)
    out: int
    kernel: int = 3
    stride: int = 1
    repeat: int = 1
    mid: int | None = None
    expand_ratio: float = 1.0
    se: bool = False
    act: str = "relu"


@dataclass(frozen=True)
class InvertedResidualCfg:
    """The resolved widths of one inverted residual block (what the block class is built from)."""
    in_chs: int
    mid_chs: int
    out_chs: int
    kernel: int = 3
    stride: int = 1
    se: bool = False
    act: str = "relu"


@dataclass(frozen=True)
class MobileNetArch:
    """A whole network at width 1.0; everything that depends on the width is decoded by the builder."""
    stages: tuple[tuple[BlockCfg, ...], ...]
    stem_chs: int
    act: str                        # stem, head convolution and classifier hidden layer
    head_chs: int = 0               # 1x1 convolution after the last block (0: none) ...
    head_ratio: float = 0.0         # ... or its width as a multiple of the last block's output (V3: 6)
    head_min_width: float = 0.0     # head_chs is scaled by max(width_mult, this) (V2 keeps 1280 below 1.0)
    head_hidden: int = 0            # hidden Linear + activation + dropout before the classifier (V3)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    widths: tuple[float, ...] = ()   # supported width multipliers; empty: any positive


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise k x k -> [squeeze-excite] -> linear projection (1x1), residual when shapes match.

    The MobileNetV2 block (ReLU6, no SE) and the MobileNetV3 block (ReLU or hard-swish, SE with a hard-sigmoid
    gate) are the same module with a different config. The expansion is skipped when ``mid_chs == in_chs``;
    the projection has no activation (the linear bottleneck).
    """

    def __init__(self, cfg: InvertedResidualCfg, norm_layer: ModuleFactory = nn.BatchNorm2d,
                 se_layer: ModuleFactory = SqueezeExcite):
        super().__init__()
        if cfg.stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride must be 1 or 2, got {cfg.stride}")
        act = get_act_layer(cfg.act)
        self.cfg = cfg
        self.has_skip = cfg.stride == 1 and cfg.in_chs == cfg.out_chs
        self.conv_pw = (ConvNormAct(cfg.in_chs, cfg.mid_chs, 1, norm_layer=norm_layer, activation_layer=act)
                        if cfg.mid_chs != cfg.in_chs else nn.Identity())
        self.conv_dw = ConvNormAct(cfg.mid_chs, cfg.mid_chs, cfg.kernel, stride=cfg.stride, groups=cfg.mid_chs,
                                   norm_layer=norm_layer, activation_layer=act)
        self.se = se_layer(cfg.mid_chs) if cfg.se else nn.Identity()
        self.conv_pwl = ConvNormAct(cfg.mid_chs, cfg.out_chs, 1, norm_layer=norm_layer, activation_layer=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return out + x if self.has_skip else out

    # -- the block's description for dynamic execution (dyncnn.dynamic.blocks.ResidualBranchBlock) ----------
    def branch_units(self) -> list[nn.Module]:
        return [m for m in (self.conv_pw, self.conv_dw, self.conv_pwl) if not isinstance(m, nn.Identity)]

    def merge(self, x: Tensor, out: Tensor) -> Tensor:
        return out + x if self.has_skip else out

    @property
    def identity_skip(self) -> bool:
        return self.has_skip

    @property
    def plain_branch(self) -> bool:
        return isinstance(self.se, nn.Identity)

    @property
    def post_act(self) -> None:
        return None

    @property
    def channel_gateable(self) -> bool:
        # the expansion is the hidden layer to slice; without one the depthwise conv reads the block input
        return not isinstance(self.conv_pw, nn.Identity) and self.plain_branch


def scale_width(channels: int, width_mult: float) -> int:
    """The one channel-rounding rule of this family: scale, then round to a multiple of 8."""
    return make_divisible(channels * width_mult, 8)


def build_stages(stages: Sequence[Sequence[BlockCfg]], in_chs: int, width_mult: float,
                 norm_layer: ModuleFactory, se_layer: ModuleFactory, stride: int = 2,
                 prefix: str = "stages") -> tuple[nn.Sequential, list[StageInfo], int]:
    """Decode a stage table into ``nn.Sequential`` stages, their :class:`StageInfo` and the output width.

    ``in_chs`` and ``stride`` describe the stem that feeds the first stage.
    """
    built, info = [], []
    for i, rows in enumerate(stages):
        blocks: list[nn.Module] = []
        for row in rows:
            out_chs = scale_width(row.out, width_mult)
            for r in range(row.repeat):
                s = row.stride if r == 0 else 1
                stride *= s
                if row.block == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out_chs, row.kernel, stride=s,
                                                         norm_layer=norm_layer,
                                                         act_layer=get_act_layer(row.act)))
                elif row.block == "ir":
                    mid = (scale_width(row.mid, width_mult) if row.mid is not None
                           else int(round(in_chs * row.expand_ratio)))
                    cfg = InvertedResidualCfg(in_chs, mid, out_chs, row.kernel, s, row.se, row.act)
                    blocks.append(InvertedResidual(cfg, norm_layer, se_layer))
                else:
                    raise ValueError(f"unknown block type {row.block!r}; expected 'ds' or 'ir'")
                in_chs = out_chs
        built.append(nn.Sequential(*blocks))
        info.append(StageInfo(f"{prefix}.{i}", in_chs, stride))
    return nn.Sequential(*built), info, in_chs


def _check_width(width_mult: float, supported: tuple[float, ...], name: str) -> None:
    if supported and width_mult not in supported:
        raise ValueError(f"{name}: width_mult must be one of {list(supported)}, got {width_mult!r}")
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ValueError(f"{name}: width_mult must be a positive number, got {width_mult!r}")


class MobileNet(Backbone):
    """Stem -> stages -> [1x1 head conv] -> global pool -> [hidden Linear] -> dropout -> classifier.

    ``forward_features`` returns the map after the head convolution (``num_features`` channels);
    ``forward_head(x, pre_logits=True)`` returns the vector the last Linear sees.
    """

    def __init__(self, arch: MobileNetArch, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 drop_rate: float = 0.2, norm_layer: ModuleFactory | None = None,
                 se_layer: ModuleFactory | None = None, name: str = "MobileNet"):
        super().__init__()
        _check_width(width_mult, arch.widths, name)
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"{name}: expected num_classes >= 0 and in_chans >= 1, "
                             f"got num_classes={num_classes}, in_chans={in_chans}")
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=arch.bn_eps, momentum=arch.bn_momentum)
        se_layer = se_layer or partial(SqueezeExcite, rd_ratio=0.25, act_layer=nn.ReLU, gate_layer=nn.Hardsigmoid)
        act = get_act_layer(arch.act)
        self.num_classes, self.in_chans, self.width_mult = num_classes, in_chans, width_mult

        stem_chs = scale_width(arch.stem_chs, width_mult)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2, norm_layer=norm_layer, activation_layer=act)
        self.stages, info, chs = build_stages(arch.stages, stem_chs, width_mult, norm_layer, se_layer)

        head_chs = (scale_width(arch.head_chs, max(width_mult, arch.head_min_width)) if arch.head_chs
                    else int(arch.head_ratio * chs))
        if head_chs:
            self.conv_head = ConvNormAct(chs, head_chs, 1, norm_layer=norm_layer, activation_layer=act)
            info.append(StageInfo("conv_head", head_chs, info[-1].stride))
            chs = head_chs
        else:
            self.conv_head = nn.Identity()
        self.stage_info = info
        self.num_features = chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        if arch.head_hidden:
            self.head_hidden_size = scale_width(arch.head_hidden, width_mult)
            self.pre_logits = nn.Sequential(nn.Linear(chs, self.head_hidden_size), act(inplace=True),
                                            nn.Dropout(drop_rate, inplace=True))
        else:
            self.head_hidden_size = chs
            self.pre_logits = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's MobileNet scheme: He-normal (fan-out) convolutions, N(0, 0.01) Linear, unit BN."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv_head(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pre_logits(self.pool(x).flatten(1))
        return x if pre_logits else self.classifier(x)


# --- stage tables --------------------------------------------------------------------------------------------

_ds = partial(BlockCfg, "ds", act="relu6")
_v2 = partial(BlockCfg, "ir", expand_ratio=6, act="relu6")
_re = partial(BlockCfg, "ir", act="relu")
_hs = partial(BlockCfg, "ir", act="hard_swish")

MOBILENET_V1 = MobileNetArch(
    stages=((_ds(64),),
            (_ds(128, stride=2), _ds(128)),
            (_ds(256, stride=2), _ds(256)),
            (_ds(512, stride=2), _ds(512, repeat=5)),
            (_ds(1024, stride=2), _ds(1024))),
    stem_chs=32, act="relu6", widths=(0.25, 0.5, 0.75, 1.0))

MOBILENET_V2 = MobileNetArch(   # rows of the paper's table 2: t, c, n, s
    stages=((_v2(16, expand_ratio=1),),
            (_v2(24, stride=2, repeat=2),),
            (_v2(32, stride=2, repeat=3),),
            (_v2(64, stride=2, repeat=4),),
            (_v2(96, repeat=3),),
            (_v2(160, stride=2, repeat=3),),
            (_v2(320),)),
    stem_chs=32, act="relu6", head_chs=1280, head_min_width=1.0)

MOBILENET_V3_LARGE = MobileNetArch(   # the paper's table 1 (kernel, expanded width, out, SE, activation, stride)
    stages=((_re(16, mid=16),),
            (_re(24, mid=64, stride=2), _re(24, mid=72)),
            (_re(40, 5, mid=72, stride=2, se=True), _re(40, 5, mid=120, se=True, repeat=2)),
            (_hs(80, mid=240, stride=2), _hs(80, mid=200), _hs(80, mid=184, repeat=2)),
            (_hs(112, mid=480, se=True), _hs(112, mid=672, se=True)),
            (_hs(160, 5, mid=672, stride=2, se=True), _hs(160, 5, mid=960, se=True, repeat=2))),
    stem_chs=16, act="hard_swish", head_ratio=6, head_hidden=1280, bn_eps=1e-3, bn_momentum=0.01)

MOBILENET_V3_SMALL = MobileNetArch(   # the paper's table 2
    stages=((_re(16, mid=16, stride=2, se=True),),
            (_re(24, mid=72, stride=2), _re(24, mid=88)),
            (_hs(40, 5, mid=96, stride=2, se=True), _hs(40, 5, mid=240, se=True, repeat=2)),
            (_hs(48, 5, mid=120, se=True), _hs(48, 5, mid=144, se=True)),
            (_hs(96, 5, mid=288, stride=2, se=True), _hs(96, 5, mid=576, se=True, repeat=2))),
    stem_chs=16, act="hard_swish", head_ratio=6, head_hidden=1024, bn_eps=1e-3, bn_momentum=0.01)


@register_model(name="mobilenet_v1", published={"macs": 569e6, "params": 4.2e6, "input_size": 224})
def mobilenet_v1(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, drop_rate: float = 0.0,
                 **kwargs) -> MobileNet:
    """MobileNetV1 (Howard et al. 2017): 13 depthwise-separable units; width_mult in {0.25, 0.5, 0.75, 1.0}."""
    return MobileNet(MOBILENET_V1, num_classes, in_chans, width_mult, drop_rate, name="mobilenet_v1", **kwargs)


@register_model(name="mobilenet_v2", published={"macs": 300e6, "params": 3.5e6, "input_size": 224})
def mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, drop_rate: float = 0.2,
                 **kwargs) -> MobileNet:
    """MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks, torchvision's layout."""
    return MobileNet(MOBILENET_V2, num_classes, in_chans, width_mult, drop_rate, name="mobilenet_v2", **kwargs)


@register_model(name="mobilenet_v3_large", published={"macs": 217e6, "params": 5.4e6, "input_size": 224})
def mobilenet_v3_large(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                       drop_rate: float = 0.2, **kwargs) -> MobileNet:
    """MobileNetV3-Large (Howard et al. 2019): the NAS-found table, SE + hard-swish, torchvision's layout."""
    return MobileNet(MOBILENET_V3_LARGE, num_classes, in_chans, width_mult, drop_rate,
                     name="mobilenet_v3_large", **kwargs)


@register_model(name="mobilenet_v3_small", published={"macs": 56e6, "params": 2.5e6, "input_size": 224})
def mobilenet_v3_small(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                       drop_rate: float = 0.2, **kwargs) -> MobileNet:
    """MobileNetV3-Small (Howard et al. 2019), torchvision's layout."""
    return MobileNet(MOBILENET_V3_SMALL, num_classes, in_chans, width_mult, drop_rate,
                     name="mobilenet_v3_small", **kwargs)
