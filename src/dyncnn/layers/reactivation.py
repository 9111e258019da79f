"""Sparse feature reactivation (CondenseNetV2, Yang et al. CVPR 2021).

In a dense network a feature, once produced, is never changed; later layers can only reuse it as it is. Sparse
feature reactivation (SFR) lets each layer also *update* the earlier features: a learned sparse 1x1 convolution
of the layer's new output (``growth`` channels) produces an increment for the ``C_prev`` earlier channels, added
to them before the new output is concatenated.

The sparse convolution is learned like CondenseNet's learned group convolution, transposed: the *inputs* (the new
features) are split into ``G`` groups (input ``i`` in group ``i % G``, the official interleaving) and each group
learns which *outputs* (earlier features) it updates. At each of the ``C - 1`` condensing stages every group drops
``C_prev // C`` further outputs, those with the smallest L1 norm of its weights; in the end each group updates
``C_prev / C`` earlier features. The inference form (:class:`CondensedReactivation`) is norm -> act -> channel
unshuffle (groups made contiguous) -> grouped 1x1 conv -> scatter-add of its outputs into the kept earlier
channels, so it costs ``growth * C_prev / C`` MACs per pixel. The official code scatters with a dense
``C_prev x C_prev`` matrix product instead; ``scatter_add`` does the same additions without those multiplications.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .learned_group import Condensable, ConversionError, LayerFactory, _drop_smallest
from .shuffle import channel_unshuffle


class SparseFeatureReactivation(Condensable):
    """Training form: ``features + conv_masked(act(norm(new)))`` with a learned, progressively sparser mask.

    ``keep[g, o]`` says whether input group ``g`` still updates earlier feature ``o``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, condense_factor: int | None = None,
                 norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU):
        super().__init__()
        condense_factor = groups if condense_factor is None else condense_factor
        if groups < 1 or condense_factor < 1:
            raise ValueError(f"groups and condense_factor must be >= 1, got {groups} and {condense_factor}")
        if in_channels % groups:
            raise ValueError(f"SparseFeatureReactivation: in_channels={in_channels} (the new features) is not "
                             f"divisible by groups={groups}")
        if out_channels < condense_factor:
            raise ValueError(f"SparseFeatureReactivation: out_channels={out_channels} must be >= "
                             f"condense_factor={condense_factor}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor = groups, condense_factor
        self.num_stages = condense_factor - 1
        self.norm = norm_layer(in_channels)
        self.act = act_layer()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.register_buffer("keep", torch.ones(groups, out_channels, dtype=torch.bool))

    @property
    def kept_per_group(self) -> int:
        return self.out_channels - self.num_stages * (self.out_channels // self.condense_factor)

    def weight_mask(self) -> Tensor:
        """(out, in) 0/1 mask: column ``i`` is ``keep[i % groups]``."""
        return self.keep.t().repeat(1, self.in_channels // self.groups)

    def masked_weight(self) -> Tensor:
        return self.conv.weight * self.weight_mask().to(self.conv.weight.dtype)[:, :, None, None]

    def forward(self, new: Tensor, features: Tensor) -> Tensor:
        """Return ``features`` (N, out, H, W) updated from ``new`` (N, in, H, W)."""
        return features + F.conv2d(self.act(self.norm(new)), self.masked_weight())

    def _group_view(self, w: Tensor) -> Tensor:
        """(out, in) -> (groups, out, d_in): dimension 0 is the group of the input channel."""
        return w.reshape(self.out_channels, self.in_channels // self.groups, self.groups).permute(2, 0, 1)

    def _condense_step(self) -> None:
        importance = self._group_view(self.masked_weight().detach().abs().flatten(1)).sum(2)   # (G, out)
        _drop_smallest(self.keep, importance, self.out_channels // self.condense_factor)

    def group_lasso(self) -> Tensor:
        if self.condensing_done:
            return self.conv.weight.new_zeros(())
        w2 = self._group_view(self.masked_weight().flatten(1).pow(2)).sum(2)
        return w2.clamp_min(1e-12).sqrt().sum()

    @torch.no_grad()
    def convert(self) -> CondensedReactivation:
        self.check_convertible()
        counts = self.keep.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ConversionError(f"groups keep different numbers of outputs ({counts.tolist()}); "
                                  f"the mask was edited by hand")
        g, k, d_in = self.groups, int(counts[0]), self.in_channels // self.groups
        kept = self.keep.nonzero()[:, 1].reshape(g, k)                          # (G, K) earlier-feature indices
        out = CondensedReactivation(self.in_channels, self.out_channels, g, g * k, norm=copy.deepcopy(self.norm),
                                    act=copy.deepcopy(self.act), index=kept.flatten())
        out.conv.to(self.conv.weight)                                           # same device and dtype
        w = self._group_view(self.conv.weight.flatten(1))                       # (G, out, d_in)
        w = torch.gather(w, 1, kept[:, :, None].expand(g, k, d_in))             # (G, K, d_in)
        out.conv.weight.copy_(w.reshape(g * k, d_in, 1, 1))
        return out.train(self.training)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, groups={self.groups}, "
                f"condense_factor={self.condense_factor}")


class CondensedReactivation(nn.Module):
    """Inference form: norm -> act -> unshuffle -> grouped 1x1 conv -> scatter-add into the kept earlier channels."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, kept_channels: int,
                 norm: nn.Module, act: nn.Module, index: Tensor | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.norm, self.act = norm, act
        self.conv = nn.Conv2d(in_channels, kept_channels, 1, groups=groups, bias=False)
        self.register_buffer("index", torch.zeros(kept_channels, dtype=torch.long) if index is None
                             else index.clone().long())

    def forward(self, new: Tensor, features: Tensor) -> Tensor:
        y = self.conv(channel_unshuffle(self.act(self.norm(new)), self.groups)).to(features.dtype)
        # scatter_add, not index_add: two groups may update the same earlier feature, and only scatter_add
        # exports to ONNX with that accumulation (ScatterElements reduction="add", opset >= 16).
        return features.scatter_add(1, self.index.view(1, -1, 1, 1).expand_as(y), y)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, groups={self.groups}, "
                f"updated={self.index.numel()}")
