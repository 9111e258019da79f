"""Calibration of an early-exit network on the validation split, and the thresholds file that carries it.

``calibrate`` fits per-exit temperatures, then solves the thresholds for a target mean MACs (or accuracy). The
result is written as JSON next to the checkpoint; ``load_thresholds`` refuses a file written for another model or
another number of exits, saying which.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from ..errors import DyncnnError
from ..train.checkpoint import atomic_write_text, model_spec
from .budget import collect_exit_logits, exit_scores, fit_temperatures, solve_for_budget
from .policy import ExitPolicy

FORMAT = "dyncnn-thresholds-1"


def calibrate(model: nn.Module, val_set: Dataset, target_macs: float | None = None,
              target_fraction: float | None = None, target_accuracy: float | None = None,
              criterion: str = "max_prob", temperature_scaling: bool = True) -> dict:
    """Thresholds for one target: ``target_macs`` (mean MACs per image), ``target_fraction`` of the full-depth
    MACs, or ``target_accuracy`` on the validation split. Returns the thresholds record (see module doc)."""
    if sum(t is not None for t in (target_macs, target_fraction, target_accuracy)) != 1:
        raise DyncnnError("give exactly one of target_macs, target_fraction, target_accuracy")
    if not hasattr(model, "exit_macs"):
        raise DyncnnError(f"{type(model).__name__} is not a multi-exit network (it has no exits to calibrate)")
    logits, targets = collect_exit_logits(model, val_set)
    temps = fit_temperatures(logits, targets) if temperature_scaling else [1.0] * logits.shape[0]
    x0 = val_set[0][0].unsqueeze(0)
    from ..train.device import module_device
    cum = model.exit_macs(x0.to(module_device(model)))
    if target_fraction is not None:
        if not 0 < target_fraction <= 1:
            raise DyncnnError(f"target fraction must be in (0, 1], got {target_fraction}")
        target_macs = target_fraction * cum[-1]
    scores = exit_scores(logits, criterion, temps)
    correct = logits.argmax(-1) == targets
    try:
        point = solve_for_budget(scores, correct, cum, target_macs=target_macs, target_accuracy=target_accuracy)
    except ValueError as e:
        raise DyncnnError(str(e)) from None
    policy = point.policy(criterion, temps)
    return {"format": FORMAT, "model": model_spec(model), "num_exits": len(cum), "criterion": criterion,
            "temperatures": temps, "thresholds": policy.thresholds, "exit_macs": cum,
            "input_shape": list(x0.shape[1:]), "target_macs": target_macs, "target_accuracy": target_accuracy,
            "val_mean_macs": point.mean_macs, "val_accuracy": point.accuracy, "val_exit_fractions": point.exit_fractions}


def save_thresholds(record: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=True) + "\n")
    return path


def load_thresholds(path: str | Path, model: nn.Module | None = None) -> tuple[ExitPolicy, dict]:
    """Read a thresholds file; with ``model``, check it was written for that model and exit count."""
    path = Path(path)
    if not path.exists():
        raise DyncnnError(f"thresholds file {path} does not exist (write one with `dyncnn calibrate`)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DyncnnError(f"thresholds file {path} is not valid JSON: {e}") from None
    if record.get("format") != FORMAT:
        raise DyncnnError(f"{path} is not a dyncnn thresholds file (format {record.get('format')!r}, "
                          f"expected {FORMAT!r})")
    if model is not None:
        exits = getattr(model, "num_exits", None)
        if exits != record["num_exits"]:
            raise DyncnnError(f"thresholds in {path} are for {record['num_exits']} exits, the model has {exits}")
        own = model_spec(model)
        if own and record.get("model") and own != record["model"]:
            raise DyncnnError(f"thresholds in {path} were calibrated for {record['model']}, not for {own}")
    return ExitPolicy(record["thresholds"], record["criterion"], record["temperatures"]), record
