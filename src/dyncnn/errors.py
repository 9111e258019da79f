"""Input checks shared by every public entry point.

Each check raises an error whose message says what was expected and what came, so that a user who passes a
(3, 224, 224) image instead of a batch, a uint8 tensor or a batch with NaN sees the fix in the message.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch is imported by the checks themselves: `dyncnn --help` must not pay for it
    import torch
    from torch import Tensor


class DyncnnError(ValueError):
    """Base class of dyncnn's own input errors (a ValueError, so generic handlers still catch it)."""


class CheckpointError(DyncnnError):
    """A checkpoint that is missing, truncated, or belongs to another model or configuration."""


class LockedError(DyncnnError):
    """An output folder that another running dyncnn process writes into (see ``dyncnn.files.output_lock``)."""


class InputTypeError(DyncnnError, TypeError):
    """An input of the wrong Python type (a list where a tensor is expected): a DyncnnError, and a TypeError."""


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite. The sum is the first look (one pass, no mask tensor, one op where
    ``isfinite(t).all()`` dispatches several): a finite sum means no NaN/Inf entry; only a non-finite sum (a NaN/Inf
    entry, or finite entries whose sum overflows) is examined entry by entry."""
    import math

    import torch
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _fx_tracing() -> bool:
    import torch.fx._symbolic_trace as st
    check = getattr(st, "is_fx_symbolic_tracing", None) or getattr(st, "is_fx_tracing_symbolic_tracing", None)
    return bool(check()) if check else bool(st.is_fx_tracing())


def is_exporting() -> bool:
    """True while tracing or exporting (ONNX, torch.export, torch.compile), where Python checks must not run."""
    import torch
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling() or _fx_tracing())


def param_dtype(module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (what its inputs must be), None if it has none."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_image_batch(x: object, channels: int | None = None, *, name: str = "input",
                      check_finite: bool = True, dtype: torch.dtype | None = None) -> Tensor:
    """Validate an image batch of shape (N, C, H, W), floating point (of ``dtype``, the model's, when given),
    finite, non-empty.

    Returns ``x`` unchanged so that it can be used inline.
    """
    import torch
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{name}: expected a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (add a batch axis with x.unsqueeze(0))" if x.dim() == 3 else ""
        raise DyncnnError(f"{name}: expected a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise DyncnnError(f"{name}: expected a non-empty batch (N >= 1), got shape {tuple(x.shape)}")
    if min(x.shape[2:]) < 1:
        raise DyncnnError(f"{name}: expected an image of at least 1x1 pixels, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise DyncnnError(f"{name}: expected {channels} input channels, got {x.shape[1]} "
                          f"(shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise DyncnnError(f"{name}: expected a floating-point tensor (e.g. float32 in [0, 1]), got {x.dtype}; "
                          f"convert with x.float() / 255")
    if dtype is not None and x.dtype != dtype:
        raise DyncnnError(f"{name}: expected {str(dtype).replace('torch.', '')} like the model's weights, got "
                          f"{str(x.dtype).replace('torch.', '')}; convert with x.to({dtype}) (or the model with "
                          f"model.to(dtype))")
    if check_finite and not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise DyncnnError(f"{name}: expected finite values, got {bad} NaN/Inf entries")
    return x


INPUT_KINDS = ("image", "clip", "sequence")


def check_batch(x: object, kind: str = "image", *, name: str = "input", check_finite: bool = True) -> Tensor:
    """Validate a batch of ``kind``: images (N, C, H, W), clips (N, T, C, H, W) or sequences (N, T, F);
    floating point, finite, non-empty. Returns ``x``."""
    if kind == "image":
        return check_image_batch(x, name=name, check_finite=check_finite)
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; expected one of {INPUT_KINDS}")
    import torch
    want = "(N, T, C, H, W)" if kind == "clip" else "(N, T, F)"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {want}, got {type(x).__name__}")
    if x.dim() != len(want.split(",")):
        raise DyncnnError(f"{name}: expected a {len(want.split(','))}-D batch of {kind}s {want}, got shape "
                          f"{tuple(x.shape)}")
    if kind == "clip":
        check_image_batch(x.flatten(0, 1), name=f"{name} (frames of the clips)", check_finite=check_finite)
        return x
    if 0 in x.shape:
        raise DyncnnError(f"{name}: expected a non-empty batch of sequences {want}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DyncnnError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if check_finite and not all_finite(x):
        raise DyncnnError(f"{name}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN/Inf entries")
    return x
