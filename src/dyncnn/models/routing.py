"""Dynamic routing in a super-network: every cell offers alternative paths, a per-sample router picks one.

A cell holds P paths with the same input and output shape but different cost (by default a full basic block, a
half-width basic block and the bare shortcut, i.e. layer skipping as the cheapest route). Its router (global
average pool -> linear -> P logits) chooses per sample: a straight-through Gumbel-softmax one-hot in training
(every path is computed and masked: allowed in training, and the straight-through gradient needs every path's
output; the Gumbel noise fades out over the first half of training so that training ends on inference's routes),
the argmax at inference, where each path runs only on the rows routed to it (gather -> path -> scatter).

Cost: the MACs of the sampled route, ``fixed + sum_cells onehot . path_macs``, are differentiable in the router
logits through the straight-through one-hot; ``regularization_loss()`` is
``cost_weight * budget_loss(expected, full, budget)`` where ``full`` takes the most expensive path everywhere (the
weight ramps up over ``cost_warmup`` of training). Path costs are measured with FlopCounterMode once per shape.

Training recipe that works (benchmarks/bench_moe_routing.py): train the static ResNet, ``load_backbone`` it into
path 0 (narrower paths start as its leading channels) and fine-tune; from scratch, the router logits stay far below
the Gumbel noise, every cell routes at random in training and inference ends on one fixed, badly trained route.

Registered builders: with the default paths (full basic block, half-width basic block, skip) the network forced to
path 0 is a CIFAR ResNet: ``routing_supernet_cifar`` is ResNet-20's layout (16/32/64 channels, 3 cells per stage)
and ``routing_supernet_tiny`` is ResNet-14 at width 0.5 (8/16/32 channels, 2 cells per stage) for ScaledMNIST.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..dynamic.executor import CostLedger, ExitResult, Executor, eval_copy, measure_macs
from ..layers import ConvNormAct, DepthwiseSeparableConv
from ..layers.fusion import empty_rows, put_rows, take_rows
from ..layers.gates import anneal, budget_loss, check_budget
from ..layers.moe import Router
from .base import Backbone
from .registry import register_model
from .resnet import BasicBlock, ResidualBlock, make_shortcut

PATH_KINDS = ("basic", "ds", "skip")


@dataclass(frozen=True)
class PathCfg:
    """One alternative of a cell: ``basic`` (two 3x3 convs, hidden width ``ratio`` x out, + shortcut; ratio 1 is
    the ResNet basic block), ``ds`` (depthwise-separable k x k + shortcut) or ``skip`` (the shortcut alone)."""
    kind: str = "basic"
    ratio: float = 1.0
    kernel: int = 3

    def __post_init__(self):
        if self.kind not in PATH_KINDS:
            raise ValueError(f"path kind must be one of {PATH_KINDS}, got {self.kind!r}")
        if not self.ratio > 0 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"path ratio must be > 0 and kernel an odd int >= 1, got {self.ratio}, {self.kernel}")


DEFAULT_PATHS = (PathCfg("basic", 1.0), PathCfg("basic", 0.5), PathCfg("skip"))


@dataclass(frozen=True)
class SuperNetCfg:
    widths: tuple[int, ...] = (16, 32, 64)     # one stage per width; stages after the first halve the resolution
    cells_per_stage: int = 2
    paths: tuple[PathCfg, ...] = DEFAULT_PATHS
    in_chans: int = 3
    num_classes: int = 10
    budget: float = 0.5                        # target fraction of the full (most expensive path) MACs
    cost_weight: float = 4.0
    tau: tuple[float, float] = (1.0, 0.2)      # temperature of the router logits, annealed start -> end
    noise_until: float = 0.5                   # Gumbel noise fades linearly to 0 at this training progress
    cost_warmup: float = 0.2                   # the cost weight ramps up linearly over this training progress

    def __post_init__(self):
        check_budget(self.budget)
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {self.widths}")
        if self.cells_per_stage < 1:
            raise ValueError(f"cells_per_stage must be >= 1, got {self.cells_per_stage}")
        if not self.paths:
            raise ValueError("a cell needs at least one path")
        if self.cost_weight < 0 or min(self.tau) <= 0:
            raise ValueError(f"cost_weight must be >= 0 and tau > 0, got {self.cost_weight}, {self.tau}")
        if not 0 <= self.noise_until <= 1 or not 0 <= self.cost_warmup <= 1:
            raise ValueError(f"noise_until and cost_warmup must be in [0, 1], got {self.noise_until}, "
                             f"{self.cost_warmup}")


class ShortcutPath(nn.Module):
    """``act(shortcut(x))``: the cell skipped (identity, or the 1x1 projection where the shape changes)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.shortcut = make_shortcut(in_chs, out_chs, stride, "B", nn.BatchNorm2d)
        self.act = nn.ReLU()          # not in place: with an identity shortcut its input is the cell's input

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x))


def make_path(cfg: PathCfg, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    if cfg.kind == "skip":
        return ShortcutPath(in_chs, out_chs, stride)
    if cfg.kind == "basic" and cfg.ratio == 1.0:
        return BasicBlock(in_chs, out_chs, stride)
    if cfg.kind == "basic":
        hidden = max(1, round(out_chs * cfg.ratio))
        branch = nn.Sequential(ConvNormAct(in_chs, hidden, 3, stride=stride),
                               ConvNormAct(hidden, out_chs, 3, activation_layer=None))
    else:
        branch = nn.Sequential(DepthwiseSeparableConv(in_chs, out_chs, cfg.kernel, stride=stride, pw_act=False))
    return ResidualBlock(branch, in_chs, out_chs, stride, "B", nn.BatchNorm2d, nn.ReLU)


class RoutingCell(nn.Module):
    """P alternative paths and the router that picks one per sample.

    The paths share ONE shortcut module (the 1x1 projection where the shape changes): with a projection per path
    the cell's output lives in a different feature basis for every route, so the next cell sees incompatible
    features whenever routes differ, and a randomly routed super-network barely trains (measured: 17% vs 67%
    for path 0 alone after two epochs on ScaledMNIST). Shared, the paths differ only in their residual branch.
    """

    def __init__(self, paths: tuple[PathCfg, ...], in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.paths = nn.ModuleList(make_path(p, in_chs, out_chs, stride) for p in paths)
        shared = self.paths[0].shortcut
        for path in self.paths[1:]:
            path.shortcut = shared
        self.router = Router(in_chs, len(paths))


class RoutingSuperNet(Backbone):
    """Stem (3x3 conv) -> stages of :class:`RoutingCell` -> global pool -> linear.

    ``force(path)`` (a path index or None) sends every sample of every cell down that path: the network is then
    the static network ``static_path(p)`` (path 0 with the default paths: a ResNet of basic blocks).
    """

    def __init__(self, cfg: SuperNetCfg = SuperNetCfg()):
        super().__init__()
        self.cfg = cfg
        self.in_chans, self.num_classes = cfg.in_chans, cfg.num_classes
        self.budget, self.cost_weight = cfg.budget, cfg.cost_weight
        self.stem = ConvNormAct(cfg.in_chans, cfg.widths[0], 3)
        cells, c = [], cfg.widths[0]
        for i, w in enumerate(cfg.widths):
            for j in range(cfg.cells_per_stage):
                cells.append(RoutingCell(cfg.paths, c, w, 2 if i > 0 and j == 0 else 1))
                c = w
        self.cells = nn.ModuleList(cells)
        self.num_features = c
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c, cfg.num_classes))
        self.stage_info = []
        self.min_input_size = 2 ** (len(cfg.widths) - 1)
        # infer's choices: one-hot over the paths of each cell, cell-major
        self.decision_names = [f"cell{i}.path{p}" for i in range(len(cells)) for p in range(len(cfg.paths))]
        self.executor = Executor()
        self.tau = cfg.tau[0]
        self.progress = 1.0       # without set_progress (no schedule): full cost weight, no Gumbel noise
        self._force: int | None = None
        self._costs: dict[tuple, tuple[int, Tensor]] = {}
        self._expected: Tensor | None = None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # --- configuration --------------------------------------------------------------------------------------
    @property
    def num_paths(self) -> int:
        return len(self.cfg.paths)

    @property
    def forced(self) -> int | None:
        """The path every cell is forced to (None: the routers decide)."""
        return self._force

    def force(self, path: int | None) -> None:
        """Send every sample of every cell down ``path`` (None: the routers decide)
        (:class:`~dyncnn.dynamic.protocols.Forceable`)."""
        self._check_path(path)
        self._force = path

    def _check_path(self, path) -> None:
        if path is not None and (isinstance(path, bool) or not isinstance(path, int)
                                 or not 0 <= path < self.num_paths):
            raise ValueError(f"force expects None or a path index in 0..{self.num_paths - 1}, got {path!r}")

    def set_progress(self, progress: float) -> None:
        self.progress = min(max(float(progress), 0.0), 1.0)
        self.tau = anneal(progress, *self.cfg.tau)

    @property
    def noise_scale(self) -> float:
        """Scale of the Gumbel noise in training: 1 at the start, 0 from ``cfg.noise_until`` on.

        Without noise the training forward routes exactly as ``infer`` (argmax), so the paths' BatchNorm
        statistics and the downstream cells are trained on the routes inference takes.
        """
        until = self.cfg.noise_until
        return 0.0 if until <= 0 else max(0.0, 1.0 - self.progress / until)

    def _cost_weight(self) -> float:
        warm = self.cfg.cost_warmup
        return self.cost_weight * (1.0 if warm <= 0 else min(1.0, self.progress / warm))

    def static_path(self, path: int) -> nn.Sequential:
        """The static network that always takes ``path`` (shares this network's modules)."""
        if path is None:
            raise ValueError("static_path needs a path index, got None")
        self._check_path(path)
        return nn.Sequential(self.stem, *[c.paths[path] for c in self.cells], self.head)

    @torch.no_grad()
    def load_backbone(self, resnet: nn.Module) -> "RoutingSuperNet":
        """Start from a trained static ResNet (``resnet_cifar`` with one block per cell): its stem, blocks and
        classifier become the stem, path 0 (with the shared shortcuts) and head; narrower ``basic`` paths start
        as the blocks' leading channels. Fine-tuning the routers (and paths) from there keeps the backbone's
        accuracy far better than training the super-network from scratch."""
        from .moe import copy_leading
        blocks = list(resnet.blocks()) if hasattr(resnet, "blocks") else []
        if len(blocks) != len(self.cells):
            raise ValueError(f"load_backbone needs a ResNet with {len(self.cells)} blocks (one per cell), "
                             f"got {len(blocks)}")
        self.stem.load_state_dict(resnet.stem[0].state_dict())
        for cell, block in zip(self.cells, blocks):
            cell.paths[0].load_state_dict(block.state_dict())
            for cfg, path in zip(self.cfg.paths[1:], cell.paths[1:]):
                if cfg.kind == "basic":
                    copy_leading(block.branch, path.branch)
        self.head[2].load_state_dict(resnet.fc.state_dict())
        return self

    # --- cost -----------------------------------------------------------------------------------------------
    def cost_table(self, x: Tensor) -> tuple[int, Tensor]:
        """(MACs every sample pays: stem, routers, head; (cells, P) MACs of each path), per input shape."""
        key = tuple(x.shape[1:])
        if key not in self._costs:
            was = self.training
            self.eval()
            try:
                h = x[:1].detach()
                fixed = measure_macs(self.stem, h)
                h = self.stem(h)
                table = []
                for cell in self.cells:
                    fixed += measure_macs(cell.router, h)
                    table.append([measure_macs(p, h) for p in cell.paths])
                    h = cell.paths[0](h)
                fixed += measure_macs(self.head, h)
            finally:
                self.train(was)
            self._costs[key] = (fixed, torch.tensor(table, dtype=torch.float64))
        return self._costs[key]

    def full_macs(self, x: Tensor) -> int:
        """Per-sample MACs with the most expensive path in every cell."""
        fixed, table = self.cost_table(x)
        return int(fixed + table.max(1).values.sum())

    def regularization_loss(self) -> Tensor:
        weight = self._cost_weight()
        if self._expected is None or not weight:
            return torch.zeros(())
        return weight * budget_loss(self._expected[0], self._expected[1], self.budget)

    # --- execution ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.infer(x).logits
        x = self.check_input(x)
        fixed, table = self.cost_table(x)
        h = self.stem(x)
        expected = torch.full((x.shape[0],), float(fixed), dtype=x.dtype, device=x.device)
        for cell, cost in zip(self.cells, table.to(x.dtype).to(x.device)):
            logits = cell.router(h)
            if self._force is not None:
                g = torch.zeros_like(logits)
                g[:, self._force] = 1.0
            else:
                g = self._route(logits)
            expected = expected + g @ cost          # the executed cost, straight-through gradient to the router
            h = sum(g[:, p].view(-1, 1, 1, 1) * path(h) for p, path in enumerate(cell.paths))
        self._expected = (expected, float(self.full_macs(x)))
        return self.head(h)

    def _route(self, logits: Tensor) -> Tensor:
        """Straight-through one-hot of ``argmax(logits + noise_scale * Gumbel)``; the backward pass takes the
        gradient of ``softmax((logits + noise) / tau)``. Noise-free, the forward value is exactly infer's route."""
        scale = self.noise_scale
        if scale > 0:
            gumbel = -torch.empty_like(logits).exponential_().log()
            logits = logits + scale * gumbel
        soft = (logits / self.tau).softmax(1)
        hard = torch.zeros_like(soft).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
        return hard - soft.detach() + soft

    @torch.no_grad()
    def infer(self, x: Tensor) -> ExitResult:
        """Executed inference: each path runs only on the rows whose router chose it (argmax). ``choices`` is
        one-hot over the paths of each cell (:meth:`paths_taken` gives the indices); ``exit_index`` counts the
        cells in which a sample took path 0 (the full block)."""
        x = self.check_input(x)
        if self.training:     # never switch a shared model to eval and back (see MultiExitNetwork.infer)
            return eval_copy(self).infer(x)
        n = x.shape[0]
        ledger, rows, ex = CostLedger(n), torch.arange(n), self.executor
        h = ex.run(self.stem, x, rows, ledger)
        choices = torch.empty(n, len(self.cells), dtype=torch.int64)
        for i, cell in enumerate(self.cells):
            logits = ex.run(cell.router, h, rows, ledger)
            if self._force is not None:
                choice = torch.full((n,), self._force, dtype=torch.int64, device=h.device)
            else:
                choice = logits.argmax(1)
            choices[:, i] = choice.cpu()
            h = self._run_paths(cell, h, choice, rows, ledger)
        logits = ex.run(self.head, h, rows, ledger)
        one_hot = torch.nn.functional.one_hot(choices, len(self.cells[0].paths)).flatten(1)
        return ExitResult(logits, (choices == 0).sum(1), ledger.macs, one_hot)

    def paths_taken(self, result: ExitResult) -> Tensor:
        """The path index each sample took in each cell, (N, cells), from ``infer``'s one-hot ``choices``."""
        return result.choices.view(len(result), len(self.cells), -1).argmax(-1)

    def _run_paths(self, cell: RoutingCell, h: Tensor, choice: Tensor, rows: Tensor, ledger: CostLedger) -> Tensor:
        n = h.shape[0]
        order = torch.argsort(choice, stable=True)
        counts = torch.bincount(choice, minlength=len(cell.paths)).tolist()
        out = None
        for p, idx in enumerate(order.split(counts)):
            if not counts[p]:
                continue
            if counts[p] == n:
                return self.executor.run(cell.paths[p], h, rows, ledger)
            y = self.executor.run(cell.paths[p], take_rows(h, idx), rows[idx.cpu()], ledger)
            if out is None:
                out = empty_rows(y, n)
            put_rows(out, idx, y)
        return out

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
