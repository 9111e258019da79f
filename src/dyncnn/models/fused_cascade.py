"""A cascade fused into one feature-reusing network: each stage is a whole backbone that reads what the stages
before it computed.

The searched cascade (``dyncnn frontier``) chains separately trained networks, cheapest first, and each one
starts again from the pixels. Two published ideas make a chain of stages one network that *reuses* features:

- **the earlier exits' predictions** (the committee of "Wisdom of Committees", Wang et al., ICLR 2022; IMTA's
  forward transfer): exit ``k`` scores a class by the sum of the log-probabilities of stages ``<= k`` (their
  product of experts), so a sample that continues past exit ``k - 1`` keeps what the cheaper stages saw;
- **the earlier stage's features**: with ``laterals="pooled"`` (the default) exit ``k``'s classifier also reads
  stage ``k - 1``'s pooled features (as the multi-stage network's and MSDNet's classifiers read every earlier
  stage's), a linear map of a vector the earlier stage already computed, so it adds a few thousand MACs; with
  "deepest" stage ``k`` adds a 1x1 convolution of stage ``k - 1``'s deepest feature map to its own feature map of
  the same output stride (RANet's fusion of a coarse sub-network into a finer one, Yang et al., CVPR 2020), and
  "all" does so at every output stride both share; these cost MACs at every pixel (tiny-M /2 into tiny-M at
  128x128: 4.7M MACs, a quarter of tiny-M).

Built from the zoo's backbones that have a stem, ``stages`` (an ``nn.Sequential``, one entry per
``stage_info`` row) and a head, run as stem -> stages -> head (tiny_mobilenet, the MobileNets, ResNet; DenseNet
and ShuffleNet compute more between them and are refused when the network is built), each optionally on a ``factor``-times
downsampled image (the ``resized`` model), so a trained cascade's members load into it unchanged
(:meth:`FusedCascade.load_members`). The laterals start at zero: with them untrained the network computes
exactly the members' features. ``freeze_members`` (the default) keeps the members' weights and BatchNorm
statistics as trained, so that training fits only the new connections (the cascade's training budget plus the
laterals'), and the first exit is exactly the first member.

Executed, not masked (a :class:`~dyncnn.dynamic.exits.MultiExitNetwork`): a sample that leaves at exit ``k`` never
runs stage ``k + 1``; the state between stages is ``(image, kept features (feature maps, or the pooled vector),
log-probabilities so far)``, which the staged bundles pass as graph inputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.exits import MultiExitNetwork
from ..dynamic.imta import apply_imta
from ..errors import is_exporting
from .registry import register_model
from .resized import Resized, member_model

LATERALS = ("none", "pooled", "deepest", "all")


def _parts(member: nn.Module) -> tuple[nn.Module, int]:
    """``(backbone, factor)`` of a member: a ``resized`` model or a backbone itself, checked for what a fused stage
    runs (a stem, ``stages`` with one ``stage_info`` row each, ``forward_head``)."""
    backbone, factor = (member.backbone, member.factor) if isinstance(member, Resized) else (member, 1)
    stages, info = getattr(backbone, "stages", None), getattr(backbone, "stage_info", None)
    ok = isinstance(stages, nn.Sequential) and hasattr(backbone, "stem") and hasattr(backbone, "forward_head") \
        and info is not None and [i.module for i in info if i.module.startswith("stages.")] == \
        [f"stages.{i}" for i in range(len(stages))]
    if not ok:
        raise ValueError(f"a fused cascade member must be a zoo backbone with a stem, `stages` (an nn.Sequential with "
                         f"one stage_info row per stage) and forward_head, such as tiny_mobilenet or "
                         f"mobilenet_v3_small (or one of them under `resized`); got {type(backbone).__name__}")
    return backbone, factor


def _tail(backbone: nn.Module) -> nn.Module:
    return getattr(backbone, "conv_head", None) or nn.Identity()


@torch.no_grad()
def _check_path(member: nn.Module) -> None:
    """A fused stage runs its member as stem -> stages -> [conv_head] -> forward_head; refuse a backbone whose
    ``forward_features`` computes anything else (DenseNet's final normalization, say), checked once on a random
    image."""
    backbone, _ = _parts(member)
    if any(p.is_meta for p in backbone.parameters()):    # a skeleton (a checkpoint's size check): nothing to run
        return
    side = max(int(getattr(backbone, "min_input_size", 1)), 32)
    x = torch.randn(2, int(getattr(backbone, "in_chans", 3)), side, side, generator=torch.Generator().manual_seed(0))
    was_training = backbone.training
    backbone.eval()
    try:
        want = backbone.forward_features(x)
        got = _tail(backbone)(backbone.stages(backbone.stem(x)))
    finally:
        backbone.train(was_training)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ValueError(f"a fused cascade runs each member as stem -> stages -> conv_head -> forward_head, but "
                         f"{type(backbone).__name__}'s forward_features computes something else (a final "
                         f"normalization, a pooling between its stem and stages): it cannot be a member")


def _taps(member: nn.Module) -> list[tuple[int, int]]:
    """(output stride in input pixels, channels) after each of a member's stages."""
    backbone, factor = _parts(member)
    return [(i.stride * factor, i.channels) for i in backbone.stage_info if i.module.startswith("stages.")]


def _deepest(taps: list[tuple[int, int]], stride: int) -> int:
    return max(i for i, (s, _) in enumerate(taps) if s == stride)


def _classifier(backbone: nn.Module) -> nn.Linear:
    """The last Linear of a backbone's head (``forward_head(x, pre_logits=True)`` is what it reads)."""
    fc = getattr(backbone, "classifier", None)
    fc = fc if isinstance(fc, nn.Linear) else getattr(backbone, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"laterals='pooled' reads the pooled features of {type(backbone).__name__}'s head, which "
                         f"needs its last layer as a Linear `classifier` or `fc`")
    return fc


class FusedStage(nn.Module):
    """Member ``k`` of the cascade as a stage: its backbone on its resolution, plus (from the second stage on) the
    1x1 laterals from the previous stage's kept feature maps, added after stage ``i`` of its own; it returns the
    state the next stage reads, or only the log-probabilities after the last stage."""

    def __init__(self, member: nn.Module, fuse: Sequence[tuple[int, int, int]] = (), keep: Sequence[int] = (),
                 last: bool = False, pooled_in: int = 0, keep_pooled: bool = False):
        super().__init__()
        self.member = member
        self.backbone, self.factor = _parts(member)
        # laterals="pooled": a zero-initialised linear map of the previous stage's pooled features, added to the
        # logits (``pooled_in`` of them); ``keep_pooled``: pass this stage's pooled features on
        self.pooled = nn.Linear(pooled_in, member.num_classes, bias=False) if pooled_in else None
        if self.pooled is not None:
            nn.init.zeros_(self.pooled.weight)
        self.keep_pooled = keep_pooled
        self.fuse_at = [i for i, _, _ in fuse]               # own stage index after which each lateral is added
        self.laterals = nn.ModuleList(nn.Conv2d(c_in, c_out, 1, bias=False) for _, c_in, c_out in fuse)
        for conv in self.laterals:
            nn.init.zeros_(conv.weight)                      # untrained: the member's own features, exactly
        self.keep, self.last = list(keep), last              # own stage indices whose outputs the next stage reads

    def forward(self, state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if isinstance(state, Tensor):
            x, kept, prior = state, (), None
        else:
            x, kept, prior = state[0], state[1:-1], state[-1]
        b = self.backbone
        f = b.stem(F.avg_pool2d(x, self.factor) if self.factor > 1 else x)
        out = []
        for i, stage in enumerate(b.stages):
            f = stage(f)
            for j, at in enumerate(self.fuse_at):
                if at == i:
                    f = f + self.laterals[j](kept[j])
            if i in self.keep:
                out.append(f)
        f = _tail(b)(f)
        if self.pooled is None and not self.keep_pooled:
            logits = b.forward_head(f)
        else:
            pre = b.forward_head(f, pre_logits=True)
            logits = _classifier(b)(pre)
            if self.pooled is not None:
                logits = logits + self.pooled(kept[-1])
            if self.keep_pooled:
                out.append(pre)
        logp = F.log_softmax(logits, dim=1)
        logp = logp if prior is None else prior + logp
        return (logp,) if self.last else (x, *out, logp)


class PriorLogits(nn.Module):
    """Exit ``k``: the summed log-probabilities of stages ``<= k`` (the state's last leaf; no computation)."""

    def forward(self, state: tuple[Tensor, ...]) -> Tensor:
        return state[-1]


class FusedCascade(MultiExitNetwork):
    """``members`` (cheapest first) fused into one network; see the module docstring."""

    def __init__(self, members: Sequence[nn.Module], num_classes: int, in_chans: int = 1,
                 laterals: str = "pooled", freeze_members: bool = True):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"a fused cascade needs at least two members, got {len(members)}")
        if laterals not in LATERALS:
            raise ValueError(f"laterals must be one of {', '.join(LATERALS)}, got {laterals!r}")
        for m in members:
            _check_path(m)
        taps = [_taps(m) for m in members]
        plans: list[list[tuple[int, int, int]]] = [[] for _ in members]   # per stage: (own index, c_in, c_out)
        keeps: list[list[int]] = [[] for _ in members]                    # per stage: own indices passed on
        strides_used = [1]
        pooled = [0] * len(members)
        for k in range(1, len(members)):
            if laterals == "pooled":
                pooled[k] = _classifier(_parts(members[k - 1])[0]).in_features
                continue
            shared = sorted({s for s, _ in taps[k - 1]} & {s for s, _ in taps[k]})
            if laterals == "none" or not shared:
                continue
            for s in (shared if laterals == "all" else shared[-1:]):
                j, i = _deepest(taps[k - 1], s), _deepest(taps[k], s)
                keeps[k - 1].append(j)
                plans[k].append((i, taps[k - 1][j][1], taps[k][i][1]))
                strides_used.append(s)
        last = len(members) - 1
        stages = [FusedStage(m, plans[k], keeps[k], last=k == last, pooled_in=pooled[k],
                             keep_pooled=laterals == "pooled" and k < last) for k, m in enumerate(members)]
        super().__init__(stages, [PriorLogits() for _ in members], num_classes, in_chans)
        self.laterals, self.freeze_members = laterals, bool(freeze_members)
        self.min_input_size = max(getattr(m, "min_input_size", 1) for m in members)
        # fused feature maps line up only where both stages' sides divide down to the fused stride
        self.input_multiple = max(strides_used)
        self.input_multiple_why = f"fusing feature maps at output stride {self.input_multiple}"
        if self.freeze_members:
            for m in members:
                m.requires_grad_(False)

    def members(self) -> list[nn.Module]:
        return [stage.member for stage in self.stages]

    def load_members(self, members: Sequence[nn.Module]) -> "FusedCascade":
        """Copy trained members' weights (e.g. a searched cascade's static networks) into the stages."""
        mine = self.members()
        if len(members) != len(mine):
            raise ValueError(f"expected {len(mine)} members' weights, got {len(members)}")
        for k, (dst, src) in enumerate(zip(mine, members)):
            try:
                dst.load_state_dict(src.state_dict())
            except RuntimeError as e:
                raise ValueError(f"member {k}'s weights do not fit the fused cascade's member {k} "
                                 f"({type(dst).__name__}): {e}") from None
        return self

    def train(self, mode: bool = True) -> "FusedCascade":
        super().train(mode)
        if self.freeze_members:       # frozen members keep their BatchNorm statistics: eval mode, always
            for stage in self.stages:
                stage.member.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        if not is_exporting():
            self.check_input(x, check_finite=False)
        return super().forward(x)


@register_model(name="fused_cascade")
def fused_cascade(members: Sequence[dict] = ({"name": "resized", "factor": 2, "backbone_cfg": {"widths": [8, 16, 32]}},
                                             {"name": "tiny_mobilenet", "widths": [8, 16, 32]}),
                  num_classes: int = 10, in_chans: int = 1, laterals: str = "pooled", freeze_members: bool = True,
                  imta: bool | dict | None = None) -> FusedCascade:
    """A cascade of registered backbones fused into one network (see the module docstring), cheapest first:
    ``create_model("fused_cascade", members=[{"name": "resized", "factor": 2, "backbone_cfg": {...}},
    {"name": "mobilenet_v3_small"}])``. ``laterals``: "pooled" (each exit's classifier also reads the previous
    stage's pooled features), "deepest" (one 1x1 lateral per stage, at the deepest output stride both stages
    share), "all" (at every shared stride) or "none" (only the predictions are reused). ``imta``: the multi-exit training
    recipe (:mod:`dyncnn.dynamic.imta`; forward transfer is not needed, the exits already add up)."""
    members = list(members)
    if len(members) < 2:
        raise ValueError(f"a fused cascade needs at least two members, got {len(members)}")
    net = FusedCascade([member_model(m, num_classes, in_chans) for m in members], num_classes, in_chans,
                       laterals=laterals, freeze_members=freeze_members)
    return apply_imta(net, imta)

