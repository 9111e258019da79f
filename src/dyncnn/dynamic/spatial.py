"""Pixel-level spatially adaptive inference (DynConv, Verelst & Tuytelaars 2020; Xie et al. 2020's interpolation).

A mask unit per residual block predicts, from the block's input, one logit per position: which positions of the
residual branch to compute. In training the decision is a straight-through Gumbel sample and the branch runs
dense with the mask applied (allowed in training); the cost term is the per-sample MAC fraction of the gated
blocks, pushed to a budget (network level) inside annealed per-block bounds. At inference the mask is
``logits >= 0`` and the branch really runs only at the selected positions (``layers/sparse_conv.py``): the
units up to the last k x k convolution run on the mask dilated by that kernel (so it sees its neighbours), the
rest on the mask itself; skipped positions keep the residual, or (``interpolate=True``) get the branch value
interpolated from computed neighbours (a normalised 3x3 average).

Only shape-preserving residual blocks are gated (identity shortcut, stride 1, no squeeze-excitation, which
needs every position): stride-2 and channel-changing blocks, stems and heads run dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DyncnnError, is_exporting
from ..layers.sparse_conv import (PackedConv, Positions, apply_packed, check_mask, compact_neighbours, conv_at,
                                  dilate_mask, fold_bn, pack_conv, rows_to_map, scatter_rows, to_padded_rows)
from .blocks import ResidualBranchBlock


class SparseExportError(DyncnnError):
    """DynConv's sparse path cannot become one static graph."""


EXPORT_MESSAGE = ("DynConv's sparse execution is data-dependent (each sample computes a different number of "
                  "positions, gathered and scattered by index), so it has no honest static ONNX graph; a dense "
                  "graph with the mask multiplied in would compute every position. Export the static backbone "
                  "(model.backbone) instead, or run the dynamic model in PyTorch.")


@dataclass(frozen=True)
class MaskUnitCfg:
    kernel_size: int = 1       # 1 or 3: the conv that turns the block input into one logit per position
    init_bias: float = 1.0     # start with most positions on: fine-tuning from a static network


class MaskUnit(nn.Module):
    """A k x k convolution on the block input -> one logit per position (N, 1, H, W)."""

    def __init__(self, in_chs: int, cfg: MaskUnitCfg = MaskUnitCfg()):
        super().__init__()
        if cfg.kernel_size not in (1, 3):
            raise ValueError(f"mask unit kernel_size must be 1 or 3, got {cfg.kernel_size}")
        self.conv = nn.Conv2d(in_chs, 1, cfg.kernel_size, padding=cfg.kernel_size // 2)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, cfg.init_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class BranchUnit:
    """One conv -> norm -> activation of a residual branch, as the sparse path sees it. The modules are read from
    their container at each use, so that a rewrite of it (BatchNorm folded into the convolution by
    ``layers.fusion.optimize_for_inference``) is what runs on the sparse path too."""

    __slots__ = ("seq", "_keys")

    def __init__(self, seq: nn.Sequential):
        self.seq, self._keys = seq, list(seq._modules)

    @property
    def conv(self) -> nn.Conv2d:
        return self.seq._modules[self._keys[0]]

    @property
    def norm(self) -> nn.Module:
        return self.seq._modules[self._keys[1]]

    @property
    def act(self) -> nn.Module | None:
        return self.seq._modules[self._keys[2]] if len(self._keys) == 3 else None

    @property
    def kernel(self) -> int:
        return self.conv.kernel_size[0]

    def tensors(self) -> tuple:
        """The tensors the folded kernel is made of (a folded norm has none of its own)."""
        conv, norm = self.conv, self.norm
        if isinstance(norm, nn.BatchNorm2d):
            return conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var
        return conv.weight, conv.bias


class GatedBranch:
    """A residual block ``post_act(x + branch(x))`` whose branch is a chain of conv-norm-act units.

    ``split`` is the index of the last k x k unit: units before it run on the dilated mask (only 1x1 units, or a
    k x k first unit that reads the block input), it and the units after it (1x1) run on the mask. Built by
    :func:`gated_branch`, which returns None for blocks that must run dense.
    """

    def __init__(self, block: nn.Module, units: list[BranchUnit], post_act: nn.Module | None):
        self.block, self.units, self.post_act = block, units, post_act
        ks = [u.kernel for u in units]
        self.split = max((i for i, k in enumerate(ks) if k > 1), default=0)
        self.dilation = ks[self.split] if self.split > 0 else 1
        self.pad = max(ks) // 2

    def packed(self) -> list[PackedConv]:
        """Every unit's kernel with its eval BatchNorm folded in, cached until a parameter or buffer changes."""
        key = tuple((t.data_ptr(), t._version) for u in self.units       # attributes, not module iterators: at
                    for t in u.tensors() if t is not None)                 # batch 1 those cost as much as a conv
        if getattr(self, "_key", None) != key:
            with torch.no_grad():
                self._packed = [pack_conv(*fold_bn(u.conv, u.norm), groups=u.conv.groups) for u in self.units]
            self._key = key
        return self._packed

    def unit_macs(self, h: int, w: int) -> list[int]:
        """Dense MACs of each unit on an h x w map (weight.numel() per output position)."""
        return [u.conv.weight.numel() * h * w for u in self.units]

    def branch(self, x: Tensor) -> Tensor:
        for u in self.units:
            x = u.norm(u.conv(x))
            if u.act is not None:
                x = u.act(x)
        return x

    def finish(self, y: Tensor) -> Tensor:
        return self.post_act(y) if self.post_act is not None else y


def _units(seq: nn.Module) -> BranchUnit | None:
    """A ConvNormAct (conv, norm[, act]) as a BranchUnit, or None if its shape is not supported."""
    parts = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    if (len(parts) not in (2, 3) or not isinstance(parts[0], nn.Conv2d)
            or not isinstance(parts[1], (nn.BatchNorm2d, nn.Identity))):      # Identity: BatchNorm folded
        return None
    conv = parts[0]
    k = conv.kernel_size[0]
    if (conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.kernel_size != (k, k) or k % 2 != 1
            or conv.padding != (k // 2, k // 2) or conv.groups not in (1, conv.in_channels)
            or (conv.groups > 1 and conv.out_channels != conv.in_channels)):
        return None
    return BranchUnit(seq)


def gated_branch(block: nn.Module) -> GatedBranch | None:
    """The sparse description of a shape-preserving residual block (ResNet basic / bottleneck, MobileNet inverted
    residual without SE), or None when the block has to run dense (stride, channel change, SE, other layers)."""
    if not isinstance(block, ResidualBranchBlock) or not (block.identity_skip and block.plain_branch):
        return None
    seqs, post = block.branch_units(), block.post_act
    units = [_units(s) for s in seqs]
    if not units or any(u is None for u in units):
        return None
    g = GatedBranch(block, units, post)
    # Before the split only 1x1 units, except a first unit that reads the (dense) block input.
    if any(u.kernel > 1 for u in units[1:g.split]) or any(u.kernel > 1 for u in units[g.split + 1:]):
        return None
    return g


# --- training: dense compute with the mask applied ---------------------------------------------------------------

def neighbour_fill(values: Tensor, mask: Tensor) -> Tensor:
    """Normalised 3x3 average of ``values`` (N, C, H, W) over the neighbours where ``mask`` (N, 1, H, W) is 1."""
    num = F.avg_pool2d(values, 3, stride=1, padding=1, divisor_override=1)
    den = F.avg_pool2d(mask, 3, stride=1, padding=1, divisor_override=1)
    return num / den.clamp(min=1.0)


def masked_block_forward(g: GatedBranch, x: Tensor, m: Tensor, interpolate: bool) -> tuple[Tensor, Tensor]:
    """Training forward of a gated block with a (straight-through) mask ``m`` (N, 1, H, W).

    Returns the output and the per-sample MACs the sparse path would run (differentiable through ``m``).
    """
    r = g.branch(x) * m
    if interpolate:
        r = r + (1 - m) * neighbour_fill(r, m)
    h, w = x.shape[-2:]
    frac = m.mean((1, 2, 3))
    dfrac = dilate_mask(m, g.dilation).mean((1, 2, 3)) if g.split > 0 else frac
    macs = g.unit_macs(h, w)
    used = sum(mc * (dfrac if i < g.split else frac) for i, mc in enumerate(macs))
    return g.finish(x + r), used


# --- inference: sparse execution ---------------------------------------------------------------------------------

WIDE_ROWS = 64      # channels from which rows are computed into a preallocated buffer rather than copied (see below)

def _apply(unit: BranchUnit, out: Tensor) -> Tensor:
    return unit.act(out) if unit.act is not None else out


def sparse_block_forward(g: GatedBranch, x: Tensor, mask: Tensor, interpolate: bool = False
                         ) -> tuple[Tensor, Tensor]:
    """Run a gated block only where ``mask`` (bool (N, H, W)) is True; returns (output, per-sample MACs (N,)).

    Batched over the whole batch by flat position indices. A batch whose mask is all on runs the dense block
    (the same positions, faster, and bit-identical to the static network); an all-off batch runs nothing.
    """
    if is_exporting():
        raise SparseExportError(EXPORT_MESSAGE)
    check_mask(x, mask)
    n, _, h, w = x.shape
    macs = g.unit_macs(h, w)
    pad = g.pad
    pos_m = Positions.from_mask(mask, pad)
    active = len(pos_m)                      # its one host sync decides the whole batch's path
    if active == mask.numel():
        return g.block(x), torch.full((n,), sum(macs), dtype=torch.int64)
    if active == 0:
        return g.finish(x.clone()), torch.zeros(n, dtype=torch.int64)   # clone: post_act may be in place
    xp = to_padded_rows(x, pad)          # the block input, zero-padded; also becomes the output buffer
    pos_d = Positions.from_mask(dilate_mask(mask, g.dilation), pad) if g.split > 0 else pos_m
    packed = g.packed()
    # MACs per active position on the dilated mask and on the mask; the ledger lives on the CPU (one copy per call)
    per_d = sum(p.macs_per_position for p in packed[:g.split])
    per_m = sum(p.macs_per_position for p in packed[g.split:])
    if n == 1:                               # the counts are the positions' lengths, known on the host
        cost = torch.tensor([per_d * len(pos_d) + per_m * len(pos_m)])
    else:
        cost = (per_d * pos_d.counts + per_m * pos_m.counts).to("cpu", torch.int64)

    feats = None
    for i, (unit, p) in enumerate(zip(g.units[:g.split], packed[:g.split])):    # on the dilated mask
        if i + 1 < g.split:
            feats = _apply(unit, apply_packed(xp, pos_d, p) if feats is None else p.rows(feats))
            continue
        # Its rows get one zero row after them, which the k x k unit reads wherever the dilated mask is off. Wide
        # outputs (an inverted residual's expansion) are written into a buffer with that row (a copy would cost more
        # than the GEMM); narrow ones are appended to (MKL's GEMM into a given buffer is up to 2x slower for them).
        if p.bias.numel() >= WIDE_ROWS:
            buf = x.new_empty(len(pos_d) + 1, p.bias.numel())
            if feats is None:
                apply_packed(xp, pos_d, p, out=buf[:-1])
            else:
                p.rows(feats, out=buf[:-1])
            feats = _apply(unit, buf)
            feats[-1].zero_()
        else:
            y = _apply(unit, apply_packed(xp, pos_d, p) if feats is None else p.rows(feats))
            feats = torch.cat([y, y.new_zeros(1, y.shape[1])])
    out = None
    for unit, p in zip(g.units[g.split:], packed[g.split:]):          # on the mask
        if out is not None:
            out = _apply(unit, p.rows(out))
        elif feats is None:
            out = _apply(unit, apply_packed(xp, pos_m, p))
        else:
            out = _apply(unit, conv_at(feats, compact_neighbours(pos_m, pos_d, p.kernel), p))

    hp, wp = h + 2 * pad, w + 2 * pad
    if interpolate:
        r = scatter_rows(out, pos_m.flat, x.new_zeros(n * h * w, out.shape[1]))
        r = rows_to_map(r, (n, h, w))
        mf = mask.unsqueeze(1).to(x.dtype)
        r = torch.where(mask.unsqueeze(1), r, neighbour_fill(r, mf))
        return g.finish(x + r), cost
    y = g.finish(out + xp.index_select(0, pos_m.padded))
    if g.post_act is not None:
        xp = g.post_act(xp)              # skipped positions: post_act(x); the zero border stays zero
    scatter_rows(y, pos_m.padded, xp)
    return xp.view(n, hp, wp, -1)[:, pad:pad + h, pad:pad + w].permute(0, 3, 1, 2), cost
