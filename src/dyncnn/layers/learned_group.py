"""Learned group convolution (CondenseNet, Huang et al. CVPR 2018): a 1x1 convolution that learns its groups.

During training the layer is a dense 1x1 convolution whose weight is multiplied by a 0/1 mask. Output channel
``o`` belongs to group ``o % G`` (the official code's interleaving, which a channel shuffle undoes after the
grouped convolution). Training is split into ``C - 1`` condensing stages over the first half of training; at the
end of each stage every group drops a further ``in // C`` of the inputs it still uses, those with the smallest L1
norm of the group's weights (the group's importance of that input). Progress comes from an explicit
``set_progress(fraction)`` call (fraction of training done, in [0, 1]), never from a global or class attribute.

After training, :meth:`LearnedGroupConv.convert` returns :class:`CondensedGroupConv`: an index-select of the kept
inputs, a plain grouped convolution and a channel shuffle, which computes exactly what the masked layer computed
at the cost of the kept connections only.

The same schedule drives :class:`LearnedLinear` (CondenseNet's classifier, which loses half of its inputs by
learned importance) and the sparse feature reactivation of CondenseNetV2 (``layers/reactivation.py``). Each of
them is a :class:`Condensable`; the model-level helpers at the end of this module work on any of them.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DyncnnError
from .shuffle import channel_shuffle

LayerFactory = Callable[..., nn.Module]


class ConversionError(DyncnnError):
    """convert() called on a model that is already converted or whose condensing stages have not finished."""


def check_progress(fraction: float) -> float:
    """Validate a training-progress fraction (a finite number in [0, 1])."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise DyncnnError(f"progress must be a number in [0, 1] (fraction of training done), "
                          f"got {fraction!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise DyncnnError(f"progress must be in [0, 1] (fraction of training done), got {fraction!r}")
    return value


def condensing_stage(progress: float, num_stages: int) -> int:
    """Condensing steps that are due at ``progress``: ``floor(2 * progress * num_stages)``, capped at ``num_stages``.

    The ``num_stages`` steps fall evenly over the first half of training (the last one at progress 0.5), as in
    the paper; ``num_stages`` is ``C - 1`` for a condensation factor ``C``.
    """
    if num_stages <= 0:
        return 0
    # The small epsilon keeps exact boundaries (progress = k / (2 * num_stages)) on the later stage.
    return min(num_stages, int(math.floor(2.0 * progress * num_stages + 1e-9)))


def gather_batchnorm(norm: nn.Module, index: Tensor) -> nn.Module:
    """A BatchNorm over the channels ``index`` of ``norm`` (weights and running statistics copied)."""
    if isinstance(norm, nn.Identity):
        return nn.Identity()
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"conversion can gather BatchNorm or Identity norm layers only, got {type(norm).__name__}")
    new = copy.deepcopy(norm)
    new.num_features = len(index)
    with torch.no_grad():
        for name, p in list(new.named_parameters(recurse=False)):
            setattr(new, name, nn.Parameter(p[index].clone(), requires_grad=p.requires_grad))
        for name, b in list(new.named_buffers(recurse=False)):
            if b is not None and b.dim() == 1:
                setattr(new, name, b[index].clone())
    return new


class Condensable(nn.Module):
    """A training-time layer that becomes sparse by a progress-driven schedule and converts to a dense smaller one.

    Subclasses keep their state (masks, ``condense_stage``) in buffers, so that a checkpoint taken mid-schedule
    resumes exactly, and implement ``num_stages``, ``_condense_step()`` and ``convert()``.
    """

    num_stages: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("condense_stage", torch.zeros((), dtype=torch.long))
        self._stage_cache: int | None = 0   # Python mirror of the buffer: no device sync on every step

    @property
    def stage(self) -> int:
        if self._stage_cache is None:
            self._stage_cache = int(self.condense_stage)
        return self._stage_cache

    @property
    def condensing_done(self) -> bool:
        return self.stage >= self.num_stages

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._stage_cache = None

    @torch.no_grad()
    def set_progress(self, fraction: float) -> None:
        """Run every condensing step due at ``fraction`` of training that has not run yet (stages never go back)."""
        target = condensing_stage(check_progress(fraction), self.num_stages)
        while self.stage < target:
            self._condense_step()
            self.condense_stage.add_(1)
            self._stage_cache = self.stage + 1

    def _condense_step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def group_lasso(self) -> Tensor:
        """Group-lasso penalty of the weights still in play (zero when the layer has none or has finished)."""
        return self.condense_stage.new_zeros((), dtype=torch.float32)

    def check_convertible(self) -> None:
        if not self.condensing_done:
            raise ConversionError(
                f"{type(self).__name__} cannot be converted before its condensing stages have finished: it is at "
                f"stage {self.stage} of {self.num_stages}; call set_progress(f) with f >= 0.5 first")


def _drop_smallest(keep: Tensor, importance: Tensor, count: int) -> None:
    """In each row of ``keep`` (G, N), switch off the ``count`` still-kept entries of smallest ``importance``."""
    if count <= 0:
        return
    importance = importance.masked_fill(~keep, float("inf"))
    drop = importance.topk(count, dim=1, largest=False).indices
    keep.scatter_(1, drop, False)


class LearnedGroupConv(Condensable):
    """Norm -> act -> (dropout) -> masked dense 1x1 conv that condenses into ``groups`` groups (CondenseNet).

    ``keep[g, i]`` says whether group ``g`` still reads input ``i``; output ``o`` belongs to group ``o % groups``.
    With ``in_channels`` divisible by ``condense_factor`` every group ends with ``in_channels / C`` inputs.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, condense_factor: int | None = None,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU,
                 drop_rate: float = 0.0):
        super().__init__()
        condense_factor = groups if condense_factor is None else condense_factor
        if groups < 1 or condense_factor < 1:
            raise ValueError(f"groups and condense_factor must be >= 1, got {groups} and {condense_factor}")
        if out_channels % groups:
            raise ValueError(f"LearnedGroupConv: out_channels={out_channels} is not divisible by groups={groups}")
        if in_channels < condense_factor:
            raise ValueError(f"LearnedGroupConv: in_channels={in_channels} must be >= condense_factor="
                             f"{condense_factor}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor = groups, condense_factor
        self.num_stages = condense_factor - 1
        self.norm = norm_layer(in_channels)
        self.act = act_layer()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.register_buffer("keep", torch.ones(groups, in_channels, dtype=torch.bool))

    @property
    def kept_per_group(self) -> int:
        """Inputs each group reads once condensing has finished."""
        return self.in_channels - self.num_stages * (self.in_channels // self.condense_factor)

    def weight_mask(self) -> Tensor:
        """(out, in) 0/1 mask: row ``o`` is ``keep[o % groups]``."""
        return self.keep.repeat(self.out_channels // self.groups, 1)

    def masked_weight(self) -> Tensor:
        return self.conv.weight * self.weight_mask().to(self.conv.weight.dtype)[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.norm(x)))
        return F.conv2d(x, self.masked_weight())

    def _group_view(self, w: Tensor) -> Tensor:
        """(out, in) -> (d_out, groups, in): dimension 1 is the group of the output channel."""
        return w.reshape(self.out_channels // self.groups, self.groups, self.in_channels)

    def _condense_step(self) -> None:
        importance = self._group_view(self.masked_weight().detach().abs().flatten(1)).sum(0)   # (G, in)
        _drop_smallest(self.keep, importance, self.in_channels // self.condense_factor)

    def group_lasso(self) -> Tensor:
        """Sum over groups and inputs of the L2 norm of the group's weights on that input (paper, Sec. 3.1)."""
        if self.condensing_done:
            return self.conv.weight.new_zeros(())
        w2 = self._group_view(self.masked_weight().flatten(1).pow(2)).sum(0)
        return w2.clamp_min(1e-12).sqrt().sum()

    def kept_inputs(self) -> Tensor:
        """(G, kept_per_group) input indices each group reads, ascending."""
        counts = self.keep.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ConversionError(f"groups keep different numbers of inputs ({counts.tolist()}); "
                                  f"the mask was edited by hand")
        return self.keep.nonzero()[:, 1].reshape(self.groups, int(counts[0]))

    @torch.no_grad()
    def convert(self) -> CondensedGroupConv:
        self.check_convertible()
        kept = self.kept_inputs()                                             # (G, K)
        g, k, d_out = self.groups, kept.shape[1], self.out_channels // self.groups
        index = kept.flatten()
        out = CondensedGroupConv(self.in_channels, g * k, self.out_channels, g,
                                 norm=gather_batchnorm(self.norm, index), act=copy.deepcopy(self.act),
                                 drop=copy.deepcopy(self.drop), index=index)
        out.conv.to(self.conv.weight)                                           # same device and dtype
        # Grouped output g * d_out + j is the masked layer's output j * G + g; the shuffle restores that order.
        w = self._group_view(self.conv.weight.flatten(1)).transpose(0, 1)    # (G, d_out, in)
        w = torch.gather(w, 2, kept[:, None, :].expand(g, d_out, k))          # (G, d_out, K)
        out.conv.weight.copy_(w.reshape(g * d_out, k, 1, 1))
        return out.train(self.training)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, groups={self.groups}, "
                f"condense_factor={self.condense_factor}")


class CondensedGroupConv(nn.Module):
    """Inference form of :class:`LearnedGroupConv`: index-select -> norm -> act -> grouped 1x1 conv -> shuffle."""

    def __init__(self, in_channels: int, kept_channels: int, out_channels: int, groups: int,
                 norm: nn.Module, act: nn.Module, drop: nn.Module | None = None, index: Tensor | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.register_buffer("index", torch.zeros(kept_channels, dtype=torch.long) if index is None
                             else index.clone().long())
        self.norm, self.act = norm, act
        self.drop = drop if drop is not None else nn.Identity()
        self.conv = nn.Conv2d(kept_channels, out_channels, 1, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.norm(x.index_select(1, self.index))))
        return channel_shuffle(self.conv(x), self.groups)

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, kept={self.index.numel()}, out={self.out_channels}, groups={self.groups}"


class LearnedLinear(Condensable):
    """A linear layer that drops ``drop_fraction`` of its inputs, smallest L1 norm of weight columns first.

    CondenseNet condenses its classifier this way (half of the inputs). The official code drops them at
    conversion time; here they are dropped at the end of the condensing schedule (progress 0.5), so that the
    optimisation stage trains the classifier that will be deployed and the converted model computes exactly
    what the masked one does.
    """

    num_stages = 1

    def __init__(self, in_features: int, out_features: int, drop_fraction: float = 0.5, bias: bool = True):
        super().__init__()
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        self.in_features, self.out_features = in_features, out_features
        self.num_dropped = int(in_features * drop_fraction)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.register_buffer("keep", torch.ones(in_features, dtype=torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.linear.weight * self.keep.to(self.linear.weight.dtype), self.linear.bias)

    def _condense_step(self) -> None:
        importance = (self.linear.weight.detach().abs() * self.keep).sum(0)
        _drop_smallest(self.keep[None], importance[None], self.num_dropped)

    @torch.no_grad()
    def convert(self) -> CondensedLinear:
        self.check_convertible()
        index = self.keep.nonzero()[:, 0]
        out = CondensedLinear(self.in_features, len(index), self.out_features, index=index,
                              bias=self.linear.bias is not None)
        out.linear.to(self.linear.weight)                                       # same device and dtype
        out.linear.weight.copy_(self.linear.weight[:, index])
        if self.linear.bias is not None:
            out.linear.bias.copy_(self.linear.bias)
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dropped={self.num_dropped}"


class CondensedLinear(nn.Module):
    """Inference form of :class:`LearnedLinear`: index-select of the kept inputs, then a smaller linear layer."""

    def __init__(self, in_features: int, kept_features: int, out_features: int, index: Tensor | None = None,
                 bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("index", torch.zeros(kept_features, dtype=torch.long) if index is None
                             else index.clone().long())
        self.linear = nn.Linear(kept_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.index_select(1, self.index))


# ---- model-level helpers: any module tree that contains Condensable layers -------------------------------------

def set_progress(model: nn.Module, fraction: float) -> None:
    """Advance every condensable layer of ``model`` to the schedule position ``fraction`` of training."""
    fraction = check_progress(fraction)
    for m in model.modules():
        if isinstance(m, Condensable):
            m.set_progress(fraction)


def group_lasso_loss(model: nn.Module) -> Tensor:
    """Sum of the group-lasso penalties of the condensable layers of ``model`` (a 0-dim tensor)."""
    terms = [m.group_lasso() for m in model.modules() if isinstance(m, Condensable)]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([t.float() for t in terms]).sum()


def unfinished_layers(model: nn.Module) -> list[str]:
    """'name (stage s of n)' for every condensable layer whose schedule has not finished."""
    return [f"{name} (stage {m.stage} of {m.num_stages})" for name, m in model.named_modules()
            if isinstance(m, Condensable) and not m.condensing_done]


def convert_condensable(model: nn.Module) -> int:
    """Replace, in place, every condensable layer of ``model`` by its inference form; returns how many."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, Condensable):
            setattr(model, name, child.convert())
            count += 1
        else:
            count += convert_condensable(child)
    return count
