"""The typed interfaces the trainer, evaluation, calibration, export and the CLI read a model through.

They are structural (``typing.Protocol``, checked with ``isinstance``): a model takes part by having the members,
without inheriting from anything. One place names them, instead of ``hasattr`` tests scattered over the callers.

- :class:`DynamicModel`: every dynamic family. ``infer(x, policy=None)`` returns an :class:`ExitResult`
  (per-sample logits, exit index, MACs that ran, decisions) and ``full_macs(x)`` is the most a sample can cost.
- :class:`EarlyExitModel`: a multi-exit network (stages and heads run in turn; samples leave at confident exits).
- :class:`HasExits`: anything with exits to calibrate (multi-exit networks, GFNet, AdaFocus).
- :class:`GatedModel`: a dynamic model that is not multi-exit (gates, experts, routes, masks, steps).
- :class:`Forceable`: ``force(value)`` pins the decisions (:func:`forced` as a context manager).
- Training hooks, each optional: :class:`AuxLoss` (``regularization_loss()`` added to the loss, e.g. a budget
  term), :class:`OwnTrainingLoss` (``training_loss(outputs, targets)`` replaces the loss, e.g. REINFORCE),
  :class:`ProgressAware` (``set_progress(fraction)`` before each step, e.g. Gumbel temperature annealing).
"""
from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

from torch import Tensor

from .blocks import ResidualBranchBlock
from .executor import ExitResult


@runtime_checkable
class DynamicModel(Protocol):
    def infer(self, x: Tensor) -> ExitResult: ...
    def full_macs(self, x: Tensor) -> int: ...


@runtime_checkable
class EarlyExitModel(Protocol):
    """A network of ``stages`` (state -> state) and ``heads`` (state -> logits) run from ``initial_state(x)``;
    ``infer(x, policy)`` lets confident samples leave. Staged bundles export exactly these."""
    stages: object
    heads: object

    def initial_state(self, x: Tensor) -> object: ...
    def infer(self, x: Tensor, policy=None) -> ExitResult: ...


@runtime_checkable
class HasExits(Protocol):
    """A model whose ``forward`` returns every exit's logits and ``exit_macs(x)`` the cumulative per-sample MACs of
    leaving at each exit: multi-exit networks, GFNet's glance and focus steps, AdaFocus's frames. Thresholds are
    calibrated for these (``dynamic.calibration``)."""

    def exit_macs(self, x: Tensor) -> list[int]: ...


@runtime_checkable
class Forceable(Protocol):
    """The one way to pin a dynamic model's decisions: ``force(value)``, ``None`` to let the model decide again.
    What ``value`` may be depends on the decision: ``True`` / ``False`` for gates (layer skipping: every block runs
    / every gated block is skipped; channel gating: full width / narrowest level; DynConv: ``True`` only, every
    position), an expert index for mixtures of experts, a path index for routing."""

    def force(self, value) -> None: ...


def check_gate_flag(value) -> bool | None:
    """``value`` if it is ``True``, ``False`` or ``None`` (the values a gated family's ``force`` takes), else a
    ValueError; 1 and 0 are refused too, so that a path or expert index is never taken for a gate flag."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"force expects True, False or None, got {value!r}")
    return value


@contextlib.contextmanager
def forced(model: Forceable, value):
    """``with forced(model, True): ...`` runs the block with the decisions pinned, then lets the model decide."""
    if not isinstance(model, Forceable):
        raise TypeError(f"{type(model).__name__} has no decisions to force (no force(value) method)")
    model.force(value)
    try:
        yield model
    finally:
        model.force(None)


@runtime_checkable
class AuxLoss(Protocol):
    def regularization_loss(self) -> Tensor: ...


@runtime_checkable
class OwnTrainingLoss(Protocol):
    def training_loss(self, outputs, targets: Tensor) -> Tensor: ...


@runtime_checkable
class ProgressAware(Protocol):
    def set_progress(self, fraction: float) -> None: ...


def is_gated(model) -> bool:
    """A gated dynamic model (:class:`DynamicModel` and not a multi-exit network, which has its own budgeted
    evaluation)."""
    return isinstance(model, DynamicModel) and not isinstance(model, EarlyExitModel)


__all__ = ["DynamicModel", "EarlyExitModel", "HasExits", "Forceable", "forced", "AuxLoss", "OwnTrainingLoss", "ProgressAware", "ResidualBranchBlock",
           "is_gated"]
