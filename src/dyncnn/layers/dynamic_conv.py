"""Dynamic parameters by weight adjustment: CondConv and dynamic convolution (DyConv).

A layer holds ``n`` expert kernels W_1..W_n and a small routing function that gives every sample its weights
a_1..a_n. Because convolution is linear in the kernel, (sum_n a_n W_n) * x = sum_n a_n (W_n * x): the layer
aggregates one kernel per sample and runs ONE convolution per sample instead of n. The per-sample convolutions
of a batch are one grouped convolution: the batch is folded into the channel axis, input (1, N*C, H, W), kernels
(N*C_out, C_in/g, k, k), ``groups = N*g``.

Cost per sample = routing (Linear layers on the pooled input) + aggregation (``n * |W|`` multiply-adds) + one
convolution. The aggregation is written as a matrix product ``a (N, n) @ W.view(n, -1)`` so that
``FlopCounterMode`` counts it (an elementwise weighted sum would run the same multiply-adds uncounted); the
``macs`` method of each layer gives the same number from the shapes, and the tests hold the two equal.

- :class:`CondConv2d` (Yang et al., NeurIPS 2019): routing = global average pool -> Linear -> sigmoid.
- :class:`DynamicConv2d` (Chen et al., CVPR 2020): routing = pool -> Linear -> ReLU -> Linear -> softmax(z / tau)
  (attention sums to one); a large temperature early in training keeps the attention near uniform so that every
  kernel learns. The paper anneals tau linearly from 30 to 1 over the first epochs (:meth:`set_tau`,
  :func:`dyconv_tau`).
- :class:`AttentionScaledConv2d`: channel attention as a dynamic parameter, (x * W) (.) a = x * (W (.) a): an
  SE-style attention computed from the input scales the kernel's output channels before the convolution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["CondConv2d", "DynamicConv2d", "AttentionScaledConv2d", "grouped_conv_per_sample", "dyconv_tau",
           "conv_output_size", "check_experts"]


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def check_experts(num_experts: object) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    return num_experts


def check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"temperature tau must be a finite number > 0, got {tau!r}")
    return float(tau)


def dyconv_tau(progress: float, start: float = 30.0, end: float = 1.0, anneal_fraction: float = 0.1) -> float:
    """DyConv's temperature schedule: linear from ``start`` to ``end`` over the first ``anneal_fraction`` of
    training (the paper: 30 -> 1 over its first 10 epochs), then ``end``."""
    check_tau(start), check_tau(end)
    if not 0 < anneal_fraction <= 1:
        raise ValueError(f"anneal_fraction must be in (0, 1], got {anneal_fraction!r}")
    p = min(max(float(progress), 0.0) / anneal_fraction, 1.0)
    return start + (end - start) * p


def conv_output_size(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation))


def grouped_conv_per_sample(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                            groups: int, kernel_size: tuple[int, int] | None = None) -> Tensor:
    """Convolve sample i of ``x`` (N, C, H, W) with its own kernel ``weight[i]`` (N, C_out, C/groups, kh, kw)
    (and ``bias[i]``, (N, C_out)) as one grouped convolution over the batch folded into channels.

    A pointwise kernel (1x1, stride 1, no padding, one group) runs as one batched matrix product instead, the
    same multiply-adds (FlopCounterMode counts ``bmm`` like the convolution), at least as fast on CPU here."""
    if _exporting():   # ``kernel_size`` (the layer's, static) is needed there: the traced weight shape is not
        kernel_size = kernel_size or (int(weight.shape[-2]), int(weight.shape[-1]))
        return _per_sample_conv_unfold(x, weight, bias, stride, padding, dilation, groups, kernel_size)
    n, c, h, w = x.shape
    c_out = weight.shape[1]
    if (groups == 1 and weight.shape[-2:] == (1, 1) and tuple(_pair(stride)) == (1, 1)
            and tuple(_pair(padding)) == (0, 0)):
        y = torch.bmm(weight.reshape(n, c_out, c), x.reshape(n, c, h * w))
        if bias is not None:
            y = y + bias.unsqueeze(-1)
        return y.view(n, c_out, h, w)
    y = F.conv2d(x.reshape(1, n * c, h, w), weight.reshape(n * c_out, *weight.shape[2:]),
                 None if bias is None else bias.reshape(n * c_out), stride, padding, dilation, groups * n)
    return y.view(n, c_out, y.shape[-2], y.shape[-1])


def _per_sample_conv_unfold(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                            groups: int, kernel_size: tuple[int, int]) -> Tensor:
    """The same per-sample convolution as im2col + batched MatMul, for ONNX export: an ONNX Conv needs a static
    ``group`` attribute, which ``N * groups`` is not with a dynamic batch axis. Same multiply-adds."""
    _, c, h, w = x.shape
    c_out, (kh, kw) = weight.shape[1], kernel_size
    oh, ow = conv_output_size((int(h), int(w)), (kh, kw), _pair(stride), _pair(padding), _pair(dilation))
    cols = F.unfold(x, (kh, kw), _pair(dilation), _pair(padding), _pair(stride))     # (N, C*kh*kw, L)
    cols = cols.reshape(-1, groups, c // groups * kh * kw, oh * ow)
    y = weight.reshape(-1, groups, c_out // groups, c // groups * kh * kw) @ cols      # (N, g, C_out/g, L)
    y = y.reshape(-1, c_out, oh, ow)
    return y if bias is None else y + bias.reshape(-1, c_out, 1, 1)


class _ExpertConv2d(nn.Module):
    """Shared machinery: ``num_experts`` kernels (E, C_out, C_in/g, kh, kw), per-sample aggregation, one grouped
    convolution over the batch, and the MAC ledger. Subclasses define ``router`` and ``_normalize``."""

    copy_noise: float = 0.01   # relative size of the zero-sum expert perturbation of ``copy_from``
    chunk_from_bytes: int = 32 << 20   # per-sample kernels of a batch above this size are made a chunk at a time
    chunk_bytes: int = 1 << 20         # ... of about this size (see ``forward_with``)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 1,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | None = None,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, num_experts: int = 4):
        super().__init__()
        self.num_experts = check_experts(num_experts)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"{type(self).__name__}: in_channels ({in_channels}) and out_channels "
                             f"({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if padding is None:   # "same" for odd kernels, like ConvNormAct
            padding = tuple((k - 1) // 2 * d for k, d in zip(self.kernel_size, self.dilation))
        self.padding = _pair(padding)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_channels)) if bias else None
        self.reset_experts()

    def reset_experts(self) -> None:
        """Every expert initialised independently as ``nn.Conv2d`` initialises its kernel."""
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0, 0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    # --- routing -------------------------------------------------------------------------------------------
    def routing_weights(self, x: Tensor) -> Tensor:
        """(N, E) per-sample expert weights from the globally pooled input."""
        return self._normalize(self.router(x.mean((2, 3))))

    def _normalize(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def routing_macs(self) -> int:
        return sum(m.in_features * m.out_features for m in self.router.modules() if isinstance(m, nn.Linear))

    # --- execution -----------------------------------------------------------------------------------------
    def aggregate(self, a: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-sample kernels (N, C_out, C_in/g, kh, kw) and biases (N, C_out) as matmuls (FlopCounterMode counts
        them)."""
        w = (a @ self.weight.view(self.num_experts, -1)).view(a.shape[0], *self.weight.shape[1:])
        b = a @ self.bias if self.bias is not None else None
        return w, b

    def forward_with(self, x: Tensor, a: Tensor) -> Tensor:
        """The layer's output for given routing weights ``a`` (N, E).

        When the batch's per-sample kernels would not stay in cache (more than ``chunk_from_bytes`` together: the
        960->320 projection of MobileNetV2 at batch 32 takes 39 MB), samples are aggregated and convolved a
        few at a time (about ``chunk_bytes`` of kernels each): the same multiply-adds, but each kernel is read back
        from cache instead of memory: 2x faster there (eager, 1 thread); at 20 MB (160->960) it made no difference."""
        per_sample = self.weight[0].numel() * self.weight.element_size()
        n = x.shape[0]
        if _exporting() or n * per_sample <= self.chunk_from_bytes:
            return self._conv_per_sample(x, a)
        step = max(1, self.chunk_bytes // per_sample)
        return torch.cat([self._conv_per_sample(x[i:i + step], a[i:i + step]) for i in range(0, n, step)])

    def _conv_per_sample(self, x: Tensor, a: Tensor) -> Tensor:
        w, b = self.aggregate(a)
        return grouped_conv_per_sample(x, w, b, self.stride, self.padding, self.dilation, self.groups,
                                       self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if not _exporting() and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"{type(self).__name__}: expected input (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return self.forward_with(x, self.routing_weights(x))

    def expert_outputs(self, x: Tensor) -> Tensor:
        """(E, N, C_out, H', W'): every expert's static convolution (for tests and analysis, n convolutions)."""
        return torch.stack([F.conv2d(x, self.weight[e], None if self.bias is None else self.bias[e], self.stride,
                                     self.padding, self.dilation, self.groups) for e in range(self.num_experts)])

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return conv_output_size(size, self.kernel_size, self.stride, self.padding, self.dilation)

    def macs(self, input_size: tuple[int, int]) -> int:
        """Per-sample MACs for an ``input_size`` (H, W) input: routing + aggregation + one convolution."""
        oh, ow = self.output_size(tuple(input_size))
        per_expert = self.weight[0].numel() + (self.out_channels if self.bias is not None else 0)
        return self.routing_macs() + self.num_experts * per_expert + self.weight[0].numel() * oh * ow

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_experts: int = 4, copy_weights: bool = True, **kwargs):
        """A layer with ``conv``'s geometry. ``copy_weights``: every expert starts as ``conv``'s kernel, scaled so
        that the fresh layer computes exactly ``conv`` (see ``_copy_scale``); otherwise fresh independent experts."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{cls.__name__}.from_conv: needs numeric zero padding, got padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, num_experts, **kwargs)
        layer.to(conv.weight.device, conv.weight.dtype)
        if copy_weights:
            layer.copy_from(conv)
        return layer

    @torch.no_grad()
    def copy_from(self, conv: nn.Conv2d) -> None:
        """Experts = ``conv``'s kernel (scaled), routing output layer zeroed: the layer then equals ``conv``."""
        last = [m for m in self.router.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        scale = self._copy_scale()
        # Identical experts would stay identical under training (equal gradients); a perturbation that sums to
        # zero over the experts keeps the layer equal to ``conv`` (every a_n is equal at zero routing) and
        # breaks the symmetry.
        noise = torch.randn_like(self.weight) * (self.copy_noise * float(conv.weight.std()))
        noise -= noise.mean(0, keepdim=True)
        self.weight.copy_((conv.weight.unsqueeze(0) + noise) * scale)
        if self.bias is not None:
            self.bias.copy_(conv.bias.unsqueeze(0).expand_as(self.bias) * scale)

    def _copy_scale(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
                f"num_experts={self.num_experts}")


class CondConv2d(_ExpertConv2d):
    """Conditionally parameterised convolution: kernel = sum_n sigmoid(r(x))_n W_n, r = Linear(avgpool(x)).

    The routing weights are independent sigmoids (they need not sum to one), as in the paper. ``from_conv`` with
    ``copy_weights`` starts from a trained convolution: routing zeroed (every a_n = 0.5), experts = 2/n W.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 1,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | None = None,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, num_experts: int = 4):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         num_experts)
        self.router = nn.Linear(in_channels, self.num_experts)

    def _normalize(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def _copy_scale(self) -> float:
        return 2.0 / self.num_experts


class DynamicConv2d(_ExpertConv2d):
    """Dynamic convolution: kernel = sum_n softmax(r(x) / tau)_n W_n, r = Linear -> ReLU -> Linear on avgpool(x).

    The hidden width of the attention is ``in_channels * reduction`` (at least ``min_hidden``); the paper uses a
    reduction of 4 (ratio 0.25). ``set_tau`` anneals the temperature (the paper: 30 -> 1 early in training).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 1,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | None = None,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, num_experts: int = 4,
                 tau: float = 30.0, reduction: float = 0.25, min_hidden: int = 4):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         num_experts)
        self.tau = check_tau(tau)
        hidden = max(int(in_channels * reduction), min_hidden)
        self.router = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, self.num_experts))

    def set_tau(self, tau: float) -> None:
        self.tau = check_tau(tau)

    def _normalize(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits / self.tau, dim=1)

    def _copy_scale(self) -> float:
        return 1.0   # the attention sums to one

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau:g}"


class AttentionScaledConv2d(nn.Module):
    """Channel attention as a dynamic parameter: y = x * (W (.) a(x)) = (x * W) (.) a(x).

    ``a(x)`` (N, C_out) is a squeeze-excitation of the *input* (pool -> Linear -> ReLU -> Linear -> gate), so it is
    known before the convolution and can scale the kernel's output channels instead of the output map: the
    per-sample kernels run as one grouped convolution. MACs = attention Linears + the convolution (the scaling
    of the kernel is elementwise, like the scaling of the output it replaces).
    """

    def __init__(self, conv: nn.Conv2d, reduction: float = 0.25, min_hidden: int = 8,
                 gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("AttentionScaledConv2d needs an nn.Conv2d with numeric zero padding")
        self.conv = conv
        hidden = max(int(conv.in_channels * reduction), min_hidden)
        self.attention = nn.Sequential(nn.Linear(conv.in_channels, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, conv.out_channels), gate())

    def channel_weights(self, x: Tensor) -> Tensor:
        return self.attention(x.mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        a = self.channel_weights(x)
        c = self.conv
        w = c.weight.unsqueeze(0) * a.view(*a.shape, 1, 1, 1)
        b = None if c.bias is None else c.bias.unsqueeze(0) * a
        return grouped_conv_per_sample(x, w, b, c.stride, c.padding, c.dilation, c.groups, c.kernel_size)

    def macs(self, input_size: tuple[int, int]) -> int:
        c = self.conv
        oh, ow = conv_output_size(tuple(input_size), c.kernel_size, c.stride, c.padding, c.dilation)
        lin = sum(m.in_features * m.out_features for m in self.attention if isinstance(m, nn.Linear))
        return lin + c.weight.numel() * oh * ow
