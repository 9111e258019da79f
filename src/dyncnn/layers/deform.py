"""Kernel shape adaptation: deformable convolution v1 and v2 on ``torchvision.ops.deform_conv2d``.

A deformable convolution samples its k x k taps at learned, per-position offsets (v1, Dai et al. 2017); v2 (Zhu
et al. 2019, ``modulated=True``) also weights every tap by a learned modulation scalar. Offsets (and masks) come
from a plain convolution of the input with the same kernel, stride, padding and dilation (the papers' design).
That branch is initialised to zero, so a fresh layer samples the regular grid and equals ``nn.Conv2d`` with the
same weight. The modulation is ``mask_scale * sigmoid(m)``: the official DCNv2 code uses ``sigmoid(m)`` (0.5 at
initialisation, range [0, 1]); our default ``mask_scale = 2`` gives 1 at initialisation (range [0, 2]), so that
the fresh v2 layer is also exactly the plain convolution (pass ``mask_scale=1`` for the official form).

Two process-wide registrations make the operator a first-class citizen of dyncnn (both are registries that
torch offers for custom operators, like torchvision's own ``_register_onnx_ops``):

- a FlopCounterMode formula for ``torchvision::deform_conv2d`` (the MACs of the convolution it performs,
  ``N * C_out * C_in/g * k^2 * H' * W'``; the bilinear sampling and the modulation are elementwise and not
  counted, the same convention as for every other layer), without which the deformable convolutions would be
  missing from every MAC count;
- an ONNX symbolic to the standard ``DeformConv`` operator, which exists from opset 19 (ONNX Runtime runs it).
  At an older opset export stops with a message saying to use 19; ``export_onnx`` picks 19 by itself for models
  that contain this layer (``min_onnx_opset``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.utils.flop_counter import register_flop_formula
from torchvision.ops import deform_conv2d

from .conv import take_conv_weights

__all__ = ["DeformConv2d", "DEFORM_ONNX_OPSET"]

DEFORM_ONNX_OPSET = 19   # first opset with the DeformConv operator


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


# --- FlopCounterMode --------------------------------------------------------------------------------------------

@register_flop_formula(torch.ops.torchvision.deform_conv2d)
def _deform_conv2d_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """2 * MACs of the convolution: every output value sums C_in/g * kh * kw products."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


# --- ONNX (TorchScript exporter) -------------------------------------------------------------------------------

def _register_onnx_symbolic() -> None:
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")
    def deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                               dil_h, dil_w, groups, offset_groups, use_mask):
        opset = getattr(g, "opset", None)
        if opset is not None and opset < DEFORM_ONNX_OPSET:
            raise ValueError(f"DeformConv2d (torchvision deform_conv2d) exports to the ONNX DeformConv operator, "
                             f"which needs opset >= {DEFORM_ONNX_OPSET}, got opset {opset}; export with "
                             f"dyncnn.export.export_onnx(model, x, path, opset={DEFORM_ONNX_OPSET})")
        kh, kw = symbolic_helper._get_tensor_sizes(weight)[-2:]
        inputs = [input, weight, offset, bias] + ([mask] if use_mask else [])
        return g.op("DeformConv", *inputs, dilations_i=[dil_h, dil_w], group_i=groups, kernel_shape_i=[kh, kw],
                    offset_group_i=offset_groups, pads_i=[pad_h, pad_w, pad_h, pad_w], strides_i=[stride_h, stride_w])

    # Registered from opset 9 on so that older opsets reach the symbolic and its clear message.
    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", deform_conv2d_symbolic, 9)


_register_onnx_symbolic()


# --- the layer -------------------------------------------------------------------------------------------------

def _positive_pair(value, name: str, minimum: int) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"DeformConv2d: {name} must be an int or a pair of ints >= {minimum} "
                         f"(torchvision deform_conv2d), got {value!r}")
    return pair


class DeformConv2d(nn.Module):
    """Deformable k x k convolution, v1 (``modulated=False``) or v2 (``modulated=True``).

    ``offset_groups``: input channel groups that share one offset field (torchvision's ``offset_groups``;
    ``in_channels`` must be divisible by it). ``groups``: ordinary grouped convolution. torchvision supports any
    kernel size, stride and dilation >= 1, padding >= 0, and groups / offset groups that divide the channels.
    ``offset_scale`` multiplies the offset (and mask) branch's output. Under Adam(W), whose steps do not shrink
    with the gradient, it acts as a learning-rate multiplier of that branch: at 1.0 and lr 5e-3 the offsets of a
    ScaledMNIST ResNet-18 grew within a few dozen steps until it stopped learning; 0.1 trained (the DCN papers
    train with SGD, where the offset gradients are small by themselves).
    """

    min_onnx_opset = DEFORM_ONNX_OPSET   # ONNX DeformConv exists from opset 19; export_onnx picks it by default

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | None = None,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, offset_groups: int = 1, bias: bool = False,
                 modulated: bool = False, mask_scale: float = 2.0, offset_scale: float = 1.0):
        super().__init__()
        if isinstance(padding, str):
            raise ValueError(f"DeformConv2d: padding must be numeric (torchvision deform_conv2d takes ints), "
                             f"got {padding!r}")
        self.kernel_size = _positive_pair(kernel_size, "kernel_size", 1)
        self.stride = _positive_pair(stride, "stride", 1)
        self.dilation = _positive_pair(dilation, "dilation", 1)
        if padding is None:
            padding = tuple((k - 1) // 2 * d for k, d in zip(self.kernel_size, self.dilation))
        self.padding = _positive_pair(padding, "padding", 0)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                        ("offset_groups", offset_groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DeformConv2d: {name} must be an int >= 1, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv2d: torchvision deform_conv2d needs in_channels ({in_channels}) and "
                             f"out_channels ({out_channels}) divisible by groups ({groups})")
        if in_channels % offset_groups:
            raise ValueError(f"DeformConv2d: torchvision deform_conv2d needs in_channels ({in_channels}) "
                             f"divisible by offset_groups ({offset_groups})")
        if not mask_scale > 0:
            raise ValueError(f"DeformConv2d: mask_scale must be > 0, got {mask_scale!r}")
        if not offset_scale > 0:
            raise ValueError(f"DeformConv2d: offset_scale must be > 0, got {offset_scale!r}")
        self.offset_scale = float(offset_scale)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.offset_groups, self.modulated, self.mask_scale = offset_groups, bool(modulated), float(mask_scale)
        taps = offset_groups * self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # offsets (dy, dx per tap and offset group) [+ modulation per tap]: a conv with the main conv's geometry
        self.conv_offset = nn.Conv2d(in_channels, (3 if modulated else 2) * taps, self.kernel_size, self.stride,
                                     self.padding, self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self._taps = taps

    def offsets_and_mask(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.conv_offset(x)
        if self.offset_scale != 1.0:
            out = out * self.offset_scale
        if not self.modulated:
            return out, None
        offset, mask = out.split([2 * self._taps, self._taps], dim=1)
        return offset, self.mask_scale * torch.sigmoid(mask)

    def forward(self, x: Tensor) -> Tensor:
        if not _exporting():
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f"DeformConv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
            oh, ow = ((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
                      zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation))
            if oh < 1 or ow < 1:
                raise ValueError(f"DeformConv2d: input {tuple(x.shape[-2:])} is too small for kernel "
                                 f"{self.kernel_size}, padding {self.padding}, dilation {self.dilation}")
        offset, mask = self.offsets_and_mask(x)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def macs(self, input_size: tuple[int, int]) -> int:
        """Per-sample MACs for an (H, W) input: the offset (and mask) convolution + the deformable convolution."""
        oh, ow = ((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
                  zip(input_size, self.kernel_size, self.stride, self.padding, self.dilation))
        return (self.conv_offset.weight.numel() + self.weight.numel()) * oh * ow

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, modulated: bool = False, offset_groups: int = 1,
                  mask_scale: float = 2.0, offset_scale: float = 1.0) -> "DeformConv2d":
        """A deformable layer with ``conv``'s geometry and weights: equal to ``conv`` until its offsets train."""
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"DeformConv2d.from_conv: needs numeric zero padding, got padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, offset_groups, conv.bias is not None, modulated, mask_scale,
                    offset_scale)
        return take_conv_weights(layer, conv)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"offset_groups={self.offset_groups}, modulated={self.modulated}")
