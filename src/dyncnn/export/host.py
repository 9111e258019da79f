"""The host-side exit rule and input checks that every bundle driver shares (:mod:`.runtime`'s multi-exit and
static drivers, :mod:`.glance`'s, :mod:`.cond`'s single graph): the numpy twin of eager's confidence, the batch-1
exit test, the NaN/Inf refusal and the input batch check. Below the drivers in the layering, so that none of them
imports another for these.
"""
from __future__ import annotations

import math
from typing import Any, NoReturn, Sequence

import numpy as np
import torch

from ..errors import DyncnnError, InputTypeError


def confidence_np(logits: np.ndarray, criterion: str = "max_prob", temperature: float = 1.0) -> np.ndarray:
    """numpy twin of :func:`dyncnn.dynamic.policy.confidence` (float32, same order of operations)."""
    z = np.asarray(logits, dtype=np.float32)
    if temperature != 1.0:
        z = z / np.float32(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    inv = np.float32(1.0) / e.sum(axis=-1, keepdims=True)
    if criterion == "max_prob":       # the top probability is exp(0) * inv = inv exactly
        return inv[:, 0]
    p = e * inv
    if criterion == "margin":
        top = np.partition(p, p.shape[-1] - 2, axis=-1)[:, -2:]
        return top[:, 1] - top[:, 0]
    if criterion == "entropy":
        ent = -(p * np.log(np.maximum(p, np.float32(1e-12)))).sum(axis=-1, dtype=np.float32)
        return -ent / np.float32(math.log(p.shape[-1]))
    raise ValueError(f"unknown exit criterion {criterion!r}; expected max_prob, entropy or margin")


SCREEN_MARGIN = 1e-4    # float32's rounding moves a confidence by a few 1e-7: beyond this, it cannot flip a decision
_SCALAR_CLASSES = 64     # up to this many classes, one sample's logits are read as Python floats


def row_values(logits: np.ndarray) -> list[float] | None:
    """One sample's (1, C) logits as Python floats when ``C`` is small (the fast exit test), else None."""
    return logits.ravel().tolist() if logits.shape[-1] <= _SCALAR_CLASSES else None


def logits_finite(logits: np.ndarray, values: list[float] | None = None) -> bool:
    """No NaN/Inf in ``logits``; ``values``: the same as :func:`row_values` (their double sum cannot overflow)."""
    if values is not None:
        return math.isfinite(sum(values))
    return bool(np.isfinite(logits.sum()) or np.isfinite(logits).all())   # the float32 sum may overflow


def exit_test_one(logits: np.ndarray, values: list[float] | None, criterion: str, temperature: float,
                  threshold: np.float32) -> bool:
    """``confidence_np(logits, criterion, temperature)[0] >= threshold`` for one sample's finite (1, C) logits.

    The driver makes this test after every stage of a batch-1 call, where the float32 twin's seven numpy calls
    (about 14 us) would weigh on stages of 0.1-0.2 ms. For ``max_prob`` the confidence is first computed in double
    precision on ``values`` (:func:`row_values`, about 1.5 us); the float32 twin decides only when that confidence
    lies within :data:`SCREEN_MARGIN` of the threshold. So the decision is always the float32 twin's.
    """
    if criterion == "max_prob" and values is not None:
        m, t, s = max(values), float(temperature), 0.0
        for v in values:
            s += math.exp((v - m) / t)
        c, thr = 1.0 / s, float(threshold)
        if abs(c - thr) > SCREEN_MARGIN:
            return c > thr
    return bool(confidence_np(logits, criterion, temperature)[0] >= threshold)


def _non_finite(k: int, logits: np.ndarray, step: str = "exit") -> NoReturn:
    raise FloatingPointError(f"{step} {k} produced NaN/Inf logits for {int((~np.isfinite(logits)).any(1).sum())} "
                             f"samples; refusing to take an exit decision on them")


def one_sample_leaves(k: int, logits: np.ndarray, last: bool, threshold: np.float32 | None, criterion: str,
                      temperature: float, step: str = "exit") -> bool:
    """Whether the one sample of ``logits`` (1, C) leaves at ``step`` ``k``: NaN/Inf logits are refused, the last
    step always takes it, an infinite threshold never / always does (eager's decision without the math), and
    otherwise :func:`exit_test_one` decides. The batch-1 loop of the multi-exit and glance drivers."""
    values = row_values(logits)
    if not logits_finite(logits, values):
        _non_finite(k, logits, step)
    if last:
        return True
    if threshold == np.inf:
        return False
    return threshold == -np.inf or exit_test_one(logits, values, criterion, temperature, threshold)


def all_finite(x: np.ndarray) -> bool:
    """No NaN/Inf in the float32 array ``x``. First look: its dot product with itself, one BLAS call (NaN and Inf
    propagate into it), several times faster than ``x.sum()`` (numpy's pairwise sum); only when that is not finite
    (it overflows from about 1e19 per entry) does the element-wise test decide."""
    v = x.reshape(-1)
    return math.isfinite(np.dot(v, v)) or bool(np.isfinite(x).all())


def _as_batch(x: Any, shape: Sequence[int]) -> np.ndarray:
    """Validate an input batch against the exported (C, H, W) and return it as contiguous float32 numpy."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == shape and \
            x.flags.c_contiguous:       # the common case, checked without conversions (batch-1 latency)
        if x.size and not all_finite(x):
            raise DyncnnError(f"input: expected finite values, got {int((~np.isfinite(x)).sum())} NaN/Inf entries")
        return x
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise DyncnnError(f"input: expected a floating-point batch (float32 in [0, 1]), got {x.dtype}; "
                              f"convert with x.float() / 255")
        x = x.detach().cpu().float().numpy()
    if not isinstance(x, np.ndarray):
        raise InputTypeError(f"input: expected a numpy array or torch tensor of shape (N, {', '.join(map(str, shape))})"
                        f", got {type(x).__name__}")
    expected = f"(N, {', '.join(map(str, shape))})"
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        hint = " (add a batch axis)" if x.ndim == 3 else ""
        raise DyncnnError(f"input: expected shape {expected} as exported, got {tuple(x.shape)}{hint}; the "
                          f"bundle's input size is fixed at export")
    if not np.issubdtype(x.dtype, np.floating):
        raise DyncnnError(f"input: expected a floating-point batch (float32 in [0, 1]), got {x.dtype}; convert "
                          f"with x.astype(np.float32) / 255")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not all_finite(x):
        raise DyncnnError(f"input: expected finite values, got {int((~np.isfinite(x)).sum())} NaN/Inf entries")
    return x
