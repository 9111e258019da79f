"""The width-wise multi-stage network of the lecture ("Multi-stage Structure"; S2DNAS, Yuan et al., ECCV 2020).

A narrow first network classifies the easy images; a sample that is not confident continues to a second stage
that *adds channels at every depth* and reads the first stage's features instead of recomputing them, and so on.
Run to the end, the stages form one network as wide as all of them together, whose connections are
block-triangular: the channels of stage ``k`` read the channels of stages ``<= k`` (S2DNAS's channel split of a
network into stages), never those of later stages, so stopping after stage ``k`` leaves a complete narrower network.

Built from the tiny_mobilenet unit (:class:`~dyncnn.models.tiny.TinyMobileNet`: a stride-2 stem, then one
depthwise-separable unit per depth, strides 1, 2, 2, ...). Stage ``k`` has its own stem and, at each depth ``d``,
its own depthwise conv (on its own channels of depth ``d - 1``) and pointwise conv, which reads the concatenation
of the depthwise outputs of *all* stages ``<= k`` at depth ``d`` and writes ``widths[k][d]`` new channels. A
depthwise conv acts on each channel alone, so a channel's depthwise output is computed once, by the stage that owns
the channel, and every later stage reads it: the whole network is exactly a depthwise-separable network of the
summed widths whose pointwise weights are block-triangular, and continuing to stage ``k`` computes only stage
``k``'s new channels. (The alternative, a stage reading only its own channels plus earlier ones at one depth,
is the same thing; reading the *outputs* of the earlier pointwise convs and running a depthwise conv over all of
them again would recompute the earlier channels' depthwise work in every stage.) Exit ``k`` is a linear classifier
on the pooled last-depth features of stages ``<= k``; pooling acts per channel, so the pooled vector is kept and
extended rather than pooled again.

The state between stages (a :class:`~dyncnn.dynamic.exits.MultiExitNetwork`, so the executor, calibration,
budgets, training and the staged bundles work unchanged) is a flat tuple: the image, the concatenated depthwise
outputs of the stages so far at each depth, and the pooled features; after the last stage only the pooled features.
The image passes through the stages unchanged (in a bundle it is never copied).

``resolutions`` (optional) gives each stage an input downsampling factor, as the resolution cascades have (RANet's
observation: large, clear digits are recognised at low resolution): stage ``k`` sees the image averaged over
``resolutions[k]``-pixel blocks, and the earlier stages' features it reads are up-sampled (nearest) to its size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.exits import MultiExitNetwork
from ..dynamic.imta import apply_imta
from ..errors import is_exporting
from ..layers import ConvNormAct
from .registry import register_model

LayerFactory = Callable[..., nn.Module]


def _positive_ints(name: str, values) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    if not out or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return out


def check_stage_widths(widths, resolutions=None) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """``widths`` (one sequence of per-depth channel counts per stage, all of one depth) and ``resolutions`` (one
    downsampling factor per stage, each a multiple of the next; None: 1 everywhere) as tuples, or a ValueError that
    says what is expected."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
        raise ValueError(f"widths must be a non-empty sequence of stages, each a sequence of per-depth channel "
                         f"counts (e.g. [[8, 16, 32, 64], [8, 16, 32, 64]]), got {widths!r}")
    stages = tuple(_positive_ints(f"widths[{k}]", w) for k, w in enumerate(widths))
    depths = {len(w) for w in stages}
    if len(depths) != 1:
        raise ValueError(f"every stage needs the same depth (one width per depth), got depths "
                         f"{[len(w) for w in stages]} in widths={widths!r}")
    res = (1,) * len(stages) if resolutions is None else _positive_ints("resolutions", resolutions)
    if len(res) != len(stages):
        raise ValueError(f"resolutions needs one factor per stage ({len(stages)}), got {resolutions!r}")
    if any(a % b for a, b in zip(res, res[1:])):
        raise ValueError(f"each stage's resolution factor must be a multiple of the next one's (a later stage sees "
                         f"the image at the same or a finer resolution), got resolutions={resolutions!r}")
    return stages, res


def _upsample(x: Tensor, factor: int) -> Tensor:
    """Nearest up-sampling by an integer ``factor``, to an explicit size: exported as a Resize to sizes, which ONNX
    Runtime's shape inference (run before INT8 quantization) follows, where a Resize by scales stops it."""
    return F.interpolate(x, size=(x.shape[-2] * factor, x.shape[-1] * factor), mode="nearest")


class WidthStage(nn.Module):
    """Stage ``k``: its stem and per-depth units, reading the kept depthwise features of the stages before it.

    ``earlier[d]``: the channels that the stages before it keep at depth ``d`` (0 for the first stage);
    ``earlier_pooled``: their pooled channels; ``factor``: its input downsampling; ``up``: the ratio of the earlier
    stages' resolution factor to its own (their features are up-sampled by it); ``keep``: whether a later stage
    follows (the last stage returns the pooled features only).
    """

    def __init__(self, widths: Sequence[int], earlier: Sequence[int], in_chans: int, factor: int = 1, up: int = 1,
                 keep: bool = True, norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        super().__init__()
        self.factor, self.up, self.keep = factor, up, keep
        self.stem = ConvNormAct(in_chans, widths[0], 3, stride=2, norm_layer=norm_layer, activation_layer=act_layer)
        dws, pws, c = [], [], widths[0]
        for d, w in enumerate(widths):
            dws.append(ConvNormAct(c, c, 3, stride=1 if d == 0 else 2, groups=c, norm_layer=norm_layer,
                                   activation_layer=act_layer))
            pws.append(ConvNormAct(earlier[d] + c, w, 1, norm_layer=norm_layer, activation_layer=act_layer))
            c = w
        self.dw, self.pw = nn.ModuleList(dws), nn.ModuleList(pws)
        self.kept_channels = [e + int(m[0].in_channels) for e, m in zip(earlier, dws)]   # what it passes on
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if isinstance(state, Tensor):                          # the first stage reads the image only
            x, kept, pooled = state, None, None
        else:
            x, kept, pooled = state[0], state[1:-1], state[-1]
        f = self.stem(F.avg_pool2d(x, self.factor) if self.factor > 1 else x)
        out = []
        for d, (dw, pw) in enumerate(zip(self.dw, self.pw)):
            h = dw(f)
            if kept is not None:
                prev = kept[d] if self.up == 1 else _upsample(kept[d], self.up)
                h = torch.cat([prev, h], 1)
            f = pw(h)
            out.append(h)
        p = self.pool(f).flatten(1)
        if pooled is not None:
            p = torch.cat([pooled, p], 1)
        return (x, *out, p) if self.keep else (p,)


class PooledHead(nn.Module):
    """Exit ``k``: dropout + linear on the pooled last-depth features of stages ``<= k`` (the state's last leaf)."""

    def __init__(self, channels: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, state: tuple[Tensor, ...]) -> Tensor:
        return self.fc(self.drop(state[-1]))


class MultiStageNetwork(MultiExitNetwork):
    """Width-wise stages with an exit after each; see the module docstring. ``widths[k][d]`` are the channels that
    stage ``k`` adds at depth ``d`` (depth 0: the stem and the stride-1 unit after it), ``resolutions[k]`` the
    downsampling of stage ``k``'s input."""

    def __init__(self, widths: Sequence[Sequence[int]], num_classes: int = 10, in_chans: int = 1,
                 resolutions: Sequence[int] | None = None, drop_rate: float = 0.0,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        widths, res = check_stage_widths(widths, resolutions)
        for key, v in (("num_classes", num_classes), ("in_chans", in_chans)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        depth = len(widths[0])
        stages, heads, earlier, pooled = [], [], [0] * depth, 0
        for k, w in enumerate(widths):
            stage = WidthStage(w, earlier, in_chans, res[k], res[k - 1] // res[k] if k else 1,
                               k < len(widths) - 1, norm_layer, act_layer)
            stages.append(stage)
            earlier, pooled = stage.kept_channels, pooled + w[-1]
            heads.append(PooledHead(pooled, num_classes, drop_rate))
        super().__init__(stages, heads, num_classes, in_chans)
        self.widths, self.resolutions = widths, res
        self.num_features = pooled
        # each stage's stem and units halve the side `depth` times after its downsampling; where stages differ in
        # resolution, their features line up exactly only if every stage's side is divisible down to the last depth
        self.min_input_size = max(res) * 2 ** depth
        self.input_multiple = max(res) * 2 ** depth if len(set(res)) > 1 else max(res)
        self.input_multiple_why = f"with stage resolutions {list(res)}"      # (MultiExitNetwork.check_input)

    def stage_macs(self, x: Tensor) -> list[int]:
        """Per-sample MACs that stage ``k`` and its exit add (the differences of ``exit_macs``)."""
        cum = self.exit_macs(x)
        return [b - a for a, b in zip([0] + cum[:-1], cum)]

    def forward(self, x: Tensor) -> list[Tensor]:
        if not is_exporting():
            self.check_input(x, check_finite=False)
        return super().forward(x)


@register_model(name="multi_stage")
def multi_stage(num_classes: int = 10, in_chans: int = 1,
                widths: Sequence[Sequence[int]] = ((8, 16, 32, 64), (4, 8, 16, 32), (4, 8, 16, 32)),
                resolutions: Sequence[int] | None = None, drop_rate: float = 0.0,
                norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU,
                imta: bool | dict | None = None, stagewise: bool = False) -> MultiStageNetwork:
    """Width-wise multi-stage network; the default is three stages that together are as wide as the default
    tiny_mobilenet (16, 32, 64, 128): a half-width first stage and two quarter-width ones.
    ``create_model("multi_stage", widths=[[16, 48, 96, 192], [16, 48, 96, 192]], resolutions=[2, 1])``.
    ``imta``: the IMTA training recipe (:mod:`dyncnn.dynamic.imta`), ``True`` or a dict of its settings.
    ``stagewise``: train one stage at a time for its own exit, the earlier stages frozen
    (:mod:`dyncnn.train.recipes.stagewise`); the two recipes exclude each other."""
    if stagewise and imta:
        raise ValueError("stagewise and imta are two training recipes: choose one (stage-wise training trains each "
                         "exit alone, IMTA all exits together)")
    net = apply_imta(MultiStageNetwork(widths, num_classes=num_classes, in_chans=in_chans, resolutions=resolutions,
                                       drop_rate=drop_rate, norm_layer=norm_layer, act_layer=act_layer), imta)
    net.stagewise = stagewise
    return net
