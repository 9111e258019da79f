"""Conditional execution: run a stage on the rows of the batch that still need it, and account for its cost.

This is the one mechanism behind every dynamic model of dyncnn. A model's state between stages is a tensor, or a
(nested) tuple / list / dict of tensors whose first axis is the batch. The executor keeps only the rows that are
still active (exited samples *leave the batch*: the state is compacted, not masked), runs the stage on them, and
charges each of those samples the stage's cost in a per-sample :class:`CostLedger`.

A stage's cost is measured once per input shape with ``FlopCounterMode`` on a single-sample input (hidden from
any outer FlopCounterMode, so that a caller counting the whole call sees only the real work) and cached. Over a
whole call, the ledger's total equals what FlopCounterMode counts for that call.
"""
from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from ..errors import all_finite
from ..layers.fusion import put_rows, take_rows

State = Any   # a tensor or a pytree of tensors, batch-first


@dataclass
class ExitResult:
    """What a dynamic inference call returns, one entry per input sample.

    ``choices`` means the same in every family: (N, D) 0/1, one column per decision the model names in
    ``decision_names`` (1 = that block / channel group / expert / step / frame ran; a decision among several
    options, e.g. a routing cell's path, is one-hot over its options). Quantities that are not 0/1 decisions have
    their own fields: ``fractions`` (N, D), the share of positions each DynConv block computed (``choices`` is then
    whether it computed any), and ``masks``, DynConv's executed positions, bool (N, H, W) per gated block.
    """
    logits: Tensor       # (N, classes): the prediction each sample left with
    exit_index: Tensor   # (N,) which exit / how many steps each sample used
    macs: Tensor         # (N,) MACs each sample really used (int64)
    choices: Tensor | None = None   # (N, D) 0/1 per-sample decisions of gated models, see the class docstring
    fractions: Tensor | None = None     # (N, D) active share per decision where it is not 0/1 (DynConv)
    masks: list | None = None           # DynConv: the executed positions, bool (N, H, W) per gated block

    def __len__(self) -> int:
        return self.logits.shape[0]


class CostLedger:
    """Per-sample MAC accumulator.

    Charges of one value for every charged sample are kept as Python integers and folded into the (N,) tensor when
    ``macs`` is read, so that charging a stage issues no tensor operation: a charge to every sample adds to one
    integer, the charges to one ``rows`` tensor (a stage and its head on the samples still active) add to that
    tensor's integer. On a small network an eager ``index_add_`` per stage costs about as much as a saved
    convolution. A charged ``rows`` tensor must not be modified in place afterwards (the callers make a new one
    when the active set changes).
    """

    def __init__(self, batch_size: int):
        self._macs = torch.zeros(batch_size, dtype=torch.int64)
        self._everyone = 0                                          # MACs charged to every sample
        self._by_rows: dict[int, tuple[Tensor, int]] = {}           # id(rows) -> (rows, MACs per row)

    def charge(self, rows: Tensor, macs_per_sample: int | Tensor) -> None:
        """Add ``macs_per_sample`` (an int, or one value per row) to the samples ``rows`` (original indices)."""
        if isinstance(macs_per_sample, Tensor):       # data-dependent costs: one value per row, added now
            self._macs.index_add_(0, rows, macs_per_sample.to(torch.int64))
        elif rows.numel() == self._macs.numel():      # every sample (rows are distinct): no indexing needed
            self._everyone += int(macs_per_sample)
        else:
            held = self._by_rows.get(id(rows))         # the held reference keeps id(rows) from being reused
            self._by_rows[id(rows)] = (rows, int(macs_per_sample) + (held[1] if held is not None else 0))

    @property
    def macs(self) -> Tensor:
        """(N,) int64 MACs charged to each sample so far."""
        if len(self._by_rows) == 1:
            (rows, macs), = self._by_rows.values()
            self._macs.index_add_(0, rows, torch.full((rows.numel(),), macs, dtype=torch.int64))
        elif self._by_rows:       # one index_add_ for all of them (an MoE layer charges each expert's rows)
            held = list(self._by_rows.values())
            rows = torch.cat([r for r, _ in held])
            macs = torch.tensor([m for _, m in held]).repeat_interleave(torch.tensor([r.numel() for r, _ in held]))
            self._macs.index_add_(0, rows, macs)
        if self._everyone:
            self._macs += self._everyone
        self._everyone, self._by_rows = 0, {}
        return self._macs

    @property
    def total(self) -> int:
        return int(self.macs.sum())


def batch_size_of(state: State) -> int:
    leaves = [t for t in tree_flatten(state)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise ValueError("the state holds no tensor")
    return leaves[0].shape[0]


def select_rows(state: State, rows: Tensor | slice) -> State:
    """The state restricted to ``rows`` (indices or a boolean mask into the current batch, or a slice).

    A mask is turned into indices once for the whole state, not once per tensor of it."""
    if isinstance(rows, Tensor):
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        return tree_map(lambda t: take_rows(t, rows.to(t.device)) if isinstance(t, Tensor) and t.dim() > 0
                        else t, state)
    return tree_map(lambda t: t[rows] if isinstance(t, Tensor) and t.dim() > 0 else t, state)


_CONSTANTS = (type(None), bool, int, float, str)


def _nested_key(state: State) -> tuple:
    """The key of a state made of tensors, constants, and plain dicts, lists and tuples of them (a cut backbone's
    named values, multi-scale features, RANet's flows, a stage's state with the previous exit's logits), built
    without flattening and printing a TreeSpec (tens of microseconds a stage, as much as a small convolution);
    raises TypeError for anything else."""
    if isinstance(state, Tensor):
        return (tuple(state.shape[1:]), state.dtype)
    kind = type(state)
    if kind is dict:
        return ("dict",) + tuple((k, _nested_key(v)) for k, v in state.items())
    if kind is list or kind is tuple:
        return (kind.__name__,) + tuple(_nested_key(v) for v in state)
    if kind in _CONSTANTS:
        return ("const", repr(state))
    raise TypeError(kind.__name__)


def _shape_key(state: State) -> tuple:
    if isinstance(state, Tensor):             # the common case, without recursion (cheap at batch 1)
        return (tuple(state.shape[1:]), state.dtype)
    try:
        return _nested_key(state)
    except TypeError:                         # other containers (named tuples, dataclasses): the generic pytree
        leaves, spec = tree_flatten(state)
        return (str(spec),) + tuple((tuple(t.shape[1:]), t.dtype) if isinstance(t, Tensor) else repr(t)
                                    for t in leaves)


def measure_macs(fn: Callable[[State], Any], state: State) -> int:
    """MACs of ``fn`` on the first sample of ``state``, invisible to any FlopCounterMode already active."""
    one = select_rows(state, slice(0, 1))
    with _disable_current_modes(), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            fn(one)
    return counter.get_total_flops() // 2


class Executor:
    """Runs stages on active rows and charges their measured per-sample cost to a ledger.

    ``cost_fn(stage, state)``, when a stage defines it (``stage.dynamic_cost(state) -> Tensor (rows,)``), is used
    instead of the cached measurement for stages whose cost depends on the data.
    """

    def __init__(self):
        # per stage (weakly held, so a freed module's id cannot be mistaken for a new one's), per input shape
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._by_id: dict[tuple, int] = {}     # stages that cannot be weakly referenced

    def stage_macs(self, stage: Callable, state: State) -> int:
        shape = _shape_key(state)
        owner = stage
        if inspect.ismethod(stage):      # a bound method is a new object at every access: key by (object, function)
            owner, shape = stage.__self__, (stage.__func__,) + shape
        try:
            per_shape = self._cache.setdefault(owner, {})
        except TypeError:
            per_shape, shape = self._by_id, (id(owner),) + shape
        if shape not in per_shape:
            per_shape[shape] = measure_macs(stage, state)
        return per_shape[shape]

    def run(self, stage: Callable[[State], Any], state: State, rows: Tensor, ledger: CostLedger) -> Any:
        """``stage(state)`` for the active ``rows`` (original sample indices of the state's rows)."""
        if rows.numel() == 0:
            raise ValueError("Executor.run called with no active rows")
        out = stage(state)
        ledger.charge(rows, self.stage_macs(stage, state))
        return out

    def run_where(self, stage: Callable[[Tensor], Tensor], state: Tensor, take: Tensor, rows: Tensor,
                  ledger: CostLedger, otherwise: Tensor, overwrite: bool = False) -> Tensor:
        """Run ``stage`` only on the rows of ``state`` where ``take`` is True (gather -> run -> scatter).

        The other rows get ``otherwise`` (same shape as the stage's output for every row, e.g. the input itself
        for a skipped residual block). Only the rows that ran are charged. ``rows`` are the original sample
        indices of the state's rows. Nothing runs when no row takes the stage. ``overwrite=True``: the results
        are written into ``otherwise`` in place (the caller owns it, no one else holds it and it is not needed
        afterwards), which saves copying the whole of it for a scatter of the rows that ran.
        """
        if take.dtype != torch.bool:       # (attribute checks: a no-op .to() / .cpu() still goes through dispatch)
            take = take.to(torch.bool)
        if take.shape != (state.shape[0],):
            raise ValueError(f"take must be a boolean vector of length {state.shape[0]}, got {tuple(take.shape)}")
        take_cpu = take if take.device.type == "cpu" else take.cpu()
        taken = int(take_cpu.sum())         # one op and one read where all() and any() take two of each
        if taken == len(take_cpu):
            return self.run(stage, state, rows, ledger)
        if not taken:
            return otherwise
        idx = take_cpu.nonzero().squeeze(1)
        out = self.run(stage, take_rows(state, idx.to(state.device)), rows[idx], ledger)
        idx = idx.to(otherwise.device)
        if overwrite and out.dtype == otherwise.dtype:
            return put_rows(otherwise, idx, out)
        return put_rows(otherwise.clone(), idx, out.to(otherwise.dtype))

    def clear(self) -> None:
        self._cache.clear()
        self._by_id.clear()


def early_exit_inference(stages: list[Callable], heads: list[Callable], x: State, exit_fn: Callable[[int, Tensor], Tensor],
                         executor: Executor, num_classes: int | None = None) -> ExitResult:
    """The early-exit loop: after stage k, head k scores the active samples; those with ``exit_fn(k, logits)``
    True leave the batch with those logits; the rest continue. The last exit takes everyone left.

    ``stages[k]: state -> state`` and ``heads[k]: state -> logits``. Samples are compacted out of the state as
    they exit, so later stages run on fewer rows.
    """
    n = batch_size_of(x)
    ledger = CostLedger(n)
    rows = torch.arange(n)
    exit_index = torch.full((n,), len(stages) - 1, dtype=torch.int64)
    if n == 0:
        return ExitResult(torch.zeros(0, num_classes or 0), exit_index, ledger.macs)
    logits_out: Tensor | None = None
    state = x
    for k, (stage, head) in enumerate(zip(stages, heads)):
        state = executor.run(stage, state, rows, ledger)
        logits = executor.run(head, state, rows, ledger)
        if not all_finite(logits):
            raise FloatingPointError(f"exit {k} produced NaN/Inf logits for {int((~torch.isfinite(logits)).any(1).sum())}"
                                     f" samples; refusing to take an exit decision on them")
        if k == len(stages) - 1:
            done_cpu = None                  # everyone left leaves here
        else:                                # the bookkeeping (rows, ledger, exit index) lives on the CPU
            done_cpu = exit_fn(k, logits).cpu()
            if not bool(done_cpu.any()):     # nobody leaves: nothing to record, the state and rows stay as they are
                continue
            if bool(done_cpu.all()):
                done_cpu = None
        if done_cpu is None:                 # every active sample leaves at exit k
            if len(rows) == n:               # ... and that is the whole batch: its logits are the result
                return ExitResult(logits, exit_index.fill_(k), ledger.macs)
            leaving, leaving_rows = logits, rows
        else:
            leaving, leaving_rows = logits[done_cpu.to(logits.device)], rows[done_cpu]
        if logits_out is None:
            logits_out = logits.new_zeros(n, logits.shape[1])
        logits_out.index_copy_(0, leaving_rows.to(logits.device), leaving)
        exit_index[leaving_rows] = k
        if done_cpu is None:
            break
        stay = (~done_cpu).nonzero().squeeze(1)
        state = select_rows(state, stay)
        rows = rows[stay]
    return ExitResult(logits_out, exit_index, ledger.macs)


class Stage(nn.Module):
    """Wrap a plain callable as a module (so it can live in an ``nn.ModuleList``)."""

    def __init__(self, fn: Callable[[State], Any]):
        super().__init__()
        self.fn = fn

    def forward(self, state: State) -> Any:
        return self.fn(state)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module without any)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def eval_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model``: what ``infer`` runs on when called on a model in training mode, so that
    a model shared between threads is never switched to eval and back (see ``MultiExitNetwork.infer``)."""
    with torch.no_grad():     # cached views made under no_grad (e.g. sliced weights) cannot be copied with grad on
        return copy.deepcopy(model).eval()
