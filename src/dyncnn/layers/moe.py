"""A convolutional mixture-of-experts layer whose dispatch runs each expert only on the samples routed to it.

``y = post(shortcut(x) + sum_{e in topk(x)} w_e(x) * expert_e(x))``: a router (global average pool -> linear ->
E logits) picks k experts per sample (noisy top-k gating in training, Shazeer et al. 2017), the samples are grouped
by expert (gather -> expert -> weighted scatter-add), so an expert's MACs are spent only on its samples. Published
MoE code usually runs every expert on every sample and multiplies by a sparse mask; ``dense`` keeps that simulated
form as the reference the dispatch is checked and timed against.

Weights: ``renormalize=True`` is Shazeer's softmax over the k chosen logits (the weights of a sample sum to 1, so a
MoE whose experts are copies of one block equals that block); ``False`` is the Switch Transformer's gate (the full
softmax probability of each chosen expert), the only form in which a top-1 router receives a task gradient. The
default (``None``) takes Shazeer's form for k >= 2 and Switch's for k = 1. ``straight_through=True`` uses the
renormalised weights in the forward pass (1 for k = 1: the expert's output keeps its scale) and the gradient of
the Switch probabilities in the backward pass, so a top-1 router learns from the task at full output scale.

Capacity (``capacity_factor`` cf, GShard / Switch): each expert takes at most ``ceil(cf * k * N / E)`` of the
N * k assignments of a batch of N samples. Assignments are served in priority order: every sample's first choice
(in batch order) before any second choice, and so on. An assignment past an expert's capacity is dropped: that
expert does not run for the sample, its weight is not redistributed, and the sample keeps its other experts and
the shortcut (a sample that loses every expert leaves as ``post(shortcut(x))``, zero-filled without shortcut).
Capacity therefore makes a sample's output depend on the rest of its batch: batched inference equals per-sample
inference only with capacity off (``capacity_factor=None``, the default).

Load balancing (``regularization`` of the last training forward, ``aux_loss``): ``"switch"`` is
``E * sum_i f_i P_i`` (f_i: fraction of the assignments routed to expert i, P_i: mean router probability of
expert i; 1 when balanced); ``"importance"`` is Shazeer's squared coefficient of variation of the per-expert sums
of the gate weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fusion import take_rows

BALANCE_LOSSES = ("switch", "importance")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 4
    top_k: int = 1
    capacity_factor: float | None = None   # None: no capacity limit
    noisy_gating: bool = True              # Shazeer's learned Gaussian noise on the router logits (training only)
    renormalize: bool | None = None        # None: softmax over the top-k for k >= 2, Switch gate for k = 1
    balance: str = "switch"
    straight_through: bool = False         # forward: renormalised weights; backward: Switch probabilities

    def __post_init__(self):
        e, k = self.num_experts, self.top_k
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {e!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e:
            raise ValueError(f"top_k must be an integer in 1..{e} (the number of experts), got {k!r}")
        cf = self.capacity_factor
        if cf is not None and not (isinstance(cf, (int, float)) and math.isfinite(cf) and cf > 0):
            raise ValueError(f"capacity_factor must be None (no limit) or a finite number > 0, got {cf!r}")
        if self.balance not in BALANCE_LOSSES:
            raise ValueError(f"balance must be one of {BALANCE_LOSSES}, got {self.balance!r}")

    @property
    def renormalized(self) -> bool:
        return self.top_k > 1 if self.renormalize is None else bool(self.renormalize)

    def capacity(self, batch_size: int) -> int | None:
        """Most assignments one expert takes from a batch of ``batch_size`` samples (None: unlimited)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.top_k * batch_size / self.num_experts)


class Router(nn.Module):
    """Global average pool -> linear -> one logit per expert (the clean logits; the noise lives in ConvMoE)."""

    def __init__(self, in_chs: int, num_experts: int):
        super().__init__()
        self.fc = nn.Linear(in_chs, num_experts)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


@dataclass
class Routing:
    """The routing of one batch: ``experts``/``weights`` (N, k) and which assignments survived capacity."""
    experts: Tensor      # (N, k) int64 expert index of each choice (rank 0 = best)
    weights: Tensor      # (N, k) gate weight of each choice
    kept: Tensor         # (N, k) bool: False where the expert's capacity was exhausted
    probs: Tensor        # (N, E) router softmax (noisy logits in training)

    def used(self, num_experts: int) -> Tensor:
        """(N, E) bool: which experts really ran for each sample."""
        n = self.experts.shape[0]
        used = torch.zeros(n, num_experts, dtype=torch.bool, device=self.experts.device)
        return used.scatter(1, self.experts, self.kept) if n else used

    def gate_matrix(self, num_experts: int) -> Tensor:
        """(N, E) weights of the experts that ran (0 elsewhere): the mask the simulated dense form applies."""
        w = torch.where(self.kept, self.weights, torch.zeros_like(self.weights))
        return torch.zeros_like(self.probs).scatter(1, self.experts, w)


def capacity_keep(experts: Tensor, num_experts: int, capacity: int | None) -> Tensor:
    """(N, k) bool: the assignments each expert serves, first choices (batch order) first, at most ``capacity``."""
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    flat = experts.t().reshape(-1)                        # rank-major priority order
    order = torch.argsort(flat, stable=True)              # grouped by expert, priority kept inside a group
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = position < capacity
    return keep.view(experts.shape[1], experts.shape[0]).t()


class ConvMoE(nn.Module):
    """Top-k mixture of convolutional experts with executed dispatch (see the module docstring).

    ``experts`` map (N, C, H, W) to the layer's output shape; ``shortcut`` (e.g. the identity of a residual block,
    None for none) and ``post`` (e.g. the ReLU after a ResNet block's sum) are shared by all samples.
    ``force_expert`` (an index, or None) routes every sample to that one expert with weight 1 (no capacity limit).
    """

    def __init__(self, experts: Sequence[nn.Module], in_chs: int, cfg: MoEConfig = MoEConfig(),
                 shortcut: nn.Module | None = None, post: nn.Module | None = None):
        super().__init__()
        if len(experts) != cfg.num_experts:
            raise ValueError(f"ConvMoE: cfg.num_experts={cfg.num_experts} but {len(experts)} experts were given")
        self.cfg = cfg
        self.in_chs = in_chs
        self.experts = nn.ModuleList(experts)
        self.router = Router(in_chs, cfg.num_experts)
        self.noise = nn.Linear(in_chs, cfg.num_experts) if cfg.noisy_gating else None
        if self.noise is not None:       # zero weights as Shazeer et al.; a small initial noise (softplus(-3) =
            nn.init.zeros_(self.noise.weight)   # 0.05): a noise larger than the router's logits randomises the
            nn.init.constant_(self.noise.bias, -3.0)   # training routing and the clean (eval) routing collapses
        self.shortcut = shortcut
        self.post = post if post is not None else nn.Identity()
        self._force: int | None = None
        self.aux_loss: Tensor | None = None      # load-balancing loss of the last training forward

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts

    @property
    def force_expert(self) -> int | None:
        return self._force

    @force_expert.setter
    def force_expert(self, expert: int | None) -> None:
        if expert is not None and (isinstance(expert, bool) or not isinstance(expert, int)
                                   or not 0 <= expert < self.num_experts):
            raise ValueError(f"force_expert must be None or an expert index in 0..{self.num_experts - 1}, "
                             f"got {expert!r}")
        self._force = expert

    # --- routing -------------------------------------------------------------------------------------------
    def route(self, x: Tensor, logits: Tensor | None = None) -> Routing:
        """Top-k routing of ``x`` (noisy in training); ``logits`` are the router's clean logits if already run."""
        cfg = self.cfg
        n = x.shape[0]
        if logits is None:
            logits = self.router(x)
        if self.training and self.noise is not None and self._force is None:
            std = F.softplus(self.noise(x.mean((2, 3))))
            logits = logits + torch.randn_like(logits) * std
        probs = logits.softmax(1)
        if self._force is not None:
            experts = torch.full((n, 1), self._force, dtype=torch.int64, device=x.device)
            weights = torch.ones(n, 1, dtype=x.dtype, device=x.device)
        else:
            top, experts = logits.topk(cfg.top_k, dim=1)
            if cfg.straight_through:
                chosen = probs.gather(1, experts)
                weights = (chosen - chosen.detach()) + top.softmax(1).detach()   # forward value exactly the softmax
            else:
                weights = top.softmax(1) if cfg.renormalized else probs.gather(1, experts)
        kept = capacity_keep(experts, cfg.num_experts, None if self._force is not None else cfg.capacity(n))
        return Routing(experts, weights, kept, probs)

    def balance_loss(self, routing: Routing) -> Tensor:
        e = self.num_experts
        if self.cfg.balance == "switch":
            f = torch.bincount(routing.experts.reshape(-1), minlength=e).to(routing.probs.dtype)
            f = f / routing.experts.numel()
            return e * (f * routing.probs.mean(0)).sum()
        importance = routing.gate_matrix(e).sum(0)
        if e == 1:
            return importance.new_zeros(())
        return importance.var() / (importance.mean() ** 2 + 1e-10)

    # --- execution ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Dispatch (training and eval); in training also records the load-balancing loss in ``aux_loss``."""
        out, routing = self.dispatch(x)
        if self.training:
            self.aux_loss = self.balance_loss(routing)
        return out

    def dispatch(self, x: Tensor, executor=None, rows: Tensor | None = None, ledger=None) -> tuple[Tensor, Routing]:
        """Group the samples by expert, run each expert on its group only, scatter-add the weighted results.

        With an ``executor`` (``dyncnn.dynamic.executor.Executor``), ``rows`` (the original sample indices of
        ``x``'s rows) and a ``ledger``, every sample is charged the router, the shortcut and the experts it used.
        """
        n = x.shape[0]
        if n == 0:
            raise ValueError("ConvMoE: expected a non-empty batch")
        charge = executor is not None
        if charge:
            if rows is None or ledger is None:
                raise ValueError("ConvMoE.dispatch: an executor needs rows and a ledger")
            logits = executor.run(self.router, x, rows, ledger)
        else:
            logits = self.router(x)
        routing = self.route(x, logits)
        out = None
        if self.shortcut is not None:
            out = executor.run(self.shortcut, x, rows, ledger) if charge else self.shortcut(x)

        k = routing.experts.shape[1]
        if n == 1:                    # one sample (latency-bound): no grouping, just its experts in index order
            chosen = sorted((e, j) for j, (e, kept) in enumerate(zip(routing.experts[0].tolist(),
                                                                     routing.kept[0].tolist())) if kept)
            for e, j in chosen:
                ye = executor.run(self.experts[e], x, rows, ledger) if charge else self.experts[e](x)
                ye = ye * routing.weights[0, j].to(ye.dtype)
                out = ye if out is None else out + ye
            if not chosen:
                out = out.clone()
            return self.post(out), routing
        # Sort the assignments by expert once: each expert's rows are then a contiguous slice of one gathered
        # input (a view, not a gather per expert), and one weighted scatter-add puts every result back.
        flat_e = routing.experts.t().reshape(-1)
        flat_s = torch.arange(n, device=x.device).repeat(k)
        flat_w = routing.weights.t().reshape(-1)
        keep = routing.kept.t().reshape(-1)
        if not bool(keep.all()):
            flat_e, flat_s, flat_w = flat_e[keep], flat_s[keep], flat_w[keep]
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=self.num_experts).tolist()
        src = flat_s[order]                  # the sample of each sorted assignment
        if k == 1 and len(src) == n and max(counts) == n:   # one expert takes the whole batch: no gather
            xs, src_rows = x, rows
        else:
            xs, src_rows = take_rows(x, src), (rows[src.cpu()] if charge else None)
        ys, start = [], 0
        for e, count in enumerate(counts):
            if not count:
                continue
            xe = xs.narrow(0, start, count)
            expert = self.experts[e]
            ys.append(executor.run(expert, xe, src_rows.narrow(0, start, count), ledger) if charge else expert(xe))
            start += count
        if not ys:             # every assignment dropped
            if out is None:    # and no shortcut: cannot happen with capacity >= 1
                raise RuntimeError("ConvMoE: no expert ran and there is no shortcut")
            return self.post(out.clone()), routing   # ``post`` may work in place; never on the caller's tensor
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        y = y * flat_w[order].view(-1, *([1] * (y.dim() - 1))).to(y.dtype)
        # the sum per sample runs in the order of ``src``: the shortcut, then its experts in index order
        if out is None:
            out = y.new_zeros((n,) + y.shape[1:]).index_add_(0, src, y)
        else:
            out = out.index_add(0, src, y)   # out of place: the shortcut's output may be the caller's tensor
        return self.post(out), routing

    def dense(self, x: Tensor) -> Tensor:
        """The simulated form of published code: every expert on every sample, masked by the top-k weights.

        Same result as ``forward`` (up to summation order); used as the reference and the timing baseline.
        """
        routing = self.route(x)
        gates = routing.gate_matrix(self.num_experts)
        out = self.shortcut(x) if self.shortcut is not None else 0
        for e, expert in enumerate(self.experts):
            ye = expert(x)
            out = out + ye * gates[:, e].view(-1, *([1] * (ye.dim() - 1))).to(ye.dtype)
        return self.post(out)
