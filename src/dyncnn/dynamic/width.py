"""Channel gating (dynamic width): per-sample gates over groups of a block's hidden channels, executed for real.

A light gate per block (global average pool of the block input -> linear) decides how many of the block's hidden
channels a sample uses: the hidden channels of a ResNet basic / bottleneck branch, or the expansion of an
inverted residual. Training uses straight-through Gumbel gates (``HardGate``) and multiplies the dense hidden maps
by the 0/1 channel mask (allowed in training only); the budget loss acts on the differentiable MAC fraction.

**How a batch with different choices is executed.** The gates are constrained to *nested prefixes*: the hidden
channels are split into ``G`` equal groups, group 0 always runs, and group ``g`` can only be on if groups < g are
(the mask is a cumulative product of ``G - 1`` hard gates). A sample's decision per block is therefore a width
level ``l`` in 1..G (the "slimmable" form), and the block for level ``l`` is the same block with sliced weights:
the hidden-producing convolutions keep their first ``c = l * C / G`` output channels (``W[:c]``, a depthwise
conv ``W[:c]`` with ``groups = c``) and the convolution after them reads only those (``W[:, :c]``). At inference
the samples of a batch are grouped by level (at most ``G`` groups per block, a loop over levels, never over
samples): each group is gathered, run through its sliced block, and scattered back; a :class:`CostLedger` charges
every sample the MACs of the level it ran, measured once per level and input shape by the :class:`Executor` with
FlopCounterMode (so the ledger equals what FlopCounterMode counts for the call; the tests check it).

Why not arbitrary channel patterns: with ``G`` groups there are ``2^G`` patterns, so a batch would split into many
small sub-batches, and each pattern needs a gather of weight slices (non-contiguous) as well as of rows. Nested
levels keep every executed convolution dense, contiguous and at most ``G`` per block, and make the per-sample
cost of a decision exact and cheap to account (one measured MAC count per level). The price is expressiveness
(which channels are kept is learned by the weights, not chosen per sample), which is the trade-off
slimmable networks and the runtime-pruning literature accept for real speedups.

The first group always runs: a block that drops all its hidden channels is layer skipping, the SkipNet module's
job. Inference-mode normalisation (running statistics) is used by the sliced path; ``infer`` requires eval mode.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial, reduce

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import check_image_batch
from ..layers.fusion import take_rows
from ..layers.gates import HardGate, anneal, budget_loss, check_budget, layer_bounds_loss
from .blocks import ResidualBranchBlock
from .executor import CostLedger, Executor, ExitResult, eval_copy
from .protocols import check_gate_flag


# --- blocks: which convolutions produce the hidden channels, and how the branch meets the shortcut ------------

def block_units(block: nn.Module) -> list[nn.Module]:
    """The conv-norm-act units of a gateable block in order; all but the last produce the hidden channels."""
    if isinstance(block, ResidualBranchBlock):
        return block.branch_units()
    raise TypeError(f"cannot gate the channels of a {type(block).__name__}: it does not describe its branch "
                    f"(dyncnn.dynamic.blocks.ResidualBranchBlock)")


def is_gateable(block: nn.Module) -> bool:
    """Blocks that describe their branch and whose hidden channels may be sliced: ResNet residual blocks with >= 2
    units; inverted residuals with an expansion and no squeeze-excitation (SE pools over the hidden channels,
    which would need its own slicing)."""
    return isinstance(block, ResidualBranchBlock) and block.channel_gateable


def combine(block: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """The block's output from its input ``x`` and its branch output ``out`` (same ops as the static forward)."""
    return block.merge(x, out)


def sliced_ops(unit: nn.Sequential, c_in: int, c_out: int | None) -> list:
    """A conv-norm-act ``unit`` as a list of callables that read the first ``c_in`` of its input channels and keep
    its first ``c_out`` output channels (None: all); a depthwise conv keeps ``c_in``. A cut convolution weight is a
    dense copy in the weight's own memory layout (a strided view would be reordered by oneDNN on every call), so
    the caller re-slices when the unit's tensors change (:meth:`LevelStage.__call__` keys on their versions); norms
    use their running statistics, with the very call ``F.batch_norm`` makes, so that the full level reproduces the
    static block bit for bit."""
    ops = []
    for m in unit:
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise ValueError(f"sliced execution supports zero padding only, got {m.padding_mode!r}")
            if m.groups == 1:
                w, groups = m.weight[:c_out, :c_in], 1
            elif m.groups == m.in_channels == m.out_channels:
                w, groups = m.weight[:c_in], c_in
            else:
                raise ValueError(f"sliced execution supports dense and depthwise convs, got groups={m.groups}")
            c_in = w.shape[0]
            if not w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last):
                cl = m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                w = w.detach().contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            b = None if m.bias is None else m.bias[:c_in]
            ops.append(partial(_conv, w=w, b=b, args=(m.stride, m.padding, m.dilation, groups)))
        elif isinstance(m, nn.BatchNorm2d):
            k = c_in
            ops.append(partial(_bn, args=(None if m.weight is None else m.weight[:k],
                                          None if m.bias is None else m.bias[:k],
                                          m.running_mean[:k], m.running_var[:k], False, 0.0, m.eps)))
        else:
            ops.append(m)
    return ops


def _conv(y: Tensor, w: Tensor, b: Tensor | None, args: tuple) -> Tensor:
    return torch.conv2d(y, w, b, *args)


def _bn(y: Tensor, args: tuple) -> Tensor:
    return torch.batch_norm(y, *args, torch.backends.cudnn.enabled)


class LevelStage:
    """A block at width level ``level`` (1..groups): its hidden convolutions cut to the first
    ``c = level * hidden / groups`` channels, every convolution dense and contiguous in its channels.

    The cut weights are prepared on the first call and again when a convolution's weight moves (``.to()``) or is
    changed in place (a training step): the key is each weight's storage and version."""

    def __init__(self, block: nn.Module, hidden: int, groups: int, level: int):
        self.block, self.level, self.c = block, level, level * hidden // groups
        self._units = block_units(block)
        self._first = [next(iter(u._modules)) for u in self._units]     # each unit's conv, read live by name
        self._ops: list[list] | None = None
        self._key: tuple = ()

    def _prepare(self) -> None:
        first = self._units[0][0]
        c_in, ops = first.in_channels, []
        for unit in self._units[:-1]:
            ops.append(sliced_ops(unit, c_in, self.c))
            c_in = self.c
        ops.append(sliced_ops(self._units[-1], c_in, None))
        self._ops, self._key = ops, self._weights_key()

    def _weights_key(self) -> tuple:                # on every call: dict lookups, not Sequential indexing
        ws = [u._modules[k].weight for u, k in zip(self._units, self._first)]
        return tuple((w.data_ptr(), w._version) for w in ws)

    def reset(self) -> None:
        self._ops = None

    def __deepcopy__(self, memo: dict) -> "LevelStage":
        # the copy slices its own block's tensors on its first call; the cached views are not copied (a view made
        # under no_grad refuses deepcopy once its base has changed in place)
        new = copy.copy(self)
        memo[id(self)] = new
        new.block = copy.deepcopy(self.block, memo)
        new._units, new._ops, new._key = block_units(new.block), None, ()
        new._first = [next(iter(u._modules)) for u in new._units]
        return new

    def __call__(self, x: Tensor) -> Tensor:
        if self._ops is None or self._weights_key() != self._key:
            self._prepare()
        y = x
        for unit in self._ops:
            for op in unit:
                y = op(y)
        return combine(self.block, x, y)


def run_block_masked(block: nn.Module, x: Tensor, channel_mask: Tensor) -> Tensor:
    """The dense block with every hidden map multiplied by ``channel_mask`` (N, hidden): the training path."""
    units = block_units(block)
    m = channel_mask[:, :, None, None]
    y = x
    for unit in units[:-1]:
        y = unit(y) * m
    return combine(block, x, units[-1](y))


# --- the gate --------------------------------------------------------------------------------------------------

class ChannelGate(nn.Module):
    """Global average pool of the block input -> linear -> ``groups - 1`` logits (groups 1..G-1; group 0 always
    runs). The mask is nested: group g is on only if every gate up to g is on."""

    def __init__(self, in_chs: int, groups: int, init_bias: float = 3.0, tau: float = 1.0):
        super().__init__()
        self.groups = groups
        self.fc = nn.Linear(in_chs, groups - 1)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.constant_(self.fc.bias, init_bias)   # start (almost) full width: fine-tuning from a static net
        self.gate = HardGate(tau)
        self.noise = 1.0   # scale of the Gumbel noise in training (annealed by the model's set_progress)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))

    def group_masks(self, logits: Tensor) -> Tensor:
        """(N, G) nested 0/1 group masks (straight-through in training).

        In training the logits are divided by ``noise``: the hard decision ``logit + noise * logistic >= 0``
        gets less random as ``noise`` anneals, so that the MAC fraction the budget loss sees in training
        converges to the one the deterministic inference decisions (``logit >= 0``) give."""
        on = torch.cumprod(self.gate(logits / self.noise if self.training else logits), 1)
        return torch.cat([on.new_ones(on.shape[0], 1), on], 1)

    def levels(self, logits: Tensor) -> Tensor:
        """(N,) width level in 1..G (the number of groups on): the eval-mode decisions of ``group_masks``."""
        if self.gate.force is not None:
            return torch.full(logits.shape[:1], self.groups if self.gate.force else 1, dtype=torch.long,
                              device=logits.device)
        return (logits >= 0).long().cumprod(1).sum(1) + 1


@dataclass
class WidthCosts:
    """Per-sample MACs for one input shape: the ungated part (stem, ungated blocks, gates, head) and, per gated
    block, the MACs of each width level 1..G."""
    static: int
    levels: list[Tensor]   # per gated block, (G,) int64

    @property
    def full(self) -> int:
        return self.static + sum(int(c[-1]) for c in self.levels)

    def __post_init__(self):
        self.table = torch.stack(self.levels)   # (gated blocks, G) MACs of each level


def _tail(backbone: nn.Module, h: Tensor) -> Tensor:
    head_conv = getattr(backbone, "conv_head", None)
    return backbone.forward_head(h if head_conv is None else head_conv(h))


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton's knowledge distillation: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean.

    Why: fine-tuning a gated net from its static backbone, the static net's soft targets tell the narrowed paths
    what the full-width features computed (the inplace distillation of slimmable networks), a far richer signal
    than the labels alone on a small training set. ``teacher`` is detached; the ``T^2`` keeps the gradient scale
    independent of ``T``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    t = F.log_softmax(teacher.detach() / temperature, 1)
    s = F.log_softmax(student / temperature, 1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


# --- the network -----------------------------------------------------------------------------------------------

class ChannelGatedNet(nn.Module):
    """A ResNet or MobileNet backbone whose blocks' hidden widths are chosen per sample.

    ``backbone`` is used as is (its weights are shared; ``model.backbone`` loads a static checkpoint). ``groups``
    channel groups per gated block; ``budget`` the target fraction of the full MACs; the cost loss is
    ``cost_weight * budget_loss`` plus ``bounds_weight * layer_bounds_loss`` (DynConv's annealed per-block
    bounds). The Gumbel temperature anneals from ``tau`` to ``tau_end`` and the Gumbel noise scale from 1 to
    ``noise_end`` over training (``set_progress``). ``budget_ramp`` in [0, 1): the budget loss's target falls
    linearly from 1 (full width, where fine-tuning starts) to ``budget`` over that fraction of training, so that
    the gates narrow gradually instead of every block dropping to its narrowest level in the first steps.
    ``set_teacher`` adds distillation from a static model to ``training_loss``.
    """

    def __init__(self, backbone: nn.Module, groups: int = 4, budget: float = 0.5, cost_weight: float = 10.0,
                 bounds_weight: float = 0.0, tau: float = 1.0, tau_end: float = 0.5, noise_end: float = 0.1,
                 gate_init_bias: float = 3.0, budget_ramp: float = 0.0):
        super().__init__()
        self.budget = check_budget(budget)
        if not 0 <= budget_ramp < 1:
            raise ValueError(f"budget_ramp must be in [0, 1), got {budget_ramp!r}")
        self.budget_ramp = float(budget_ramp)
        self._teacher: tuple = ()          # (module, weight, temperature); a tuple keeps it out of state_dict
        self._teacher_logits: Tensor | None = None
        if not 0 < noise_end <= 1:
            raise ValueError(f"noise_end must be in (0, 1], got {noise_end!r}")
        self.noise_end = float(noise_end)
        self.cost_weight, self.bounds_weight, self.tau, self.tau_end = cost_weight, bounds_weight, tau, tau_end
        self.backbone = backbone
        self.num_classes, self.in_chans = backbone.num_classes, backbone.in_chans
        blocks = [(f"stages.{i}.{j}", b) for i, stage in enumerate(backbone.stages) for j, b in enumerate(stage)]
        gated = [(p, b) for p, b in blocks if is_gateable(b)]
        if not gated:
            raise ValueError(f"{type(backbone).__name__} has no block whose hidden channels can be gated")
        hidden = [block_units(b)[0][0].out_channels for _, b in gated]
        common = reduce(math.gcd, hidden)
        allowed = [d for d in range(2, common + 1) if common % d == 0]
        if isinstance(groups, bool) or not isinstance(groups, int) or groups not in allowed:
            raise ValueError(f"groups must divide the hidden channels of every gated block {sorted(set(hidden))}: "
                             f"one of {allowed}, got {groups!r}")
        self.groups = groups
        self.gated_paths = [p for p, _ in gated]
        self.gates = nn.ModuleList(ChannelGate(block_units(b)[0][0].in_channels, groups, gate_init_bias, tau)
                                   for _, b in gated)
        index = {id(b): k for k, (_, b) in enumerate(gated)}
        # Plain lists (not submodules): the blocks stay registered once, under ``backbone``.
        self._plan = [(b, index.get(id(b)), None if id(b) not in index else self.gates[index[id(b)]])
                      for _, b in blocks]
        # One persistent callable per (block, level): the executor caches measured MACs by stage identity.
        self._level_fns = [[LevelStage(b, h, groups, lvl) for lvl in range(1, groups + 1)]
                           for (_, b), h in zip(gated, hidden)]
        self._tail = partial(_tail, backbone)
        self.executor = Executor()
        self._costs: dict[tuple, WidthCosts] = {}
        self._last: tuple[Tensor, list[Tensor], int] | None = None
        self._progress = 0.0

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() replace the tensors: drop the sliced views and the measured costs (dtype, device)
        for fns in self._level_fns:
            for stage in fns:
                stage.reset()
        self._costs.clear()
        return super()._apply(fn, *args, **kwargs)

    # -- bookkeeping --------------------------------------------------------------------------------------------
    @property
    def decision_names(self) -> list[str]:
        return [f"{p}.g{g}" for p in self.gated_paths for g in range(self.groups)]

    def force(self, force: bool | None) -> None:
        """Pin every gate on (True: the static backbone), to the narrowest level (False), or free (None)
        (:class:`~dyncnn.dynamic.protocols.Forceable`)."""
        check_gate_flag(force)
        for g in self.gates:
            g.gate.force = force

    def set_progress(self, progress: float) -> None:
        self._progress = float(progress)
        for g in self.gates:
            g.gate.set_tau(anneal(progress, self.tau, self.tau_end))
            g.noise = anneal(progress, 1.0, self.noise_end)

    def current_budget(self) -> float:
        """The budget loss's target at the current training progress (see ``budget_ramp``)."""
        if self.budget_ramp == 0 or self._progress >= self.budget_ramp:
            return self.budget
        return 1.0 - (1.0 - self.budget) * self._progress / self.budget_ramp

    def set_teacher(self, teacher: nn.Module | None, weight: float = 0.5, temperature: float = 4.0) -> None:
        """Distil from ``teacher`` (e.g. the static backbone before fine-tuning; None removes it): in training
        forwards the teacher runs in eval mode without gradients, and ``training_loss`` becomes
        ``(1 - weight) * CE + weight * distillation_loss``. The teacher is not a submodule (not saved)."""
        if teacher is None:
            self._teacher = ()
            return
        if not 0 <= weight <= 1:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self._teacher = (teacher, float(weight), float(temperature))

    def training_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy, mixed with distillation to the teacher's logits of the same training forward when a
        teacher is set (the Trainer calls this hook in training steps)."""
        ce = F.cross_entropy(outputs, target)
        t = self._teacher_logits
        if not self._teacher or t is None or t.shape != outputs.shape:
            return ce
        _, w, temp = self._teacher
        return (1 - w) * ce + w * distillation_loss(outputs, t, temp)

    def _check(self, x: Tensor, finite: bool) -> Tensor:
        check_image_batch(x, self.in_chans, check_finite=finite)
        return self.backbone.check_input(x)

    def cost_table(self, x: Tensor) -> WidthCosts:
        """Per-sample MACs of every part for inputs shaped like ``x``, measured once (FlopCounterMode, hidden
        from any outer counter) and cached."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._costs:
            modes = [(m, m.training) for m in self.modules()]
            self.eval()
            try:
                with _disable_current_modes(), torch.no_grad():
                    ex, h = self.executor, x[:1].detach()
                    static = ex.stage_macs(self.backbone.stem, h)
                    h = self.backbone.stem(h)
                    levels = []
                    for block, k, gate in self._plan:
                        if k is None:
                            static += ex.stage_macs(block, h)
                        else:
                            static += ex.stage_macs(gate, h)
                            levels.append(torch.tensor([ex.stage_macs(fn, h) for fn in self._level_fns[k]]))
                        h = block(h)
                    static += ex.stage_macs(self._tail, h)
            finally:
                for m, mode in modes:
                    m.training = mode
            self._costs[key] = WidthCosts(static, levels)
        return self._costs[key]

    def full_macs(self, x: Tensor) -> int:
        """Per-sample MACs with every group of every block on (gates included)."""
        return self.cost_table(self._check(x, finite=False)).full

    # -- training path: dense, masked ----------------------------------------------------------------------------
    def dense_forward(self, x: Tensor) -> Tensor:
        """Every block computed densely, hidden channels multiplied by the gates' masks. The training forward
        (straight-through gates, differentiable MAC count for the budget loss); in eval mode the reference that
        the executed path must match."""
        costs = self.cost_table(x)
        h = self.backbone.stem(x)
        used = x.new_full((x.shape[0],), float(costs.static))
        fractions = []
        for block, k, gate in self._plan:
            if k is None:
                h = block(h)
                continue
            masks = gate.group_masks(gate(h))                     # (N, G) nested
            level_onehot = masks - F.pad(masks[:, 1:], (0, 1))    # (N, G): 1 at the chosen level
            lv_costs = costs.levels[k].to(masks)
            cost = level_onehot @ lv_costs
            used = used + cost
            fractions.append(cost / lv_costs[-1])
            h = run_block_masked(block, h, masks.repeat_interleave(block_units(block)[0][0].out_channels
                                                                   // self.groups, 1))
        self._last = (used, fractions, costs.full)
        return self._tail(h)

    def regularization_loss(self) -> Tensor:
        """The cost term of the last dense forward: distance of the mean MAC fraction to the budget."""
        if self._last is None:
            return torch.zeros(())
        used, fractions, full = self._last
        budget = self.current_budget()
        loss = self.cost_weight * budget_loss(used, full, budget)
        if self.bounds_weight:
            loss = loss + self.bounds_weight * layer_bounds_loss(fractions, budget, self._progress)
        return loss

    def mac_fraction(self) -> float:
        """Mean MAC fraction of the last dense forward (for logging)."""
        return float("nan") if self._last is None else float(self._last[0].detach().mean()) / self._last[2]

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            x = self._check(x, finite=False)
            self._teacher_logits = None
            if self._teacher:
                teacher = self._teacher[0]
                was = teacher.training
                with torch.no_grad():
                    self._teacher_logits = teacher.eval()(x)
                teacher.train(was)
            return self.dense_forward(x)
        return self.infer(x).logits

    # -- inference path: executed --------------------------------------------------------------------------------
    def _run_levels(self, k: int, h: Tensor, levels: Tensor, perm: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Run block ``k`` on each row at its width level (``levels``, (rows,) on the CPU, in ``h``'s row order).

        The rows are sorted by level once (a stable sort, one gather), so that each level's sliced block runs on a
        contiguous slice (a view) and the results are concatenated in that order: the output is *not* scattered
        back. ``perm`` says which sample each row of ``h`` holds (None: row i is sample i); the returned
        permutation says it for the output. A loop over the (at most G) levels present, never over samples."""
        fns, chosen = self._level_fns[k], levels.tolist()
        counts = [chosen.count(lvl) for lvl in range(self.groups + 1)]   # (a few levels: cheaper than an op)
        if max(counts) == len(chosen):        # one level for every row: no gather
            return fns[chosen[0] - 1](h), perm
        order = torch.argsort(levels, stable=True)
        h = take_rows(h, order.to(h.device))
        ys, start = [], 0
        for lvl, count in enumerate(counts):
            if count:
                ys.append(fns[lvl - 1](h.narrow(0, start, count)))
                start += count
        return torch.cat(ys), (order if perm is None else perm[order])

    def _check_levels(self, levels: Tensor, n: int) -> Tensor:
        shape = (n, len(self.gates))
        if not isinstance(levels, Tensor) or tuple(levels.shape) != shape or levels.is_floating_point() \
                or int(levels.min()) < 1 or int(levels.max()) > self.groups:
            got = tuple(levels.shape) if isinstance(levels, Tensor) else type(levels).__name__
            raise ValueError(f"levels must be an integer tensor of shape {shape} (samples, gated blocks) with "
                             f"values in 1..{self.groups}, got {got}")
        return levels.cpu().long()

    @torch.no_grad()
    def infer(self, x: Tensor, levels: Tensor | None = None) -> ExitResult:
        """Executed inference: per block, the gate picks a width level per sample and only that level's sliced
        convolutions run on that sample. ``choices`` (N, blocks * G): 1 where a channel group ran;
        ``exit_index``: the number of channel groups a sample used over the network.

        ``levels`` (N, gated blocks), optional, overrides the gates' decisions (the gates still run and are
        charged), e.g. to benchmark a given mix of widths.
        """
        if self.training:     # never switch a shared model to eval and back (see MultiExitNetwork.infer)
            return eval_copy(self).infer(x, levels)
        x = self._check(x, finite=True)
        forced = None if levels is None else self._check_levels(levels, x.shape[0])
        costs = self.cost_table(x)
        h = self.backbone.stem(x)
        chosen = []
        perm = None            # row i of h holds sample perm[i] (None: sample i); see _run_levels
        for block, k, gate in self._plan:
            if k is None:
                h = block(h)
                continue
            gate_logits = gate(h)       # runs (and is charged) even when ``levels`` overrides its decision
            if forced is None:
                lv = gate.levels(gate_logits).cpu()
            else:
                lv = forced[:, len(chosen)] if perm is None else forced[perm, len(chosen)]
            chosen.append(lv if perm is None else torch.empty_like(lv).index_copy_(0, perm, lv))
            h, perm = self._run_levels(k, h, lv, perm)
        logits = self._tail(h)
        if perm is not None:   # back to the samples' order
            logits = torch.empty_like(logits).index_copy_(0, perm.to(logits.device), logits)
        lv = torch.stack(chosen, 1)                                           # (N, gated blocks)
        # Every sample pays the ungated part (stem, ungated blocks, all gates, head) and, in each gated block, the
        # MACs of the level it ran: measured once per level with FlopCounterMode (``cost_table``).
        ledger = CostLedger(x.shape[0])
        ledger.charge(torch.arange(x.shape[0]), costs.static + costs.table.gather(1, lv.T - 1).sum(0))
        choices = (torch.arange(self.groups) < lv[..., None]).flatten(1).float()
        return ExitResult(logits, lv.sum(1), ledger.macs, choices)


@torch.no_grad()
def recalibrate_norms(model: ChannelGatedNet, batches) -> None:
    """Re-estimate every BatchNorm's running statistics under the inference decisions (gates thresholded, no
    noise), averaged over ``batches`` (an iterable of input tensors or (input, target) pairs).

    Fine-tuning with noisy gates leaves running statistics averaged over widths that inference does not pick;
    slimmable networks recalibrate their norms per width for the same reason. Cheap: forward passes only.
    """
    was = model.training
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    model.train()
    for g in model.gates:
        g.eval()                      # thresholded decisions, as in inference
    for m in norms:
        m.reset_running_stats()
        m.momentum = None             # cumulative average over all batches
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model.dense_forward(model._check(x, finite=False))
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.train(was)
