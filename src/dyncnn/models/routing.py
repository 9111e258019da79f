"""Registered dynamic-routing super-networks (see :mod:`dyncnn.dynamic.routing`).

With the default paths (full basic block, half-width basic block, skip) the network forced to path 0 is a CIFAR
ResNet: ``routing_supernet_cifar`` is ResNet-20's layout (16/32/64 channels, 3 cells per stage) and
``routing_supernet_tiny`` is ResNet-14 at width 0.5 (8/16/32 channels, 2 cells per stage) for ScaledMNIST.
"""
from __future__ import annotations

from typing import Sequence

from ..dynamic.routing import DEFAULT_PATHS, PathCfg, RoutingSuperNet, SuperNetCfg
from .registry import register_model


def _paths(paths: Sequence[PathCfg | dict | tuple] | None) -> tuple[PathCfg, ...]:
    """Paths from PathCfg, dicts (``{"kind": "basic", "ratio": 0.5}``, as stored in checkpoints) or tuples."""
    if paths is None:
        return DEFAULT_PATHS
    out = []
    for p in paths:
        out.append(p if isinstance(p, PathCfg) else PathCfg(**p) if isinstance(p, dict) else PathCfg(*p))
    return tuple(out)


def _build(num_classes: int, in_chans: int, widths: Sequence[int], cells_per_stage: int,
           paths: Sequence | None, budget: float, cost_weight: float, tau: Sequence[float],
           noise_until: float, cost_warmup: float) -> RoutingSuperNet:
    return RoutingSuperNet(SuperNetCfg(tuple(int(w) for w in widths), int(cells_per_stage), _paths(paths),
                                       in_chans, num_classes, float(budget), float(cost_weight),
                                       (float(tau[0]), float(tau[1])), float(noise_until),
                                       float(cost_warmup)))


@register_model(name="routing_supernet_cifar")
def routing_supernet_cifar(num_classes: int = 10, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64),
                           cells_per_stage: int = 3, paths: Sequence | None = None, budget: float = 0.5,
                           cost_weight: float = 4.0, tau: Sequence[float] = (1.0, 0.2), noise_until: float = 0.5,
                          cost_warmup: float = 0.2) -> RoutingSuperNet:
    """Per-sample routing over {basic block, half-width block, skip} in each of 9 cells; path 0 = ResNet-20."""
    return _build(num_classes, in_chans, widths, cells_per_stage, paths, budget, cost_weight, tau, noise_until,
                  cost_warmup)


@register_model(name="routing_supernet_tiny")
def routing_supernet_tiny(num_classes: int = 10, in_chans: int = 1, widths: Sequence[int] = (8, 16, 32),
                          cells_per_stage: int = 2, paths: Sequence | None = None, budget: float = 0.5,
                          cost_weight: float = 4.0, tau: Sequence[float] = (1.0, 0.2), noise_until: float = 0.5,
                          cost_warmup: float = 0.2) -> RoutingSuperNet:
    """For ScaledMNIST: 6 routed cells at 8/16/32 channels; path 0 = ResNet-14 at width 0.5."""
    return _build(num_classes, in_chans, widths, cells_per_stage, paths, budget, cost_weight, tau, noise_until,
                  cost_warmup)
