"""MSDNet (Huang et al., ICLR 2018): Multi-Scale Dense Networks for resource-efficient image classification.

Early exits on a plain CNN are weak because early layers hold fine-scale features that a classifier cannot use,
and an exit's loss pulls those layers away from what later layers need. MSDNet keeps a *column of scales*
(e.g. 32x32, 16x16, 8x8 on CIFAR) through the whole network: every layer adds new features at each scale, from
the same scale (3x3 conv, "regular") and from the next finer one (3x3 stride-2 conv, "strided"), densely
concatenated. Every exit classifies the coarsest scale, which holds global features from the first block on.
Fine scales are dropped when no later layer needs them (``prune``), with 1x1 transitions (``reduction``) after.

The state between the stages of the :class:`~dyncnn.dynamic.exits.MultiExitNetwork` is the list of feature maps,
finest scale first; stage ``k`` is block ``k`` (all layers of all scales, transitions included; block 0 starts
with the stem) and exit ``k`` is MSDNet's classifier on the coarsest scale. The configuration keywords are the
official code's (kalviny/MSDNet-PyTorch): ``nBlocks, step, stepmode, base, nChannels, growthRate, grFactor,
bnFactor, prune, reduction, bottleneck, data``. :func:`msdnet_cfg` decodes them into a layer table
(:class:`MSDNetCfg`), the one place where the official schedule of scales and transitions is restated, and
:class:`MSDNet` builds from that table. Per-exit MACs match the official code (see ``tests/models/test_msdnet.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..dynamic.exits import ConvHead, MultiExitNetwork
from ..dynamic.imta import apply_imta
from ..layers import ConvNormAct
from .base import is_exporting
from .registry import register_model

LayerFactory = Callable[..., nn.Module]
STEPMODES = ("even", "lin_grow")
PRUNES = ("max", "min")
DATA = ("cifar", "imagenet")


@dataclass(frozen=True)
class MSDLayerCfg:
    """One MSDNet layer: reads ``in_scales`` scales and writes the ``out_scales`` coarsest ones.

    Channel counts are in units of the finest scale: scale ``s`` holds ``chs * grFactor[s]`` channels.
    ``transition`` is the channel count after a 1x1 transition that follows this layer (None: no transition).
    """
    in_scales: int
    out_scales: int
    in_chs: int
    growth: int
    transition: int | None = None

    @property
    def out_chs(self) -> int:
        return self.in_chs + self.growth


@dataclass(frozen=True)
class MSDNetCfg:
    """A whole MSDNet: the layer table per block and the per-scale factors."""
    blocks: tuple[tuple[MSDLayerCfg, ...], ...]
    stem_chs: int
    gr_factor: tuple[int, ...]
    bn_factor: tuple[int, ...]
    bottleneck: bool
    imagenet: bool            # 7x7/2 conv + max-pool stem and classifiers as wide as their input
    head_chs: int | None      # classifier width (128 on CIFAR); None: the coarsest scale's channel count

    @property
    def num_scales(self) -> int:
        return len(self.gr_factor)


def _factors(name: str, value: str | Sequence[int]) -> tuple[int, ...]:
    """The official ``"1-2-4"`` strings, or any sequence of positive ints."""
    try:
        out = tuple(int(v) for v in (value.split("-") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive ints or a string like '1-2-4', got {value!r}") \
            from None
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints (e.g. 1-2-4), got {value!r}")
    return out


def _positive(**values: int) -> None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


def msdnet_cfg(nBlocks: int = 7, step: int = 2, stepmode: str = "even", base: int = 4, nChannels: int = 16,
               growthRate: int = 6, grFactor: str | Sequence[int] = (1, 2, 4),
               bnFactor: str | Sequence[int] = (1, 2, 4), prune: str = "max", reduction: float = 0.5,
               bottleneck: bool = True, data: str = "cifar", nScales: int | None = None) -> MSDNetCfg:
    """Decode the official MSDNet arguments into a layer table, following ``MSDNet._build_block`` exactly.

    Block ``i`` has ``base`` layers for i = 0 and then ``step`` ("even") or ``step * i + 1`` ("lin_grow").
    ``prune="max"`` drops the finest scale every ceil(layers / nScales) layers, with a transition right after each
    drop; ``prune="min"`` keeps all scales until the last layers need fewer, with transitions at 1/3 and 2/3 of
    the depth. ``reduction`` is the transitions' compression (0: none).
    """
    _positive(nBlocks=nBlocks, step=step, base=base, nChannels=nChannels, growthRate=growthRate)
    if stepmode not in STEPMODES:
        raise ValueError(f"unknown stepmode {stepmode!r}; supported: {STEPMODES}")
    if prune not in PRUNES:
        raise ValueError(f"unknown prune {prune!r}; supported: {PRUNES}")
    if not isinstance(data, str) or data.lower() not in DATA:
        raise ValueError(f"unknown data {data!r}; supported: {DATA}")
    gr, bn = _factors("grFactor", grFactor), _factors("bnFactor", bnFactor)
    if len(gr) != len(bn):
        raise ValueError(f"grFactor and bnFactor need one entry per scale (the same length), got grFactor={gr} "
                         f"and bnFactor={bn}")
    n_scales = len(gr)
    if nScales is not None and nScales != n_scales:
        raise ValueError(f"nScales is len(grFactor) = {n_scales}, got nScales={nScales}")
    if n_scales > 1 and any(growthRate * g % 2 for g in gr[1:]):
        raise ValueError(f"growthRate * grFactor[s] must be even for every scale s >= 1 (half of the new features "
                         f"come from the finer scale), got growthRate={growthRate}, grFactor={gr}")
    if not 0.0 <= float(reduction) <= 1.0:
        raise ValueError(f"reduction must be in [0, 1] (0: no transitions), got {reduction!r}")
    if not isinstance(bottleneck, bool):
        raise ValueError(f"bottleneck must be True or False, got {bottleneck!r}")

    steps = [base] + [step if stepmode == "even" else step * i + 1 for i in range(1, nBlocks)]
    n_all, n_cur, chs = sum(steps), 0, nChannels
    interval = math.ceil(n_all / n_scales)
    blocks = []
    for n_layers in steps:
        layers = []
        for _ in range(n_layers):
            n_cur += 1
            if prune == "min":
                in_s, out_s = min(n_scales, n_all - n_cur + 2), min(n_scales, n_all - n_cur + 1)
                transition = n_cur in (n_all // 3, (2 * n_all) // 3)
            else:
                in_s = n_scales - max(0, n_cur - 2) // interval
                out_s = n_scales - (n_cur - 1) // interval
                transition = in_s > out_s
            trans_chs = None
            if transition and reduction > 0:
                trans_chs = math.floor(reduction * (chs + growthRate))
                if trans_chs < 1:
                    raise ValueError(f"reduction={reduction} leaves no channel after layer {n_cur} "
                                     f"({chs + growthRate} channels); use a larger reduction or 0")
            layers.append(MSDLayerCfg(in_s, out_s, chs, growthRate, trans_chs))
            chs = trans_chs if trans_chs is not None else chs + growthRate
        blocks.append(tuple(layers))
    imagenet = data.lower() == "imagenet"
    return MSDNetCfg(tuple(blocks), nChannels, gr, bn, bottleneck, imagenet, None if imagenet else 128)


class MSDConv(nn.Sequential):
    """Optional 1x1 bottleneck (at most ``bn_width * out`` channels, never wider than the input) + 3x3 conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bottleneck: bool, bn_width: int,
                 norm_layer: LayerFactory, act_layer: LayerFactory):
        layers, mid = [], in_chs
        if bottleneck:
            mid = min(in_chs, bn_width * out_chs)
            layers.append(ConvNormAct(in_chs, mid, 1, norm_layer=norm_layer, activation_layer=act_layer))
        layers.append(ConvNormAct(mid, out_chs, 3, stride=stride, norm_layer=norm_layer, activation_layer=act_layer))
        super().__init__(*layers)


class MSDScaleUnit(nn.Module):
    """New features of one scale, concatenated to that scale's input: from the same scale (regular conv) and,
    when the finer scale is still present, half of them from it (strided conv). Concatenation order as in the
    official code: [same scale, strided, regular]."""

    def __init__(self, in_chs: int, finer_chs: int | None, growth: int, bottleneck: bool, bn_width: int,
                 finer_bn_width: int, norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        self.down = None
        if finer_chs is not None:
            growth //= 2
            self.down = MSDConv(finer_chs, growth, 2, bottleneck, finer_bn_width, norm_layer, act_layer)
        self.regular = MSDConv(in_chs, growth, 1, bottleneck, bn_width, norm_layer, act_layer)

    def forward(self, x: Tensor, finer: Tensor | None = None) -> Tensor:
        if self.down is None:
            return torch.cat([x, self.regular(x)], 1)
        return torch.cat([x, self.down(finer), self.regular(x)], 1)


class MSDLayer(nn.Module):
    """One layer across scales: list of ``in_scales`` maps -> list of the ``out_scales`` coarsest maps."""

    def __init__(self, cfg: MSDLayerCfg, net: MSDNetCfg, norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        n = net.num_scales
        self.in_offset, first = n - cfg.in_scales, n - cfg.out_scales
        gr, bn = net.gr_factor, net.bn_factor
        self.units = nn.ModuleList()
        for s in range(first, n):
            finer = s >= 1 and s - 1 >= self.in_offset
            self.units.append(MSDScaleUnit(cfg.in_chs * gr[s], cfg.in_chs * gr[s - 1] if finer else None,
                                           cfg.growth * gr[s], net.bottleneck, bn[s], bn[s - 1] if finer else 1,
                                           norm_layer, act_layer))
        self.first = first

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        out = []
        for j, unit in enumerate(self.units):
            i = self.first + j - self.in_offset           # position of this scale in the input list
            out.append(unit(xs[i], xs[i - 1]) if unit.down is not None else unit(xs[i]))
        return out


class MSDTransition(nn.Module):
    """1x1 conv-BN-ReLU on each remaining scale: compresses the channels after a scale is dropped."""

    def __init__(self, in_chs: int, out_chs: int, factors: Sequence[int], norm_layer: LayerFactory,
                 act_layer: LayerFactory):
        super().__init__()
        self.convs = nn.ModuleList(ConvNormAct(in_chs * f, out_chs * f, 1, norm_layer=norm_layer,
                                               activation_layer=act_layer) for f in factors)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class MSDStem(nn.Module):
    """The first layer: image -> one map per scale (CIFAR: 3x3 conv; ImageNet: 7x7/2 conv + 3x3/2 max-pool),
    each coarser scale a 3x3/2 conv of the previous one."""

    def __init__(self, in_chans: int, net: MSDNetCfg, norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        chs = [net.stem_chs * g for g in net.gr_factor]
        if net.imagenet:
            first = nn.Sequential(ConvNormAct(in_chans, chs[0], 7, stride=2, norm_layer=norm_layer,
                                              activation_layer=act_layer), nn.MaxPool2d(3, 2, 1))
        else:
            first = ConvNormAct(in_chans, chs[0], 3, norm_layer=norm_layer, activation_layer=act_layer)
        self.layers = nn.ModuleList([first] + [ConvNormAct(chs[s - 1], chs[s], 3, stride=2, norm_layer=norm_layer,
                                                           activation_layer=act_layer) for s in range(1, len(chs))])

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class CoarsestHead(nn.Module):
    """MSDNet's classifier (:class:`~dyncnn.dynamic.exits.ConvHead`) on the coarsest scale of the state."""

    def __init__(self, channels: int, num_classes: int, inner: int):
        super().__init__()
        self.head = ConvHead(channels, num_classes, inner=inner)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.head(xs[-1])


class MSDNet(MultiExitNetwork):
    """The one builder of every MSDNet: decodes an :class:`MSDNetCfg` into blocks (stages) and exits (heads)."""

    def __init__(self, cfg: MSDNetCfg, num_classes: int = 10, in_chans: int = 3,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        _positive(num_classes=num_classes, in_chans=in_chans)
        n = cfg.num_scales
        stages, heads = [], []
        for b, layers in enumerate(cfg.blocks):
            mods: list[nn.Module] = [MSDStem(in_chans, cfg, norm_layer, act_layer)] if b == 0 else []
            for lc in layers:
                mods.append(MSDLayer(lc, cfg, norm_layer, act_layer))
                if lc.transition is not None:
                    mods.append(MSDTransition(lc.out_chs, lc.transition, cfg.gr_factor[n - lc.out_scales:],
                                              norm_layer, act_layer))
            stages.append(nn.Sequential(*mods))
            last = layers[-1]
            chs = (last.transition or last.out_chs) * cfg.gr_factor[-1]
            heads.append(CoarsestHead(chs, num_classes, cfg.head_chs or chs))
        super().__init__(stages, heads, num_classes, in_chans)
        self.cfg = cfg
        # every scale must keep at least one pixel of real input: 1 (CIFAR) or 4 (ImageNet stem) x 2^(scales-1)
        self.min_input_size = (4 if cfg.imagenet else 1) * 2 ** (n - 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # The official scheme: He normal with fan_out, unit BN, zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        if not is_exporting():
            self.check_input(x, check_finite=False)
        return super().forward(x)


def _build(num_classes: int, in_chans: int, norm_layer: LayerFactory, act_layer: LayerFactory,
           imta: bool | dict | None = None, **cfg) -> MSDNet:
    return apply_imta(MSDNet(msdnet_cfg(**cfg), num_classes=num_classes, in_chans=in_chans, norm_layer=norm_layer,
                             act_layer=act_layer), imta)


@register_model(name="msdnet_cifar", published={"input_size": 32, "note": "Huang et al. 2018, CIFAR anytime "
                                                "model (official command line: 7 blocks, step 2, base 4, 16 ch)"})
def msdnet_cifar(num_classes: int = 10, in_chans: int = 3, nBlocks: int = 7, step: int = 2, stepmode: str = "even",
                 base: int = 4, nChannels: int = 16, growthRate: int = 6, grFactor: str | Sequence[int] = (1, 2, 4),
                 bnFactor: str | Sequence[int] = (1, 2, 4), prune: str = "max", reduction: float = 0.5,
                 bottleneck: bool = True, data: str = "cifar", nScales: int | None = None,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU,
                 imta: bool | dict | None = None) -> MSDNet:
    """MSDNet for 32x32 images, defaults of the official CIFAR anytime command line (7 exits). ``imta``: the IMTA
    training recipe (:mod:`dyncnn.dynamic.imta`), ``True`` or a dict of its settings."""
    return _build(num_classes, in_chans, norm_layer, act_layer, imta, nBlocks=nBlocks, step=step, stepmode=stepmode,
                  base=base, nChannels=nChannels, growthRate=growthRate, grFactor=grFactor, bnFactor=bnFactor,
                  prune=prune, reduction=reduction, bottleneck=bottleneck, data=data, nScales=nScales)


@register_model(name="msdnet_imagenet", published={"input_size": 224, "note": "official ImageNet command line "
                                                   "(5 blocks, step 4); the paper's 0.62-3.25 GMAC curve is "
                                                   "step=base=7, registered as msdnet_imagenet_step7"})
def msdnet_imagenet(num_classes: int = 1000, in_chans: int = 3, nBlocks: int = 5, step: int = 4,
                    stepmode: str = "even", base: int = 4, nChannels: int = 32, growthRate: int = 16,
                    grFactor: str | Sequence[int] = (1, 2, 4, 4), bnFactor: str | Sequence[int] = (1, 2, 4, 4),
                    prune: str = "max", reduction: float = 0.5, bottleneck: bool = True, data: str = "imagenet",
                    nScales: int | None = None, norm_layer: LayerFactory = nn.BatchNorm2d,
                    act_layer: LayerFactory = nn.ReLU, imta: bool | dict | None = None) -> MSDNet:
    """MSDNet for 224x224 images, defaults of the official ImageNet command line (5 exits, 4 scales); ``imta`` as
    in :func:`msdnet_cifar`."""
    return _build(num_classes, in_chans, norm_layer, act_layer, imta, nBlocks=nBlocks, step=step, stepmode=stepmode,
                  base=base, nChannels=nChannels, growthRate=growthRate, grFactor=grFactor, bnFactor=bnFactor,
                  prune=prune, reduction=reduction, bottleneck=bottleneck, data=data, nScales=nScales)


@register_model(name="msdnet_imagenet_step7", published={
    "macs": 3.25e9, "exit_macs": [0.62e9, 1.44e9, 2.28e9, 2.97e9, 3.25e9], "input_size": 224,
    "note": "Huang et al. 2018, ImageNet anytime curve (k = 7)"})
def msdnet_imagenet_step7(num_classes: int = 1000, **kwargs) -> MSDNet:
    """The ImageNet model of the paper's anytime curve: classifiers every 7 layers (step = base = 7)."""
    kwargs.setdefault("step", 7)
    kwargs.setdefault("base", 7)
    return msdnet_imagenet(num_classes=num_classes, **kwargs)
