"""Evaluation of early-exit networks as the field does it.

- **Anytime prediction**: the accuracy of every exit on the whole test set, each with its cumulative MACs.
- **Budgeted batch classification** (the MSDNet protocol, used unchanged by RANet and GFNet): for q = p/20,
  p = 1..39, exit proportions p_k = q^k / sum_j q^j; thresholds are set on the validation split so that the
  k-th exit takes floor(N p_k) of the samples still present (by their top confidence), then applied to the test
  split, where a sample leaves at the first exit whose threshold it meets. Each q gives one (accuracy, MACs)
  point. :func:`msdnet_thresholds` restates the official ``dynamic_evaluate`` threshold search exactly
  (including its corner cases: no exit where floor(N p_k) is 0 or exceeds the samples left).
- **Solving for a budget**: bisection on q for a target mean MACs (or the cheapest point reaching a target
  accuracy) on the validation split: the official code sweeps the curve only.

Everything here works on precomputed exit outputs (``collect_exit_logits``), an offline analysis. What a
deployed model does is ``MultiExitNetwork.infer``, which evaluates later exits only for samples that reach them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .policy import ExitPolicy, confidence

NO_EXIT = 1e8      # the official code's "nobody exits here" threshold


@torch.no_grad()
def collect_exit_logits(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Logits of every exit for every sample: (K, N, C) on the CPU, and the targets (N,); the model runs on the
    device of its parameters."""
    from .executor import module_device
    device = module_device(model)
    was_training = model.training
    model.eval()
    outs, targets = [], []
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            outs.append(torch.stack(model(x.to(device))).cpu())
            targets.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(outs, dim=1), torch.cat(targets)


def exit_scores(logits: Tensor, criterion: str = "max_prob", temperatures=None) -> Tensor:
    """Confidence of every exit for every sample, (K, N)."""
    temps = list(temperatures) if temperatures is not None else [1.0] * logits.shape[0]
    return torch.stack([confidence(logits[k], criterion, temps[k]) for k in range(logits.shape[0])])


def exit_proportions(q: float, num_exits: int) -> Tensor:
    """p_k = q^k / sum_j q^j for k = 1..K (float64)."""
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    p = torch.exp(math.log(q) * k)
    return p / p.sum()


def msdnet_thresholds(scores: Tensor, proportions: Tensor) -> Tensor:
    """The official threshold search on validation ``scores`` (K, N) for exit ``proportions`` (K,).

    Returns thresholds (K,): NO_EXIT where no sample is sent to an exit, -NO_EXIT for the last exit.
    """
    k_exits, n = scores.shape
    thresholds = torch.full((k_exits,), NO_EXIT, dtype=scores.dtype)
    remaining = torch.ones(n, dtype=torch.bool)
    for k in range(k_exits - 1):
        out_n = math.floor(n * float(proportions[k]))
        left = scores[k][remaining].sort(descending=True).values
        if 1 <= out_n <= len(left):
            thresholds[k] = left[out_n - 1]
        remaining &= scores[k] < thresholds[k]
    thresholds[-1] = -NO_EXIT
    return thresholds


def assign_exits(scores: Tensor, thresholds: Tensor) -> Tensor:
    """First exit whose threshold each sample meets; the last exit for the rest. (N,) int64."""
    k_exits = scores.shape[0]
    meets = scores >= thresholds[:, None]
    meets[-1] = True
    return meets.to(torch.int8).argmax(0).to(torch.int64).clamp_max(k_exits - 1)


@dataclass
class BudgetPoint:
    q: float
    thresholds: list[float]
    accuracy: float
    mean_macs: float
    exit_fractions: list[float] = field(default_factory=list)

    def policy(self, criterion: str = "max_prob", temperatures=None) -> ExitPolicy:
        th = [t if abs(t) < NO_EXIT else math.copysign(math.inf, t) for t in self.thresholds[:-1]]
        return ExitPolicy(th, criterion, list(temperatures or []))


def evaluate_thresholds(scores: Tensor, correct: Tensor, thresholds: Tensor, exit_macs, q: float = float("nan")
                        ) -> BudgetPoint:
    """Accuracy and expected MACs of ``thresholds`` on a split (``correct`` is (K, N) bool)."""
    idx = assign_exits(scores, thresholds)
    n, k_exits = scores.shape[1], scores.shape[0]
    frac = torch.bincount(idx, minlength=k_exits).double() / n
    acc = float(correct[idx, torch.arange(n)].double().mean())
    macs = float((frac * torch.as_tensor(exit_macs, dtype=torch.float64)).sum())
    return BudgetPoint(q, [float(t) for t in thresholds], acc, macs, frac.tolist())


def dynamic_evaluate(val_scores: Tensor, test_scores: Tensor, test_correct: Tensor, exit_macs,
                     steps: int = 39) -> list[BudgetPoint]:
    """The MSDNet budgeted-classification sweep, q = p/20 for p = 1..steps."""
    points = []
    for p in range(1, steps + 1):
        q = p / 20
        th = msdnet_thresholds(val_scores, exit_proportions(q, val_scores.shape[0]))
        points.append(evaluate_thresholds(test_scores, test_correct, th, exit_macs, q))
    return points


def anytime(correct: Tensor, exit_macs) -> list[tuple[float, float]]:
    """(cumulative MACs, accuracy) of every exit on the whole split."""
    return [(float(m), float(correct[k].double().mean())) for k, m in enumerate(exit_macs)]


def solve_for_budget(val_scores: Tensor, val_correct: Tensor, exit_macs, target_macs: float | None = None,
                     target_accuracy: float | None = None, iters: int = 60) -> BudgetPoint:
    """Thresholds for a target mean MACs (the most accurate point not above it), or the cheapest point that
    reaches ``target_accuracy``, found by bisection on log q over the validation split."""
    if (target_macs is None) == (target_accuracy is None):
        raise ValueError("give exactly one of target_macs and target_accuracy")
    k_exits = val_scores.shape[0]
    lo_cost, hi_cost = float(exit_macs[0]), float(exit_macs[-1])

    def at(log_q: float) -> BudgetPoint:
        th = msdnet_thresholds(val_scores, exit_proportions(math.exp(log_q), k_exits))
        return evaluate_thresholds(val_scores, val_correct, th, exit_macs, math.exp(log_q))

    lo, hi = math.log(1e-4), math.log(1e4)
    if target_macs is not None:
        if not lo_cost <= target_macs <= hi_cost:
            raise ValueError(f"target budget {target_macs / 1e6:.3f}M MACs is outside the feasible range "
                             f"[{lo_cost / 1e6:.3f}M (everything at the first exit), {hi_cost / 1e6:.3f}M "
                             f"(full depth)]")
        best = at(lo)
        if best.mean_macs > target_macs:      # even q -> 0 leaves some samples late; use the first exit only
            th = torch.full((k_exits,), -NO_EXIT)
            return evaluate_thresholds(val_scores, val_correct, th, exit_macs, 0.0)
        for _ in range(iters):
            mid = (lo + hi) / 2
            point = at(mid)
            if point.mean_macs <= target_macs:
                best, lo = point, mid
            else:
                hi = mid
        return best
    if not 0 <= target_accuracy <= 1:
        raise ValueError(f"target accuracy must be in [0, 1], got {target_accuracy}")
    full = at(hi)
    if full.accuracy < target_accuracy:
        raise ValueError(f"target accuracy {target_accuracy:.4f} is above what the network reaches at full "
                         f"depth on the validation split ({full.accuracy:.4f})")
    best = full
    for _ in range(iters):
        mid = (lo + hi) / 2
        point = at(mid)
        if point.accuracy >= target_accuracy:
            best, hi = point, mid
        else:
            lo = mid
    return best


# The range a fitted temperature is kept in. An exit near chance level keeps lowering its NLL as T grows (the
# softmax tends to uniform), and an unbounded fit walks T to 1e4 and beyond; every confidence then lies within 1e-5
# of 1/C, a band a few float32 rounding steps wide, and the exit decisions are decided by rounding: eager PyTorch
# and an exported bundle (other exp/sum order, logits 1e-6 apart) then disagree on samples near a threshold (issue
# 27: 7 of 500 validation images, T = 37000). An exit that separates its validation set perfectly drives T to 0
# instead (its LBFGS line search then overflowed).
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperatures(logits: Tensor, targets: Tensor, iters: int = 100) -> list[float]:
    """Per-exit temperature scaling (Guo et al. 2017): T_k minimising the NLL of exit k on validation logits,
    within :data:`TEMPERATURE_RANGE`. The NLL is convex in 1/T, hence unimodal in log T, so a golden-section
    search of ``iters`` steps over log T in the range finds the constrained minimum (no gradients: logits made
    under ``torch.inference_mode`` are accepted as they are)."""
    targets = torch.as_tensor(targets)
    return [_fit_temperature(logits[k].detach().double(), targets, iters) for k in range(logits.shape[0])]


def _fit_temperature(z: Tensor, targets: Tensor, iters: int) -> float:
    def nll(log_t: float) -> float:
        return float(nn.functional.cross_entropy(z / math.exp(log_t), targets))
    a, b = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    u = (a + b) / 2
    # the search's point, or an end of the range when the minimum lies there (the unconstrained one beyond it)
    return min((nll(u), math.exp(u)), *((nll(math.log(t)), t) for t in TEMPERATURE_RANGE))[1]
