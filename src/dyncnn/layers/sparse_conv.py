"""Sparse execution of convolutions on a subset of spatial positions (the pixel-level half of spatial adaptivity).

A dense convolution computes every output position. DynConv-style networks compute only the positions a mask
selects, so the work must shrink with the mask, not be multiplied by it afterwards. The primitives here do that
for the whole batch at once, with flat indices into the (N, H, W) grid and no per-sample loop:

- :class:`Positions` turns a boolean mask (N, H, W) into flat row indices of the active positions;
- features live as *rows* (one row of C channels per position, channels-last): :func:`to_padded_rows` lays a
  map out zero-padded, so that the k x k neighbourhood of any position is k*k rows at fixed offsets;
- :func:`sparse_conv` gathers those neighbourhoods and does one matrix product (dense kernels) or k*k
  gather-multiply-adds (depthwise kernels); a 1x1 kernel is a plain matrix product on the gathered pixels;
  :func:`pack_conv` prepares a kernel once (BN folded, laid out for the rows) for repeated calls;
- BatchNorm (eval) is folded into the kernel as scale and shift (:func:`fold_bn`), activations run on the rows;
- :func:`dilate_mask` grows a mask by a kernel footprint, so that a first 3x3 convolution computes every
  position that a second one reads; :func:`compact_neighbours` lets the second one read the first one's compact
  rows directly (:func:`conv_at` runs a packed kernel on any such index), without scattering them into a map.

Every product goes through ``addmm`` or the ``sparse_depthwise`` op, which ``FlopCounterMode`` counts, so the
MACs that ran are measurable: a kernel costs ``weight.numel()`` MACs per computed position (:func:`conv_macs_per_position`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter


@torch.library.custom_op("dyncnn::sparse_depthwise", mutates_args=())
def sparse_depthwise(rows: Tensor, neighbours: Tensor, weight: Tensor) -> Tensor:
    """Depthwise kernel at gathered positions: ``sum_k rows[neighbours[:, k]] * weight[k]`` -> (P, C).

    ``rows`` (R, C) padded rows, ``neighbours`` (P, K) row indices, ``weight`` (K, C). A custom op so that
    ``FlopCounterMode`` counts it (P*K*C MACs, as the dense depthwise convolution it replaces); as K
    gather + multiply-add steps it needs no (P, K, C) temporary and is several times faster on CPU than a
    batched matrix product, which FlopCounterMode would count by itself. Inference only (no autograd).
    """
    out = rows.index_select(0, neighbours[:, 0]) * weight[0]
    for k in range(1, neighbours.shape[1]):
        out.addcmul_(rows.index_select(0, neighbours[:, k]), weight[k])
    return out


@sparse_depthwise.register_fake
def _(rows: Tensor, neighbours: Tensor, weight: Tensor) -> Tensor:
    return rows.new_empty(neighbours.shape[0], rows.shape[1])


if torch.ops.dyncnn.sparse_depthwise not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(torch.ops.dyncnn.sparse_depthwise)
    def _sparse_depthwise_flops(rows_shape, neighbours_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        p, k = neighbours_shape
        return 2 * p * k * rows_shape[1]


def check_mask(x: Tensor, mask: Tensor) -> Tensor:
    """A mask of active positions must be a bool tensor (N, H, W) matching the feature map (N, C, H, W)."""
    if x.dim() != 4:
        raise ValueError(f"expected a feature map (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n, h, w):
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__)
        raise ValueError(f"the mask of active positions must be a torch.bool tensor of shape (N, H, W) = "
                         f"{(n, h, w)} for a feature map of shape {tuple(x.shape)}, got {got}")
    return mask


def dilate_mask(mask: Tensor, kernel_size: int = 3) -> Tensor:
    """Positions within the ``kernel_size`` footprint of an active one (bool (N, H, W) -> bool (N, H, W)).

    A float mask (N, 1, H, W) is dilated the same way and keeps its straight-through gradient (training).
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if kernel_size == 1:
        return mask
    if mask.dtype == torch.bool:
        m = mask.unsqueeze(1).to(torch.float32)
        return F.max_pool2d(m, kernel_size, stride=1, padding=kernel_size // 2).squeeze(1) > 0
    return F.max_pool2d(mask, kernel_size, stride=1, padding=kernel_size // 2)


class Positions:
    """The active positions of a batch: flat indices into the (N, H, W) grid and into its padded copy.

    ``padded``: (P,) index of each active position in the zero-padded grid (N, H+2p, W+2p) (row of
    :func:`to_padded_rows`); ``flat``: (P,) index ``n*H*W + r*W + c`` of the same position (row of :func:`to_rows`),
    derived from ``padded`` on first use (the blocks only need ``padded``); ``counts``: (N,) active positions per
    sample. Built with one ``nonzero`` on the padded mask: a handful of ops, which matters at batch 1.
    """

    def __init__(self, padded: Tensor, mask: Tensor, pad: int):
        self.padded, self.shape, self.pad, self._mask = padded, tuple(mask.shape), pad, mask
        self._flat: Tensor | None = None
        self._counts: Tensor | None = None

    @classmethod
    def from_mask(cls, mask: Tensor, pad: int = 1) -> "Positions":
        padded = F.pad(mask, (pad, pad, pad, pad)) if pad else mask
        return cls(padded.reshape(-1).nonzero().squeeze(1), mask, pad)

    @property
    def counts(self) -> Tensor:
        """(N,) active positions per sample (computed on first use; at batch 1 it is the number of positions)."""
        if self._counts is None:
            n, h, w = self.shape
            if n == 1:
                self._counts = torch.tensor([len(self)], device=self.padded.device)
            else:
                self._counts = self._mask.reshape(n, h * w).sum(1)
        return self._counts

    @property
    def flat(self) -> Tensor:
        if self._flat is None:
            _, h, w = self.shape
            hp, wp = h + 2 * self.pad, w + 2 * self.pad
            b, rc = self.padded.div(hp * wp, rounding_mode="floor"), self.padded.remainder(hp * wp)
            r, c = rc.div(wp, rounding_mode="floor") - self.pad, rc.remainder(wp) - self.pad
            self._flat = (b * h + r) * w + c
        return self._flat

    def __len__(self) -> int:
        return self.padded.numel()

    def neighbours(self, kernel_size: int) -> Tensor:
        """(P, k*k) padded-row indices of the k x k neighbourhood of every position (row-major, as the kernel)."""
        return self.padded[:, None] + self.offsets(kernel_size)[None, :]

    def offsets(self, kernel_size: int) -> Tensor:
        """(k*k,) row offsets of the k x k neighbourhood in the padded grid (row-major, as the kernel)."""
        k, pad = kernel_size, self.pad
        if k // 2 > pad:
            raise ValueError(f"a {k}x{k} neighbourhood needs padding >= {k // 2}, the rows have {pad}")
        return _offsets(k, self.shape[2] + 2 * pad, self.padded.device)


@functools.lru_cache(maxsize=64)
def _offsets(k: int, wp: int, device: torch.device) -> Tensor:
    """Row offsets of a k x k neighbourhood in a padded grid of width ``wp`` (built once per shape: never written)."""
    d = range(-(k // 2), k // 2 + 1)
    return torch.tensor([dy * wp + dx for dy in d for dx in d], device=device)


def to_rows(x: Tensor) -> Tensor:
    """(N, C, H, W) -> a new contiguous (N*H*W, C) tensor, one row per position."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).view(n * h * w, c)


def to_padded_rows(x: Tensor, pad: int = 1) -> Tensor:
    """(N, C, H, W) -> (N*(H+2p)*(W+2p), C) rows of the zero-padded map (the padding of a 'same' convolution)."""
    n, c, h, w = x.shape
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        # NCHW: pad in place of the layout (contiguous image rows), then one transpose copy. 3-6x faster on CPU
        # than writing the permuted map into a zeroed channels-last buffer (a strided scatter per channel).
        return F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1).contiguous().view(-1, c)
    out = x.new_zeros(n, h + 2 * pad, w + 2 * pad, c)
    out[:, pad:pad + h, pad:pad + w] = x.permute(0, 2, 3, 1)
    return out.view(-1, c)


def rows_to_map(rows: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """(N*H*W, C) rows -> an (N, C, H, W) view (channels-last memory; no copy)."""
    n, h, w = shape
    return rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def fold_bn(conv: nn.Conv2d, bn: nn.Module | None) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm folded into the convolution: (scaled weight, shift)."""
    w = conv.weight
    b = conv.bias if conv.bias is not None else w.new_zeros(w.shape[0])
    if bn is None or isinstance(bn, nn.Identity):
        return w, b
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"only BatchNorm2d can be folded into a sparse convolution, got {type(bn).__name__}")
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return w * scale[:, None, None, None], bn.bias + (b - bn.running_mean) * scale


def conv_macs_per_position(weight: Tensor) -> int:
    """MACs of one output position of a convolution with this weight (Cout * Cin/groups * k * k)."""
    return int(weight.numel())


@dataclass(frozen=True)
class PackedConv:
    """A convolution (+ folded eval BatchNorm) laid out for row-wise execution: ``mat`` is (C_out, k*k*C_in) for a
    dense kernel (ky, kx, c_in order, as the gathered neighbourhoods) or (k*k, C) for a depthwise one.

    The dense matrix is kept (C_out, K) and used transposed: MKL's GEMM with a narrow output is 2-3x faster in
    that layout than with a contiguous (K, C_out) operand.
    """
    mat: Tensor
    bias: Tensor
    kernel: int
    depthwise: bool
    macs_per_position: int

    def rows(self, pix: Tensor, out: Tensor | None = None) -> Tensor:
        """A 1x1 convolution on gathered pixels (P, C_in) -> (P, C_out): one matrix product (into ``out``)."""
        return torch.addmm(self.bias, pix, self.mat.t(), out=out)


def pack_conv(weight: Tensor, bias: Tensor | None = None, groups: int = 1) -> PackedConv:
    cout, cin_g, kh, kw = weight.shape
    cin = cin_g * groups
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"sparse convolution needs a square odd kernel, got {kh}x{kw}")
    if groups not in (1, cin) or (groups > 1 and cout != cin):
        raise ValueError(f"sparse convolution supports dense (groups=1) and depthwise (groups=channels) kernels; "
                         f"got weight {tuple(weight.shape)} with groups={groups}")
    b = bias if bias is not None else weight.new_zeros(cout)
    depthwise = groups > 1
    if depthwise:
        mat = weight.reshape(cout, kh * kw).t().contiguous()
    else:
        mat = weight.permute(0, 2, 3, 1).reshape(cout, kh * kw * cin).contiguous()
    return PackedConv(mat, b.detach().contiguous(), kh, depthwise, int(weight.numel()))


def apply_packed(rows: Tensor, pos: Positions, p: PackedConv, out: Tensor | None = None) -> Tensor:
    """Run a packed convolution at ``pos``: (P, C_out). ``rows``: padded rows for k > 1 (or for 1x1, padded or
    unpadded rows, recognised by their count); for 1x1 the gathered pixels are one matrix product."""
    padded_ok = rows.shape[0] == _rows_in(pos, pos.pad)
    if not padded_ok and (p.kernel > 1 or rows.shape[0] != _rows_in(pos, 0)):
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not match the positions' grid {pos.shape} "
                         f"(padding {pos.pad}); use to_rows / to_padded_rows")
    if len(pos) == 0:
        return rows.new_zeros(0, p.bias.numel()) if out is None else out
    if p.kernel == 1:
        return conv_at(rows, pos.padded if padded_ok else pos.flat, p, out)
    return conv_at(rows, pos.neighbours(p.kernel), p, out)


def conv_at(rows: Tensor, index: Tensor, p: PackedConv, out: Tensor | None = None) -> Tensor:
    """A packed convolution on gathered rows: ``index`` (P,) for a 1x1 kernel, (P, k*k) neighbourhoods (row-major,
    as the kernel) for a k x k one -> (P, C_out), written into ``out`` (P, C_out) when given."""
    if p.kernel == 1:
        return p.rows(rows.index_select(0, index), out)
    if p.depthwise:
        y = sparse_depthwise(rows, index, p.mat) + p.bias
        return y if out is None else out.copy_(y)
    return p.rows(rows.index_select(0, index.reshape(-1)).view(index.shape[0], -1), out)


def compact_neighbours(pos: Positions, source: Positions, kernel_size: int) -> Tensor:
    """(P, k*k) neighbourhoods of ``pos`` as indices into *compact* rows computed at ``source`` (row i = position
    ``source.padded[i]``) followed by one zero row (index ``len(source)``), which every other neighbour reads.

    The same values as scattering the compact rows into a zeroed padded map and gathering there, without the
    map: an int64 lookup over the grid replaces a zero fill and a scatter of C floats per position.
    """
    lut = torch.full((_rows_in(source, source.pad),), len(source), dtype=torch.int64, device=pos.padded.device)
    lut.index_copy_(0, source.padded, torch.arange(len(source), device=lut.device))
    return lut[pos.neighbours(kernel_size)]


def sparse_conv(rows: Tensor, pos: Positions, weight: Tensor, bias: Tensor | None = None,
                groups: int = 1) -> Tensor:
    """Convolution (stride 1, 'same' zero padding) evaluated at ``pos`` only: (P, C_out).

    ``rows`` are the input's rows: unpadded (:func:`to_rows`) for a 1x1 kernel, zero-padded by ``pos.pad``
    (:func:`to_padded_rows`) for a k x k kernel. ``groups`` is 1 (dense) or the channel count (depthwise).
    """
    if weight.shape[1] * groups != rows.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} with groups={groups} does not take {rows.shape[1]} "
                         f"input channels")
    return apply_packed(rows, pos, pack_conv(weight, bias, groups))


def _rows_in(pos: Positions, pad: int) -> int:
    n, h, w = pos.shape
    return n * (h + 2 * pad) * (w + 2 * pad)


def scatter_rows(values: Tensor, index: Tensor, into: Tensor) -> Tensor:
    """Write ``values`` (P, C) into the rows ``index`` of ``into`` (in place) and return it."""
    return into.index_copy_(0, index, values.to(into.dtype))


def sparse_conv2d(x: Tensor, mask: Tensor, conv: nn.Conv2d, bn: nn.Module | None = None,
                  act: nn.Module | None = None) -> Tensor:
    """conv -> [bn (eval, folded)] -> [act] of ``x`` computed only where ``mask`` is True; zeros elsewhere.

    A convenience for one layer (the blocks in ``dynamic/spatial.py`` chain the row primitives directly).
    Supports stride 1, 'same' padding, dense or depthwise kernels.
    """
    check_mask(x, mask)
    k = conv.kernel_size[0]
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] \
            or conv.padding not in ((k // 2, k // 2), "same"):
        raise ValueError(f"sparse_conv2d supports stride-1, undilated 'same' convolutions, got {conv}")
    pad = k // 2
    pos = Positions.from_mask(mask, pad=pad)
    rows = to_padded_rows(x, pad) if pad else to_rows(x)
    w, b = fold_bn(conv, bn)
    out = sparse_conv(rows, pos, w, b, groups=conv.groups)
    if act is not None:
        out = act(out)
    n, _, h, wd = x.shape
    full = x.new_zeros(n * h * wd, w.shape[0])
    return rows_to_map(scatter_rows(out, pos.flat, full), (n, h, wd))
