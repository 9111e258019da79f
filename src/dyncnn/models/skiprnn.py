"""Skipping recurrent networks (Skip-RNN, Campos et al., ICLR 2018), with the skipped updates really skipped.

A GRU or LSTM cell whose state update at step t is gated by a binary ``u_t = [u~_t >= 0.5]``. The cumulative update
probability ``u~`` starts at 1 (the first step always reads); after an update it is reset to
``du_t = sigmoid(w . s_t + b)``, computed from the new state; after a skipped step it grows by ``min(du, 1 - u~)``
(``du`` is unchanged, since the state is). So the network decides, when it reads, how many steps it will skip
next. Training: the forward value of ``u_t`` is exactly 0/1 and its gradient is that of ``u~_t`` (straight-through
round, the paper's estimator; or straight-through Gumbel via ``layers.gates``), the state is the mixture
``u s' + (1 - u) s`` (a masked dense result, allowed in training only), and ``regularization_loss`` returns
``cost_per_update * mean(number of updates)`` (plus an optional ``budget_loss`` on the update fraction).

Inference (``infer``, and ``forward`` in eval mode) executes the decisions: at each step only the rows whose gate
is open are gathered, the cell and the update-probability head run on them, and the result is scattered back;
skipped rows are not touched. Since a skipped step leaves the state, hence ``du``, unchanged, u~ grows as
``min(k du, 1)`` after an update: the number of steps to the next update is computed once, when the update
happens, and the loop jumps to the next step at which any row reads (at batch 1, a skipped step costs nothing).
The gate head after the last step is not run (its value is never used). Each sample is charged
``updates x cell MACs + gate-head runs x gate MACs + classifier MACs``, the per-row costs measured once with
``FlopCounterMode`` through the ``Executor``; the tests check that this equals FlopCounterMode's count of the whole
call. The training forward computes u~ by the paper's recursion for the gradient, with the closed form's value,
so that training decisions and executed inference agree bit for bit. ``force_update=True`` is the plain GRU/LSTM (no gate, no cost).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..dynamic.executor import CostLedger, Executor, ExitResult, eval_copy
from ..errors import DyncnnError
from ..layers.gates import HardGate, anneal, budget_loss, check_budget
from .registry import register_model

CELLS = ("gru", "lstm")
BINARIZE = ("round", "gumbel")


@dataclass(frozen=True)
class SkipRNNConfig:
    cell: str = "gru"                   # "gru" | "lstm"
    input_size: int = 28                # features per step
    hidden_size: int = 110              # the paper's MNIST width
    num_classes: int = 10
    cost_per_update: float = 1e-3       # lambda: loss per state update (per sample, summed over steps)
    budget: float | None = None         # optional target fraction of updates, pushed by ``budget_loss``
    budget_weight: float = 1.0
    binarize: str = "round"             # "round": straight-through round (the paper); "gumbel": ST Gumbel-sigmoid
    tau_start: float = 1.0              # Gumbel temperature, annealed by ``set_progress`` (binarize="gumbel")
    tau_end: float = 0.5
    gate_bias: float = 1.0              # initial bias of the update-probability head (sigmoid(1) = 0.73: read all)
    force_update: bool = False          # the plain RNN: every step updates, no gate
    seq_len: int = 28                   # the expected length, used for ``decision_names`` only

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.binarize not in BINARIZE:
            raise ValueError(f"binarize must be one of {BINARIZE}, got {self.binarize!r}")
        if self.input_size < 1 or self.hidden_size < 1 or self.num_classes < 1 or self.seq_len < 1:
            raise ValueError(f"input_size, hidden_size, num_classes and seq_len must be >= 1, got {self}")
        if self.cost_per_update < 0 or self.budget_weight < 0:
            raise ValueError(f"cost_per_update and budget_weight must be >= 0, got {self.cost_per_update}, "
                             f"{self.budget_weight}")
        if self.budget is not None:
            check_budget(self.budget)


class RecurrentStep(nn.Module):
    """One recurrent update on a single tensor ``[x_t, s]`` -> ``s'`` (``s = h`` for a GRU, ``[h, c]`` for an LSTM),
    so that the executor can gather, measure and scatter it like any other stage."""

    def __init__(self, cell: str, input_size: int, hidden_size: int):
        super().__init__()
        self.kind, self.input_size, self.hidden_size = cell, input_size, hidden_size
        self.cell = nn.GRUCell(input_size, hidden_size) if cell == "gru" else nn.LSTMCell(input_size, hidden_size)
        self.state_size = hidden_size * (1 if cell == "gru" else 2)

    def forward(self, z: Tensor) -> Tensor:
        return self.update(z[:, :self.input_size], z[:, self.input_size:])

    def update(self, x: Tensor, s: Tensor) -> Tensor:
        """The new state from the input ``x`` and the state ``s`` as two tensors (no concatenation)."""
        if self.kind == "gru":
            return self.cell(x, s)
        h, c = self.cell(x, (s[:, :self.hidden_size], s[:, self.hidden_size:]))
        return torch.cat([h, c], 1)


class SkipRNN(nn.Module):
    """Skip-GRU / Skip-LSTM classifier of sequences (N, T, input_size): the last hidden state -> linear head."""

    input_kind = "sequence"

    def __init__(self, config: SkipRNNConfig = SkipRNNConfig()):
        super().__init__()
        self.config = c = config
        self.default_input_shape = (c.seq_len, c.input_size)
        self.input_size, self.hidden_size, self.num_classes = c.input_size, c.hidden_size, c.num_classes
        self.force_update = c.force_update
        self.step = RecurrentStep(c.cell, c.input_size, c.hidden_size)
        # The update probability reads h (GRU) or the cell state c (LSTM), as in the authors' code.
        self.gate = nn.Linear(c.hidden_size, 1)
        nn.init.constant_(self.gate.bias, c.gate_bias)
        self.head = nn.Linear(c.hidden_size, c.num_classes)
        self.binarizer = HardGate(c.tau_start)
        self.executor = Executor()
        self._updates: Tensor | None = None    # (N, T) straight-through update gates of the last training forward

    @property
    def decision_names(self) -> list[str]:
        return [f"update_t{t:02d}" for t in range(self.config.seq_len)]

    # -- inputs --------------------------------------------------------------------------------------------
    def check_input(self, x: object, check_finite: bool = False) -> Tensor:
        want = f"(N, T, {self.input_size}) with N >= 1 and T >= 1"
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a sequence batch tensor {want}, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.input_size:
            hint = " (add a batch axis with x.unsqueeze(0))" if x.dim() == 2 else ""
            raise DyncnnError(f"{type(self).__name__}: expected a sequence batch of shape {want}, got shape "
                              f"{tuple(x.shape)}{hint}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise DyncnnError(f"{type(self).__name__}: empty {'batch' if x.shape[0] == 0 else 'sequence'}: "
                              f"expected shape {want}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise DyncnnError(f"{type(self).__name__}: expected a floating-point sequence, got {x.dtype}")
        if check_finite and not bool(torch.isfinite(x).all()):
            raise DyncnnError(f"{type(self).__name__}: the input holds NaN or Inf values")
        return x

    # -- training ------------------------------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        if self.config.binarize == "gumbel":
            self.binarizer.set_tau(anneal(progress, self.config.tau_start, self.config.tau_end))

    def _binarize(self, u_tilde: Tensor) -> Tensor:
        """0/1 forward value, gradient of ``u_tilde`` (ST round) or of a relaxed Gumbel sample."""
        if self.config.binarize == "gumbel":
            p = u_tilde.clamp(1e-6, 1 - 1e-6)
            return self.binarizer(torch.log(p) - torch.log1p(-p))
        hard = (u_tilde >= 0.5).to(u_tilde.dtype)
        return hard + (u_tilde - u_tilde.detach())       # forward value exactly 0/1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.infer(x).logits
        x = self.check_input(x)
        n, steps, _ = x.shape
        hs = self.hidden_size
        s = x.new_zeros(n, self.step.state_size)
        u_tilde = x.new_ones(n)
        since = x.new_zeros(n)                    # steps since the last update, counting the coming one
        updates = []
        for t in range(steps):
            s_new = self.step(torch.cat([x[:, t], s], 1))
            if self.force_update:
                s = s_new
                continue
            u = self._binarize(u_tilde)
            s = u[:, None] * s_new + (1 - u[:, None]) * s    # masked dense update: training only
            updates.append(u)
            if t + 1 < steps:
                delta = torch.sigmoid(self.gate(s[:, -hs:])).squeeze(1)
                since = torch.where(u.detach() > 0.5, 1.0, since + 1)
                # The paper's accumulation u~ + min(du, 1 - u~) carries the gradient; its forward value is the
                # closed form min(k du, 1) (k steps since the update) that ``infer`` uses, bit for bit.
                acc = u_tilde + torch.minimum(delta, 1 - u_tilde)
                acc = torch.minimum(since * delta, torch.ones_like(delta)) + (acc - acc.detach())
                u_tilde = u * delta + (1 - u) * acc
        self._updates = torch.stack(updates, 1) if updates else None
        return self.head(s[:, :hs])

    def regularization_loss(self) -> Tensor:
        """``cost_per_update * mean updates per sample`` (+ ``budget_weight * budget_loss`` on the update
        fraction) of the last training forward; zero for the plain RNN."""
        if self._updates is None:
            return torch.zeros(())
        used = self._updates.sum(1)
        loss = self.config.cost_per_update * used.mean()
        if self.config.budget is not None:
            loss = loss + self.config.budget_weight * budget_loss(used, self._updates.shape[1], self.config.budget)
        return loss

    # -- executed inference --------------------------------------------------------------------------------
    def _unit_macs(self, x: Tensor) -> tuple[int, int, int]:
        """Per-row MACs of one cell update, one gate-head run and the classifier (measured once, cached)."""
        z = x.new_zeros(1, self.input_size + self.step.state_size)
        h = x.new_zeros(1, self.hidden_size)
        ex = self.executor
        return ex.stage_macs(self.step, z), ex.stage_macs(self.gate, h), ex.stage_macs(self.head, h)

    def full_macs(self, x: Tensor) -> int:
        """Per-sample MACs with every update taken (the gate head runs after every step but the last)."""
        steps = self.check_input(x).shape[1]
        cell, gate, head = self._unit_macs(x)
        return steps * cell + (0 if self.force_update else (steps - 1) * gate) + head

    @torch.no_grad()
    def infer(self, x: Tensor) -> ExitResult:
        """Executed skipping: exit_index = number of state updates, choices (N, T) = the update pattern.

        After an update with probability increment ``du``, u~ grows as ``min(k du, 1)``, so the next update comes
        ``k`` steps later, the first k with ``k du >= 0.5``: it is computed once per update and the loop jumps
        straight to the next step at which any row updates. Rows read at a step are gathered, updated and
        scattered back; the others are not touched.
        """
        x = self.check_input(x, check_finite=True)
        if self.training:     # never switch a shared model to eval and back (see MultiExitNetwork.infer)
            return eval_copy(self).infer(x)
        n, steps, _ = x.shape
        hs = self.hidden_size
        s = x.new_zeros(n, self.step.state_size)
        xt = x.transpose(0, 1).contiguous()                             # (T, N, F): each step's rows contiguous
        ks = torch.arange(1, steps, dtype=x.dtype, device=x.device)   # candidate skip lengths 1 .. T-1
        next_t = torch.zeros(n, dtype=torch.int64, device=x.device)     # the step of each row's next update
        choices = torch.zeros(steps, n, dtype=torch.bool, device=x.device)
        t = 0
        while t < steps:
            take = torch.eq(next_t, t, out=choices[t])
            idx = take.nonzero().squeeze(1)                             # the rows that update (one host sync)
            if idx.numel() == n:
                idx, s = None, self.step.update(xt[t], s)
                s_rows = s
            else:                                                       # gather, update, scatter in place
                s_rows = self.step.update(xt[t].index_select(0, idx), s.index_select(0, idx))
                s.index_copy_(0, idx, s_rows)                           # skipped rows keep their state
            if t + 1 == steps:
                break
            if self.force_update:
                next_t += 1
            else:
                delta = torch.sigmoid(self.gate(s_rows[:, -hs:]))      # (rows, 1)
                nxt = (delta * ks[:steps - t - 1] < 0.5).sum(1) + (t + 1)   # T: no update left
                if idx is None:
                    next_t = nxt
                else:
                    next_t.index_copy_(0, idx, nxt)
            t = int(next_t.min())
        choices = choices.t().to("cpu", torch.int64)
        logits = self.head(s[:, :hs])
        cell, gate, head = self._unit_macs(x)
        updates = choices.sum(1)
        gate_runs = torch.zeros_like(updates) if self.force_update else updates - choices[:, -1]
        ledger = CostLedger(n)
        ledger.charge(torch.arange(n), updates * cell + gate_runs * gate + head)
        return ExitResult(logits, updates, ledger.macs, choices)


def skip_rnn(**cfg) -> SkipRNN:
    """The one builder: ``SkipRNN(SkipRNNConfig(**cfg))``."""
    return SkipRNN(SkipRNNConfig(**cfg))


# Registered variants: (data name, features per step, steps).
_DATA = {"mnist_rows": (28, 28),        # data.sequences.RowSequenceDigits: digits read row by row
         "clips": (256, 16)}            # data.sequences.ClipFeatureSequences: MovingDigits frames pooled to 16x16


def _builder(cell: str, force: bool, features: int, steps: int):
    def build(num_classes: int = 10, in_chans: int = 1, **cfg) -> SkipRNN:
        if in_chans != 1:
            raise ValueError(f"these sequences have one channel (in_chans=1), got in_chans={in_chans}")
        cfg.setdefault("input_size", features)
        cfg.setdefault("seq_len", steps)
        return skip_rnn(cell=cell, num_classes=num_classes, force_update=force, **cfg)
    return build


for _cell in CELLS:
    for _data, (_features, _steps) in _DATA.items():
        register_model(_builder(_cell, False, _features, _steps), name=f"skiprnn_{_cell}_{_data}")
        # The plain RNN baseline: the same model with every update taken (no gate, no cost term).
        register_model(_builder(_cell, True, _features, _steps), name=f"skiprnn_plain_{_cell}_{_data}")

__all__ = ["SkipRNN", "SkipRNNConfig", "RecurrentStep", "skip_rnn"]
