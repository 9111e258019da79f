"""Calibration of an early-exit network on the validation split, and the thresholds file that carries it.

``calibrate`` fits per-exit temperatures, then solves the thresholds for a target mean MACs (or accuracy). The
result is written as JSON next to the checkpoint; ``load_thresholds`` refuses a file written for another model or
another number of exits, saying which.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from torch import nn
from torch.utils.data import Dataset

from ..errors import DyncnnError
from ..files import atomic_write_text, model_spec, read_json
from .budget import collect_exit_logits, exit_scores, fit_temperatures, solve_for_budget
from .policy import ExitPolicy
from .protocols import HasExits

FORMAT = "dyncnn-thresholds-1"


def calibrate(model: nn.Module, val_set: Dataset, target_macs: float | None = None,
              target_fraction: float | None = None, target_accuracy: float | None = None,
              criterion: str = "max_prob", temperature_scaling: bool = True, target_ms: float | None = None,
              latency_ms: Sequence[float] | None = None) -> dict:
    """Thresholds for one target: ``target_macs`` (mean MACs per image), ``target_fraction`` of the full-depth
    MACs, ``target_accuracy`` on the validation split, or ``target_ms``: a mean latency per image, predicted from
    ``latency_ms``, the measured latency of leaving at each exit (cumulative, batch 1; see
    ``DynamicBundle.stage_latency_ms``). MACs mispredict latency (per-call overhead, memory-bound layers), so a
    latency budget is solved on measured stage times rather than on MACs. Returns the thresholds record."""
    if sum(t is not None for t in (target_macs, target_fraction, target_accuracy, target_ms)) != 1:
        raise DyncnnError("give exactly one of target_macs, target_fraction, target_accuracy, target_ms")
    if not isinstance(model, HasExits):
        raise DyncnnError(f"{type(model).__name__} is not a multi-exit network (it has no exits to calibrate)")
    logits, targets = collect_exit_logits(model, val_set)
    temps = fit_temperatures(logits, targets) if temperature_scaling else [1.0] * logits.shape[0]
    x0 = val_set[0][0].unsqueeze(0)
    from .executor import module_device
    cum = model.exit_macs(x0.to(module_device(model)))
    if target_fraction is not None:
        if not 0 < target_fraction <= 1:
            raise DyncnnError(f"target fraction must be in (0, 1], got {target_fraction}")
        target_macs = target_fraction * cum[-1]
    if target_macs is not None:
        check_feasible_macs(target_macs, cum, target_fraction)
    scores = exit_scores(logits, criterion, temps)
    correct = logits.argmax(-1) == targets
    cost = cum
    if target_ms is not None:
        cost = check_latency_table(latency_ms, len(cum))
        if not cost[0] <= target_ms <= cost[-1]:
            raise DyncnnError(f"target latency {target_ms:.4g} ms per image is outside the feasible range "
                              f"[{cost[0]:.4g} ms (everything at the first exit), {cost[-1]:.4g} ms (full depth)] "
                              f"measured for this model")
    try:
        point = solve_for_budget(scores, correct, cost, target_macs=target_ms if target_ms is not None
                                 else target_macs, target_accuracy=target_accuracy)
    except ValueError as e:
        raise DyncnnError(str(e)) from None
    policy = point.policy(criterion, temps)
    fractions = point.exit_fractions
    record = {"format": FORMAT, "model": model_spec(model), "num_exits": len(cum), "criterion": criterion,
              "temperatures": temps, "thresholds": policy.thresholds, "exit_macs": cum,
              "input_shape": list(x0.shape[1:]), "target_macs": target_macs, "target_accuracy": target_accuracy,
              "val_mean_macs": float(sum(f * m for f, m in zip(fractions, cum))), "val_accuracy": point.accuracy,
              "val_exit_fractions": fractions}
    if target_ms is not None:
        record.update(target_ms=target_ms, latency_ms=list(cost), val_predicted_ms=point.mean_macs)
    return record


def check_feasible_macs(target_macs: float, exit_macs: Sequence[float], fraction: float | None = None) -> None:
    """A DyncnnError unless ``target_macs`` lies between the cheapest exit's cost and full depth, giving that
    range in MACs and as fractions of full depth (the cheapest exit's share)."""
    lo, hi = float(exit_macs[0]), float(exit_macs[-1])
    if lo <= target_macs <= hi:
        return
    share = lo / hi
    what = (f"a budget of {fraction:g} of full depth ({target_macs / 1e6:.4g}M MACs)" if fraction is not None
            else f"a budget of {target_macs / 1e6:.4g}M MACs")
    raise DyncnnError(f"{what} is outside the feasible range [{lo / 1e6:.4g}M, {hi / 1e6:.4g}M] MACs per image: the "
                      f"cheapest exit (exit 0) alone costs {share:.1%} of full depth, so a fraction must lie in "
                      f"[{math.ceil(share * 1000) / 1000:.3f}, 1] (`dyncnn calibrate --budget`); for a smaller budget, "
                      f"attach an exit earlier in the network")


def check_latency_table(latency_ms: Sequence[float] | None, num_exits: int) -> list[float]:
    """A cumulative latency table (ms of leaving at each exit): one positive, finite, non-decreasing value per
    exit, or a DyncnnError saying what came."""
    if latency_ms is None:
        raise DyncnnError("a latency budget needs the measured latency of each exit (latency_ms; `dyncnn "
                          "calibrate --budget-ms` measures it on an exported bundle)")
    table = [float(t) for t in latency_ms]
    if len(table) != num_exits or any(not (t > 0 and math.isfinite(t)) for t in table) or \
            any(b < a for a, b in zip(table, table[1:])):
        raise DyncnnError(f"expected {num_exits} positive, non-decreasing cumulative exit latencies (ms), got "
                          f"{latency_ms}")
    return table


def save_thresholds(record: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=True) + "\n")
    return path


def validate_thresholds_record(record: object, where: str) -> ExitPolicy:
    """The checks a thresholds file must pass (the rules of the Python API): a JSON object of this format with
    ``num_exits``, one threshold per exit but the last, finite positive temperatures, and ``exit_macs`` (one
    non-negative cumulative count per exit). Returns its policy."""
    if not isinstance(record, dict):
        raise DyncnnError(f"{where}: expected a JSON object written by `dyncnn calibrate`, got a "
                          f"{type(record).__name__}")
    if record.get("format") != FORMAT:
        raise DyncnnError(f"{where} is not a dyncnn thresholds file (format {record.get('format')!r}, "
                          f"expected {FORMAT!r})")
    missing = [k for k in ("num_exits", "thresholds", "temperatures", "exit_macs") if k not in record]
    if missing:
        why = (" (the thresholds were solved on confidences at the fitted per-exit temperatures: without them "
               "they compare other numbers, and every sample may leave at the first exit)"
               if "temperatures" in missing else "")
        raise DyncnnError(f"{where}: the thresholds file lacks {', '.join(missing)}{why}; re-run `dyncnn calibrate`")
    k = record["num_exits"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DyncnnError(f"{where}: num_exits must be a positive integer, got {k!r:.40}")
    policy = ExitPolicy(record["thresholds"], record.get("criterion", "max_prob"), record["temperatures"])
    if len(policy.thresholds) not in (k - 1, k):
        raise DyncnnError(f"{where}: {len(policy.thresholds)} thresholds for {k} exits; expected {k - 1} (one per "
                          f"exit but the last)")
    if len(policy.temperatures) != k:
        raise DyncnnError(f"{where}: {len(policy.temperatures)} temperatures for {k} exits; expected one per exit "
                          f"(as `dyncnn calibrate` writes; 1.0 where no temperature was fitted)")
    macs = record["exit_macs"]
    if not isinstance(macs, list) or len(macs) != k or \
            any(isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0 for m in macs):
        raise DyncnnError(f"{where}: exit_macs must list {k} non-negative numbers, got {macs!r:.120}")
    return policy


def load_thresholds(path: str | Path, model: nn.Module | None = None,
                    checkpoint_sha256: str | None = None) -> tuple[ExitPolicy, dict]:
    """Read a thresholds file; with ``model``, check it was written for that model and exit count; with
    ``checkpoint_sha256`` (the checkpoint file's), check it was calibrated on that very checkpoint (a file
    calibrated before the model was retrained would give other exits than it promises)."""
    path = Path(path)
    if not path.exists():
        raise DyncnnError(f"thresholds file {path} does not exist (write one with `dyncnn calibrate`)")
    if not path.is_file():
        raise DyncnnError(f"thresholds file {path} is not a file (expected the JSON that `dyncnn calibrate` writes)")
    record = read_json(path, "thresholds file")
    if model is not None and isinstance(record, dict) and record.get("format") == FORMAT:
        exits = getattr(model, "num_exits", None)
        if exits != record.get("num_exits"):
            raise DyncnnError(f"thresholds in {path} are for {record.get('num_exits')} exits, the model has {exits}")
    policy = validate_thresholds_record(record, str(path))
    if model is not None:
        own = model_spec(model)
        if own and record.get("model") and own != record["model"]:
            raise DyncnnError(f"thresholds in {path} were calibrated for {record['model']}, not for {own}")
    recorded = record.get("checkpoint_sha256")
    if checkpoint_sha256 and recorded and recorded != checkpoint_sha256:
        raise DyncnnError(f"thresholds in {path} were calibrated on another checkpoint (sha256 {recorded[:12]}...) "
                          f"than the one given (sha256 {checkpoint_sha256[:12]}...): the model was retrained or "
                          f"replaced since; re-run `dyncnn calibrate` on it")
    return policy, record
