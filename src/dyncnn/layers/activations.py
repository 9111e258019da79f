"""Hard activations of MobileNetV3 (piecewise-linear stand-ins for sigmoid and swish) and an activation factory.

PyTorch already has both as ``nn.Hardsigmoid`` (relu6(x + 3) / 6) and ``nn.Hardswish`` (x * relu6(x + 3) / 6);
they export to ONNX's HardSigmoid / HardSwish, so we reuse them under the names the papers use.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

HardSigmoid = nn.Hardsigmoid
HardSwish = nn.Hardswish

_ACTS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hard_swish": nn.Hardswish,
    "hard_sigmoid": nn.Hardsigmoid,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def get_act_layer(name: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module] | None:
    """Resolve an activation given by name (``"relu"``, ``"hard_swish"``, ...) or pass a layer class through."""
    if name is None or callable(name):
        return name
    try:
        return _ACTS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTS)}") from None
