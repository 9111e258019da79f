"""Layer skipping, executed: per-sample decisions over the residual blocks of a backbone (SkipNet, BlockDrop).

A backbone is read as ``stem -> blocks -> head``: the residual blocks of a ResNet (``ResNet.blocks()``) or the
inverted-residual blocks of a MobileNet (``stages`` flattened; the 1x1 head convolution belongs to the head). A
block can be *skipped* only when its output has the shape of its input (a ResNet block with an identity shortcut,
an inverted residual with ``has_skip``): a skipped block's output is its input. The other blocks (the first
block of a stage, which changes width or stride) always run, as in SkipNet; ``gated_blocks`` names blocks by
their index in execution order and must name skippable ones.

Why a common base: SkipNet decides block by block from the running features, BlockDrop decides every block up
front from a policy network, but both run the same loop. :class:`LayerSkipNetwork` owns that loop twice:

- ``_dense(x, decide)`` for training: every block runs on the whole batch and the decision ``g`` (0/1 with a
  straight-through or REINFORCE gradient) masks it, ``h = g * block(h) + (1 - g) * h``, and the per-sample MACs
  implied by the decisions are returned as a differentiable sum (``fixed + sum_k g_k * macs_k``);
- ``infer(x)`` for inference: the decision selects the rows that run a block
  (``Executor.run_where(block, h, take, ...)``, the others keep ``h``), so a skipped block is not computed, and
  the ledger charges each sample what ran for it: stem, head, the blocks it ran, and the decision machinery
  (gates, policy network), every piece measured once per shape with ``FlopCounterMode``.

``force(True)`` runs every block without running the gates or the policy: exactly the static backbone.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import check_image_batch
from .blocks import ResidualBranchBlock
from .executor import CostLedger, Executor, ExitResult, eval_copy, measure_macs
from .protocols import check_gate_flag

Decide = Callable[[int, Tensor], Tensor]   # (gated position j, block input h) -> (N,) decision in {0, 1}


def is_skippable(block: nn.Module) -> bool:
    """A block whose output has its input's shape, so that skipping it (output = input) is well defined."""
    return isinstance(block, ResidualBranchBlock) and bool(block.identity_skip)


def backbone_parts(backbone: nn.Module) -> tuple[Callable[[Tensor], Tensor], list[nn.Module], list[str],
                                                  Callable[[Tensor], Tensor]]:
    """``(stem, blocks, block_names, head)`` of a ResNet or MobileNet backbone; ``head`` maps the last block's
    output to logits."""
    if hasattr(backbone, "blocks") and hasattr(backbone, "block_info"):       # models.resnet.ResNet
        blocks = list(backbone.blocks())
        names = [info.module for info in backbone.block_info]
        return backbone.stem, blocks, names, backbone.forward_head
    if hasattr(backbone, "stages") and hasattr(backbone, "conv_head"):        # models.mobilenet.MobileNet
        blocks, names = [], []
        for i, stage in enumerate(backbone.stages):
            for j, block in enumerate(stage):
                blocks.append(block)
                names.append(f"stages.{i}.{j}")
        return backbone.stem, blocks, names, partial(_mobilenet_head, backbone)
    raise ValueError(f"layer skipping supports ResNet (models.resnet) and MobileNet (models.mobilenet) backbones, "
                     f"got {type(backbone).__name__}")


def _mobilenet_head(backbone: nn.Module, h: Tensor) -> Tensor:
    return backbone.forward_head(backbone.conv_head(h))


def resolve_gated_blocks(blocks: Sequence[nn.Module], gated: Sequence[int] | None) -> list[int]:
    """The sorted block indices to gate; ``None`` gates every skippable block."""
    skippable = [i for i, b in enumerate(blocks) if is_skippable(b)]
    if gated is None:
        chosen = skippable
    else:
        chosen = sorted({int(i) for i in gated})
        missing = [i for i in chosen if not 0 <= i < len(blocks)]
        if missing:
            raise ValueError(f"gated_blocks names blocks {missing} that do not exist; valid indices are "
                             f"0..{len(blocks) - 1}, of which the skippable ones are {skippable}")
        bad = [i for i in chosen if i not in skippable]
        if bad:
            raise ValueError(f"gated_blocks names blocks {bad} whose output shape differs from their input "
                             f"(they cannot be skipped); skippable blocks are {skippable}")
    if not chosen:
        raise ValueError("the backbone has no skippable block (every block changes shape) or gated_blocks is empty")
    return chosen


def _mask(g: Tensor, ran: Tensor, kept: Tensor) -> Tensor:
    g = g.to(ran.dtype).view(-1, *([1] * (ran.dim() - 1)))
    return g * ran + (1 - g) * kept


class LayerSkipNetwork(nn.Module):
    """Common loop of the layer-skipping models over a ResNet / MobileNet ``backbone`` (see the module doc).

    Subclasses implement ``_decisions(x, h, rows, ledger)`` for inference: it returns a callable
    ``decide(j, h) -> bool (N,)`` for the j-th gated block (running and charging its gate or policy through
    ``self.executor`` as needed), and ``_decision_macs(x1, inputs)``: the per-sample MACs of the decision
    machinery for one sample, given the gated blocks' inputs.
    """

    def __init__(self, backbone: nn.Module, gated_blocks: Sequence[int] | None = None):
        super().__init__()
        self.backbone = backbone
        stem, blocks, names, head = backbone_parts(backbone)
        # Plain references (lists are not registered): the parameters live under ``self.backbone`` only.
        self._parts = [stem, head]
        self._blocks = blocks
        self.gated = resolve_gated_blocks(blocks, gated_blocks)
        self._slot = {k: j for j, k in enumerate(self.gated)}
        self.decision_names = [names[k] for k in self.gated]
        self.num_classes = backbone.num_classes
        self.in_chans = backbone.in_chans
        self.executor = Executor()
        self._force: bool | None = None
        self._costs: dict[tuple, tuple[int, Tensor, int]] = {}

    def __getstate__(self) -> dict:
        # What the last training forward kept for its losses (tensors in an autograd graph) is not copied or
        # pickled: deepcopy of a trained model must work.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: (None if k in ("_used", "_saved") else v) for k, v in state.items()}

    @property
    def _stem(self) -> Callable[[Tensor], Tensor]:
        return self._parts[0]

    @property
    def _head(self) -> Callable[[Tensor], Tensor]:
        return self._parts[1]

    @property
    def num_gated(self) -> int:
        return len(self.gated)

    def force(self, value: bool | None) -> None:
        """``True``: run every block (the static backbone, no gate / policy runs); ``False``: skip every gated
        block; ``None``: decide per sample (:class:`~dyncnn.dynamic.protocols.Forceable`)."""
        self._force = check_gate_flag(value)

    # -- costs ---------------------------------------------------------------------------------------------
    def _decision_macs(self, x1: Tensor, inputs: list[Tensor]) -> int:   # pragma: no cover - abstract
        raise NotImplementedError

    def cost_table(self, x: Tensor) -> tuple[int, Tensor, int]:
        """Per-sample ``(fixed MACs of the backbone without the gated blocks, MACs of each gated block (K,),
        MACs of the decision machinery)`` for inputs shaped like ``x``, measured once per shape in eval mode
        (hidden from any outer FlopCounterMode)."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._costs:
            flags = [(m, m.training) for m in self.modules()]
            self.eval()
            try:
                with _disable_current_modes(), torch.no_grad():
                    x1 = torch.zeros_like(x[:1])
                    fixed = measure_macs(self._stem, x1)
                    h, gated, inputs = self._stem(x1), [], []
                    for k, block in enumerate(self._blocks):
                        if k in self._slot:
                            gated.append(measure_macs(block, h))
                            inputs.append(h)
                        else:
                            fixed += measure_macs(block, h)
                        h = block(h)
                    fixed += measure_macs(self._head, h)
                    decision = self._decision_macs(x1, inputs)
            finally:
                for m, t in flags:
                    m.training = t
            self._costs[key] = (fixed, torch.tensor(gated, dtype=torch.float32), decision)
        return self._costs[key]

    def full_macs(self, x: Tensor) -> int:
        """Per-sample MACs with every gate on, the decision machinery included (the worst case of ``infer``)."""
        fixed, blocks, decision = self.cost_table(x)
        return fixed + int(blocks.sum()) + decision

    def static_macs(self, x: Tensor) -> int:
        """Per-sample MACs of the static backbone (what ``force(True)`` runs)."""
        fixed, blocks, _ = self.cost_table(x)
        return fixed + int(blocks.sum())

    # -- training: dense, masked -----------------------------------------------------------------------------
    def _dense(self, x: Tensor, decide: Decide) -> tuple[Tensor, Tensor, Tensor]:
        """Masked forward pass: ``(logits, decisions (N, K), per-sample MACs implied by the decisions)``; the MACs
        are differentiable through the decisions. Every block runs on every row (training only)."""
        fixed, block_macs, decision = self.cost_table(x)
        h = self._stem(x)
        gates = []
        for k, block in enumerate(self._blocks):
            if k in self._slot:
                g = decide(self._slot[k], h)
                gates.append(g)
                h = _mask(g, block(h), h)
            else:
                h = block(h)
        g = torch.stack(gates, dim=1)
        used = (fixed + decision) + g.float() @ block_macs.to(g.device)
        return self._head(h), g, used

    # -- inference: executed ---------------------------------------------------------------------------------
    def _decisions(self, x: Tensor, rows: Tensor, ledger: CostLedger) -> Decide:   # pragma: no cover
        raise NotImplementedError

    def _check(self, x: Tensor) -> None:
        check_image_batch(x, self.in_chans)
        self.backbone.check_input(x)

    @torch.no_grad()
    def infer(self, x: Tensor) -> ExitResult:
        """Executed layer skipping: each gated block runs only on the rows whose decision is 1.

        Returns logits, ``exit_index`` = number of blocks each sample ran, per-sample MACs and ``choices``
        (N, K) over the gated blocks (``decision_names``).
        """
        self._check(x)
        if self.training:     # never switch a shared model to eval and back (see MultiExitNetwork.infer)
            return eval_copy(self).infer(x)
        n = x.shape[0]
        ledger, rows, ex = CostLedger(n), torch.arange(n), self.executor
        if self._force is None:
            decide = self._decisions(x, rows, ledger)
        else:
            const = torch.full((n,), self._force, dtype=torch.bool, device=x.device)
            decide = lambda j, h: const   # noqa: E731 - no gate runs when the decisions are pinned
        h = ex.run(self._stem, x, rows, ledger)
        if h.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            h = h.clone()      # a stem that passes the input through: the blocks below write into h in place
        takes = []             # per gated block, in order; stacked once at the end
        for k, block in enumerate(self._blocks):
            if k in self._slot:
                take = decide(self._slot[k], h)
                takes.append(take)
                # h is this loop's own tensor (the stem's or a block's output): the rows that ran are written
                # into it instead of into a copy
                h = ex.run_where(block, h, take, rows, ledger, otherwise=h, overwrite=True)
            else:
                h = ex.run(block, h, rows, ledger)
        logits = ex.run(self._head, h, rows, ledger)
        choices = torch.stack(takes, 1).cpu().bool().long() if takes else torch.empty(n, 0, dtype=torch.int64)
        ran = choices.sum(1) + (len(self._blocks) - self.num_gated)
        return ExitResult(logits, ran, ledger.macs, choices)


class FeedForwardGate(nn.Module):
    """SkipNet's feed-forward gate: global average pool -> linear -> one logit per sample; with ``hidden`` > 0,
    pool -> linear(hidden) -> ReLU -> linear (a few hundred MACs more, room for decisions that depend on the
    sample rather than on the block alone).

    ``init_bias`` > 0 makes a new gate start "on", so that gating a trained backbone starts from its accuracy.
    """

    def __init__(self, in_chs: int, init_bias: float = 2.0, hidden: int = 0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(nn.Linear(in_chs, hidden), nn.ReLU(inplace=True)) if hidden > 0 else nn.Identity()
        self.fc = nn.Linear(hidden if hidden > 0 else in_chs, 1)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.constant_(self.fc.bias, init_bias)

    def forward(self, h: Tensor) -> Tensor:
        # the mean over H, W is what adaptive_avg_pool2d(1) computes, without its pool-then-flatten dispatches (at
        # batch 1 a gate's ops cost as much as the convolutions a skipped block saves)
        return self.fc(self.mlp(h.mean((2, 3)))).squeeze(1)


class RecurrentGate(nn.Module):
    """SkipNet's recurrent gate: a per-block linear projection of the pooled features into ``hidden`` dims, one
    LSTM cell shared across blocks (the state carries what earlier blocks saw), a shared linear -> one logit.

    ``step(j, (h, hx, cx)) -> (logit, hx, cx)`` is one gate evaluation; the state is per sample, so the gate
    runs on every row of the batch.
    """

    def __init__(self, in_chs: Sequence[int], hidden: int = 16, init_bias: float = 2.0):
        super().__init__()
        self.hidden = hidden
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.ModuleList(nn.Linear(c, hidden) for c in in_chs)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.proj = nn.Linear(hidden, 1)
        nn.init.normal_(self.proj.weight, 0.0, 0.01)
        nn.init.constant_(self.proj.bias, init_bias)
        # One stable callable per block (the executor caches costs by callable); a partial of the bound method
        # follows the module through deepcopy.
        self.steps = [partial(self.step, j) for j in range(len(in_chs))]

    def init_state(self, h: Tensor) -> tuple[Tensor, Tensor]:
        z = h.new_zeros(h.shape[0], self.hidden)
        return z, z

    def step(self, j: int, state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        h, hx, cx = state
        hx, cx = self.cell(self.embed[j](self.pool(h).flatten(1)), (hx, cx))
        return self.proj(hx).squeeze(1), hx, cx
