"""Exit criteria: how confident an exit is, and the rule "leave at exit k if confidence >= threshold k".

Scores are computed on temperature-scaled logits (one temperature per exit, fitted on the validation split).
Higher is more confident for every criterion, so one threshold rule serves all:
- ``max_prob``: the top softmax probability (MSDNet, RANet, GFNet);
- ``entropy``: minus the entropy of the softmax, normalised to [-1, 0] by log(classes);
- ``margin``: top-1 minus top-2 probability.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import DyncnnError, InputTypeError, all_finite

CRITERIA = ("max_prob", "entropy", "margin")


def _numbers(values, what: str) -> list[float]:
    """``values`` (a list, tuple or 1-D tensor of numbers) as a list of floats, or a clear error."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().reshape(-1).tolist() if values.dim() <= 1 else values
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, (list, tuple)):
        raise InputTypeError(f"{what}: expected a list of numbers (one per exit but the last), got "
                             f"{type(values).__name__} {values!r:.80}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputTypeError(f"{what}: expected numbers, got {type(v).__name__} {v!r:.40} in {values!r:.80}")
        out.append(float(v))
    return out


def confidence(logits: Tensor, criterion: str = "max_prob", temperature: float = 1.0) -> Tensor:
    """Per-sample confidence of ``logits`` (N, C) under ``criterion``; NaN logits are an error."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown exit criterion {criterion!r}; expected one of {CRITERIA}")
    if not all_finite(logits):
        raise FloatingPointError("NaN/Inf in the logits: no exit decision can be taken on them")
    return confidence_unchecked(logits, criterion, temperature)


def confidence_unchecked(logits: Tensor, criterion: str, temperature: float | Tensor = 1.0) -> Tensor:
    """:func:`confidence` without its data-dependent checks, so that it can be traced into an exported graph."""
    z = logits.float()
    if not (isinstance(temperature, (int, float)) and temperature == 1):   # a division by 1 changes nothing
        z = z / temperature
    p = torch.softmax(z, dim=-1)
    if criterion == "max_prob":
        return p.max(-1).values
    if criterion == "margin":
        top = p.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return -ent / math.log(p.shape[-1])


@dataclass
class ExitPolicy:
    """Thresholds (one per exit but the last) on a confidence criterion, with per-exit temperatures.

    The rule: a sample leaves at exit ``k`` when its confidence (float32) is ``>= thresholds[k]``.
    ``math.inf`` is the one spelling of "never leave here" (:meth:`never`: full depth), ``-math.inf`` of "always
    leave here" (:meth:`always_first`). Every finite threshold is an ordinary one, 1.0 included: a float32 softmax
    saturates to exactly 1.0 (``max_prob`` with the top logit some 17-20 above the others, a trained network's
    confident samples), so a threshold of 1.0 lets those samples leave and does not mean "never". The exported
    bundle drivers apply the same rule (:func:`dyncnn.export.runtime.exit_test_one`).
    """
    thresholds: Sequence[float]
    criterion: str = "max_prob"
    temperatures: Sequence[float] = field(default_factory=list)

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise DyncnnError(f"unknown exit criterion {self.criterion!r}; expected one of {CRITERIA}")
        self.thresholds = _numbers(self.thresholds, "thresholds")
        if any(math.isnan(t) for t in self.thresholds):
            raise DyncnnError("thresholds must not be NaN")
        self.temperatures = _numbers(self.temperatures, "temperatures")
        bad = [t for t in self.temperatures if not (math.isfinite(t) and t > 0)]
        if bad:      # 0 or negative would flip or flatten the softmax and silently switch the exits off
            raise DyncnnError(f"temperatures must be finite and > 0, got {bad}")

    def temperature(self, k: int) -> float:
        return float(self.temperatures[k]) if k < len(self.temperatures) else 1.0

    def __call__(self, k: int, logits: Tensor) -> Tensor:
        """Boolean mask of the rows of ``logits`` that leave at exit ``k``."""
        if k >= len(self.thresholds):
            return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return confidence(logits, self.criterion, self.temperature(k)) >= self.thresholds[k]

    @classmethod
    def of(cls, policy) -> "ExitPolicy":
        """``policy`` itself; an ExitPolicy of max-probability thresholds from a list / tuple / 1-D tensor; or the
        policy of a mapping with ``thresholds`` (and optionally ``criterion``, ``temperatures``): the record
        ``calibrate()`` returns, a thresholds file's JSON, ``to_dict()``. Anything else (a number, a string) is an
        InputTypeError saying what was expected."""
        if isinstance(policy, ExitPolicy):
            return policy
        if isinstance(policy, Mapping):
            if "thresholds" not in policy:
                raise InputTypeError(f"expected an ExitPolicy, a list of thresholds or a policy record with "
                                     f"'thresholds' (what calibrate() returns), got a mapping with keys "
                                     f"{sorted(map(str, policy))[:8]}")
            return cls(policy["thresholds"], policy.get("criterion", "max_prob"), policy.get("temperatures", []))
        return cls(policy)

    @classmethod
    def never(cls, num_exits: int) -> "ExitPolicy":
        """Every sample runs to the last exit (full depth)."""
        return cls([math.inf] * (num_exits - 1))

    @classmethod
    def always_first(cls, num_exits: int) -> "ExitPolicy":
        return cls([-math.inf] * (num_exits - 1))

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "criterion": self.criterion,
                "temperatures": list(self.temperatures)}
