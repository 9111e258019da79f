"""RANet (Yang et al., CVPR 2020): Resolution Adaptive Networks for efficient inference.

RANet classifies easy images from low-resolution features and spends high-resolution computation only on the
hard ones. It has ``len(scale_list)`` *scale flows*, run from the lowest resolution to the highest. Flow 0 is a
stack of dense blocks, each followed by a classifier. Flow ``s > 0`` first runs *fusion* blocks, one for each
block of flow ``s - 1``: fusion layer ``i`` adds to its own new channels a conv of the lower flow's block
features ``i`` (up-sampled), and the block finally concatenates a 1x1 conv of the lower block's output.
Some fusion blocks end with a stride-2 layer, so that each flow ends at the lowest resolution. Then flow ``s``
runs ``block_step`` plain dense blocks, each with a classifier. Transitions (1x1 convs halving the channels)
sit at fixed block positions.

As a :class:`~dyncnn.dynamic.exits.MultiExitNetwork`, stage ``k`` runs exactly the blocks between classifier
``k - 1`` and classifier ``k`` (stage 0 also runs the first layer, which makes every flow's input). Stages pass
a dict state: ``x`` (the running feature of the current flow, read by the heads), ``inputs`` (the first-layer
features of flows not started yet) and ``feats`` (the current flow's block features that the next flow fuses).
A dense block's intermediate outputs are channel prefixes of its last output, so a block's features are kept as
that one tensor (plus its input-resolution body when the block down-samples) and sliced when fused; the last
flow keeps none. An early exit therefore skips every later block, and the executor compacts all of that state.

Keyword names follow the official code (yangle15/RANet-pytorch, ``args.py``) so that its configurations carry
over; channel arithmetic uses its floors (:func:`_part`). Built by one decoder (:class:`RANet`) from a block
table (:func:`ranet_plan`). The classifiers use adaptive average pooling instead of the official fixed 2x2 pool
(identical at 32x32 CIFAR / 224x224 ImageNet inputs) so that any input size from 32x32 up works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.exits import MultiExitNetwork
from ..dynamic.imta import apply_imta
from ..errors import check_image_batch
from ..layers import ConvNormAct
from .registry import register_model

LayerFactory = Callable[..., nn.Module]
STEMS = ("cifar", "imagenet")
STEPMODES = ("even", "lg")


def _part(channels: int, fraction: float) -> int:
    """The one channel-rounding rule of RANet: ``floor(channels * fraction)`` (compression, fusion share)."""
    return math.floor(channels * fraction)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (align_corners=True, as the official code); the identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


@dataclass(frozen=True)
class BlockCfg:
    """One block of the table: where it sits, its widths, and what it fuses."""
    flow: int                      # scale flow, 0 = lowest resolution
    index: int                     # position inside the flow (0-based) = index of the lower block it fuses
    in_chs: int
    growth: int
    layers: int
    bn_width: int                  # bottleneck width factor of its own convs
    low_chs: tuple[int, ...] = ()  # channels of the fused lower block's outputs 0..layers; () = plain dense block
    low_bn_width: int = 1
    down: bool = False             # last layer has stride 2 (fusion blocks only)
    trans: bool = False            # ends with a 1x1 transition (x reduction)
    exit: bool = False             # a classifier follows
    keep: bool = True              # its features are kept for the next flow (False in the last flow)
    out_chs: int = 0               # channels of the block's result (after the fused 1x1 and the transition)

    @property
    def fuses(self) -> bool:
        return bool(self.low_chs)

    def layer_chs(self, i: int) -> int:
        """Channels of the block's output ``i`` (0 = its input)."""
        return self.in_chs + i * self.growth


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def ranet_plan(nChannels: int = 16, growthRate: int = 6, nBlocks: int = 2, block_step: int = 2, step: int = 4,
               stepmode: str = "even", scale_list: Sequence[int] = (1, 2, 3), grFactor: Sequence[int] = (4, 2, 1),
               bnFactor: Sequence[int] = (4, 2, 1), compress_factor: float = 0.25,
               reduction: float = 0.5) -> list[BlockCfg]:
    """Decode the official RANet arguments into the block table, flow by flow (the execution order).

    Flow ``s`` has ``nBlocks + s * block_step`` blocks; its first ``nBlocks + (s - 1) * block_step`` fuse the
    blocks of flow ``s - 1``. Block ``j`` (1-based, any flow) has ``step`` layers (``stepmode="even"``) or
    ``j * step`` (``"lg"``). Flow ``s`` down-samples ``scale_list[s] - 1`` times, at the ends of its fusion
    blocks that line up with the ends of lower flows; transitions sit at blocks ``floor(i * n / scale_list[s])``.
    (For a later flow with ``scale_list[s] == 1``, e.g. ``(1, 1, 2)``, the official code's ``list[-0:]`` makes it
    down-sample anyway; here it does not. The published configurations never hit this.)
    """
    scale_list, grFactor, bnFactor = list(scale_list), list(grFactor), list(bnFactor)
    n = len(scale_list)
    _check(stepmode in STEPMODES, f"stepmode must be one of {STEPMODES}, got {stepmode!r}")
    _check(n >= 1 and scale_list[0] == 1 and all(b - a in (0, 1) for a, b in zip(scale_list, scale_list[1:])),
           f"scale_list must start at 1 and rise by 0 or 1 per flow (e.g. (1, 2, 3) or (1, 2, 3, 3)), "
           f"got {tuple(scale_list)}")
    _check(len(grFactor) == n and len(bnFactor) == n,
           f"grFactor and bnFactor need one entry per flow ({n}, as scale_list), got {tuple(grFactor)} and "
           f"{tuple(bnFactor)}")
    for name, val in (("nChannels", nChannels), ("growthRate", growthRate), ("nBlocks", nBlocks), ("step", step)):
        _check(isinstance(val, int) and val >= 1, f"{name} must be an integer >= 1, got {val!r}")
    _check(all(isinstance(v, int) and v >= 1 for v in grFactor + bnFactor),
           f"grFactor and bnFactor must hold integers >= 1, got {tuple(grFactor)} and {tuple(bnFactor)}")
    _check(n == 1 or (isinstance(block_step, int) and block_step >= 1),
           f"block_step must be an integer >= 1 (each flow after the first adds classifiers), got {block_step!r}")
    _check(0 < reduction <= 1, f"reduction must be in (0, 1], got {reduction!r}")
    _check(0 < compress_factor < 1, f"compress_factor must be in (0, 1), got {compress_factor!r}")
    for s in range(1, n):
        g = growthRate * grFactor[s]
        _check(1 <= _part(g, compress_factor) < g,
               f"compress_factor={compress_factor} gives flow {s} (growth {g}) {_part(g, compress_factor)} fused "
               f"channels per layer; supported: at least 1 and fewer than the growth")

    counts = [nBlocks + s * block_step for s in range(n)]     # blocks per flow
    plan: list[BlockCfg] = []
    lower: list[BlockCfg] = []
    for s in range(n):
        chs, growth, scale = nChannels * grFactor[s], growthRate * grFactor[s], scale_list[s]
        n_fuse = counts[s - 1] if s else 0
        downs = set(counts[s - scale + 1:s]) if scale > 1 else set()
        transitions = {math.floor(i * counts[s] / scale) for i in range(1, scale)}
        flow: list[BlockCfg] = []
        for j in range(1, counts[s] + 1):
            layers = step if stepmode == "even" else j * step
            fuse = j <= n_fuse
            low = lower[j - 1] if fuse else None
            last = chs + layers * growth
            out = last + (_part(last, compress_factor) if fuse else 0)
            out = _part(out, reduction) if j in transitions else out
            flow.append(BlockCfg(flow=s, index=j - 1, in_chs=chs, growth=growth, layers=layers,
                                 bn_width=bnFactor[s], low_bn_width=bnFactor[s - 1] if fuse else 1,
                                 low_chs=tuple(low.layer_chs(i) for i in range(layers + 1)) if low else (),
                                 down=fuse and j in downs, trans=j in transitions, exit=not fuse,
                                 keep=s < n - 1, out_chs=out))
            chs = out
        plan += flow
        lower = flow
    return plan


class BottleneckConv(nn.Sequential):
    """1x1 conv to ``min(in, bn_width * out)`` then 3x3 conv (stride 1 or 2), each conv-norm-act."""

    def __init__(self, in_chs: int, out_chs: int, bn_width: int, stride: int = 1,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        mid = min(in_chs, bn_width * out_chs)
        super().__init__(ConvNormAct(in_chs, mid, 1, norm_layer=norm_layer, activation_layer=act_layer),
                         ConvNormAct(mid, out_chs, 3, stride=stride, norm_layer=norm_layer,
                                     activation_layer=act_layer))


class FusionLayer(nn.Module):
    """A dense layer that also reads the lower-resolution flow: ``[x, up(conv(low)), conv(x)]``.

    ``floor(growth * compress_factor)`` of its new channels come from the lower flow; with ``stride=2`` the
    own conv down-samples and ``x`` is resized to match (the official bilinear resize).
    """

    def __init__(self, in_chs: int, low_chs: int, growth: int, compress_factor: float, bn_width: int,
                 low_bn_width: int, stride: int, norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        fused = _part(growth, compress_factor)
        self.low_conv = BottleneckConv(low_chs, fused, low_bn_width, 1, norm_layer, act_layer)
        self.conv = BottleneckConv(in_chs, growth - fused, bn_width, stride, norm_layer, act_layer)

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        new = self.conv(x)
        size = new.shape[-2:]
        return torch.cat([_resize(x, size), _resize(self.low_conv(low), size), new], dim=1)


class DenseLayer(nn.Module):
    """``[x, conv(x)]``: one dense layer of a plain RANet block."""

    def __init__(self, in_chs: int, growth: int, bn_width: int, norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        self.conv = BottleneckConv(in_chs, growth, bn_width, 1, norm_layer, act_layer)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(x)], dim=1)


class RANetBlock(nn.Module):
    """A plain dense block or a fusion block, with an optional transition.

    ``forward(x, low)`` returns ``(x_out, features)``: ``features`` holds the block's last dense output and,
    for a down-sampling block, first its input-resolution output before the last layer; output ``i`` of the
    block is a channel prefix of ``features[0]`` (``i`` < layers) or ``features[-1]`` (``i`` = layers).
    ``low`` is the fused lower block's ``features``.
    """

    def __init__(self, cfg: BlockCfg, compress_factor: float, norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        for i in range(cfg.layers):
            if cfg.fuses:
                stride = 2 if cfg.down and i == cfg.layers - 1 else 1
                layers.append(FusionLayer(cfg.layer_chs(i), cfg.low_chs[i], cfg.growth, compress_factor,
                                          cfg.bn_width, cfg.low_bn_width, stride, norm_layer, act_layer))
            else:
                layers.append(DenseLayer(cfg.layer_chs(i), cfg.growth, cfg.bn_width, norm_layer, act_layer))
        self.layers = nn.ModuleList(layers)
        last = cfg.layer_chs(cfg.layers)
        self.low_last = ConvNormAct(cfg.low_chs[-1], _part(last, compress_factor), 1, norm_layer=norm_layer,
                                    activation_layer=act_layer) if cfg.fuses else None
        out = last + (_part(last, compress_factor) if cfg.fuses else 0)
        self.trans = ConvNormAct(out, cfg.out_chs, 1, norm_layer=norm_layer,
                                 activation_layer=act_layer) if cfg.trans else None

    def forward(self, x: Tensor, low: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        body = x
        for i, layer in enumerate(self.layers):
            body = x
            x = layer(x, low[0][:, :self.cfg.low_chs[i]]) if self.cfg.fuses else layer(x)
        features = [body, x] if self.cfg.down else [x]
        if self.low_last is not None:
            x = torch.cat([x, _resize(self.low_last(low[-1]), x.shape[-2:])], dim=1)
        if self.trans is not None:
            x = self.trans(x)
        return x, features


class FirstLayer(nn.Module):
    """Makes every flow's input, from the highest resolution down; returns them lowest resolution first.

    Flow ``s``'s input has ``nChannels * grFactor[s]`` channels; a stride-2 conv separates two flows whose
    ``scale_list`` values differ. The ``imagenet`` stem starts with a 7x7 stride-2 conv and a max-pool.
    """

    def __init__(self, in_chans: int, nChannels: int, scale_list: Sequence[int], grFactor: Sequence[int],
                 stem: str, norm_layer: LayerFactory, act_layer: LayerFactory):
        super().__init__()
        widths = [nChannels * g for g in grFactor][::-1]
        scales = list(scale_list)[::-1]
        first = ConvNormAct(in_chans, widths[0], 3, norm_layer=norm_layer, activation_layer=act_layer)
        if stem == "imagenet":
            first = nn.Sequential(ConvNormAct(in_chans, widths[0], 7, stride=2, norm_layer=norm_layer,
                                              activation_layer=act_layer), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.ModuleList([first] + [
            ConvNormAct(widths[i - 1], widths[i], 3, stride=1 if scales[i] == scales[i - 1] else 2,
                        norm_layer=norm_layer, activation_layer=act_layer) for i in range(1, len(widths))])

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out[::-1]


class RANetStage(nn.Module):
    """The blocks between two classifiers (stage 0 also runs the first layer); ``state -> state``."""

    def __init__(self, blocks: Sequence[RANetBlock], first_layer: FirstLayer | None = None):
        super().__init__()
        self.first_layer = first_layer
        self.blocks = nn.ModuleList(blocks)

    def forward(self, state: Tensor | dict) -> dict:
        if self.first_layer is not None:
            state = {"inputs": self.first_layer(state), "feats": []}
        x, inputs, feats, low = state.get("x"), list(state["inputs"]), list(state["feats"]), []
        for block in self.blocks:
            if block.cfg.index == 0:                       # a new flow: its input, and the last flow's features
                x, inputs, low, feats = inputs[0], inputs[1:], feats, []
            x, features = block(x, low[block.cfg.index] if block.cfg.fuses else None)
            if block.cfg.keep:
                feats.append(features)
        return {"x": x, "inputs": inputs, "feats": feats}


class RANetHead(nn.Module):
    """The official classifier on ``state["x"]``: two 3x3 stride-2 conv-norm-act, average pool, linear."""

    def __init__(self, in_chs: int, num_classes: int, width: int, norm_layer: LayerFactory,
                 act_layer: LayerFactory):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(in_chs, width, 3, stride=2, norm_layer=norm_layer, activation_layer=act_layer),
            ConvNormAct(width, width, 3, stride=2, norm_layer=norm_layer, activation_layer=act_layer))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, state: dict) -> Tensor:
        return self.fc(self.pool(self.convs(state["x"])).flatten(1))


class RANet(MultiExitNetwork):
    """RANet; the keyword arguments are the official ones (see :func:`ranet_plan`), plus:

    ``stem``: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7 stride-2 conv + max-pool); ``head_channels``: the
    classifiers' conv width (official: 128 on CIFAR, ``None`` = the block's own width on ImageNet).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, *, stem: str = "cifar", nChannels: int = 16,
                 growthRate: int = 6, nBlocks: int = 2, block_step: int = 2, step: int = 4, stepmode: str = "even",
                 scale_list: Sequence[int] = (1, 2, 3), grFactor: Sequence[int] = (4, 2, 1),
                 bnFactor: Sequence[int] = (4, 2, 1), compress_factor: float = 0.25, reduction: float = 0.5,
                 head_channels: int | None = 128, norm_layer: LayerFactory = nn.BatchNorm2d,
                 act_layer: LayerFactory = nn.ReLU):
        _check(stem in STEMS, f"stem must be one of {STEMS}, got {stem!r}")
        _check(isinstance(num_classes, int) and num_classes >= 1, f"num_classes must be >= 1, got {num_classes!r}")
        _check(isinstance(in_chans, int) and in_chans >= 1, f"in_chans must be >= 1, got {in_chans!r}")
        _check(head_channels is None or (isinstance(head_channels, int) and head_channels >= 1),
               f"head_channels must be None (the block's width) or an integer >= 1, got {head_channels!r}")
        plan = ranet_plan(nChannels, growthRate, nBlocks, block_step, step, stepmode, scale_list, grFactor, bnFactor,
                          compress_factor, reduction)
        stages, heads, pending = [], [], []
        first = FirstLayer(in_chans, nChannels, scale_list, grFactor, stem, norm_layer, act_layer)
        for cfg in plan:
            pending.append(RANetBlock(cfg, compress_factor, norm_layer, act_layer))
            if cfg.exit:
                stages.append(RANetStage(pending, first if not stages else None))
                heads.append(RANetHead(cfg.out_chs, num_classes, head_channels or cfg.out_chs, norm_layer,
                                       act_layer))
                pending = []
        super().__init__(stages, heads, num_classes, in_chans)
        self.plan = plan
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        check_image_batch(x, self.in_chans, check_finite=False)
        return super().forward(x)


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: conv He-normal (fan-out), norm 1/0, linear bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


# The official training scripts: args.py defaults overridden by train_cifar.sh / train_imagenet.sh.
CIFAR_CFG = dict(stem="cifar", nChannels=16, growthRate=6, nBlocks=2, block_step=2, step=4, stepmode="even",
                 scale_list=(1, 2, 3, 3), grFactor=(4, 2, 1, 1), bnFactor=(4, 2, 1, 1), compress_factor=0.25,
                 reduction=0.5, head_channels=128)
IMAGENET_CFG = dict(CIFAR_CFG, stem="imagenet", growthRate=16, step=8, scale_list=(1, 2, 3, 4), head_channels=None)


@register_model(name="ranet_cifar", published={"input_size": 32})   # no MAC/param figure in REFERENCES.md
def ranet_cifar(num_classes: int = 10, in_chans: int = 3, imta: bool | dict | None = None, **cfg) -> RANet:
    """RANet as trained by the official ``train_cifar.sh`` (8 exits, 94M MACs at the last one on 32x32). ``imta``:
    the IMTA training recipe (:mod:`dyncnn.dynamic.imta`), ``True`` or a dict of its settings."""
    return apply_imta(RANet(num_classes, in_chans, **{**CIFAR_CFG, **cfg}), imta)


@register_model(name="ranet_imagenet", published={"input_size": 224})
def ranet_imagenet(num_classes: int = 1000, in_chans: int = 3, imta: bool | dict | None = None, **cfg) -> RANet:
    """RANet as trained by the official ``train_imagenet.sh`` (8 exits, 1.68G MACs at the last one on 224x224);
    ``imta`` as in :func:`ranet_cifar`."""
    return apply_imta(RANet(num_classes, in_chans, **{**IMAGENET_CFG, **cfg}), imta)
