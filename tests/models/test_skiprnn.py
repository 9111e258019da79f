"""Skip-RNN: executed skipping of recurrent state updates (issue 9, item 4)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.data.mnist import MNISTDigits
from dyncnn.data.sequences import RowSequenceDigits
from dyncnn.dynamic.evaluation import evaluate_dynamic
from dyncnn.dynamic.protocols import is_gated
from dyncnn.models import create_model, list_models
from dyncnn.models.skiprnn import SkipRNNConfig, skip_rnn

F_IN, HID, T = 6, 16, 10


def tiny(cell: str = "gru", bias: float = -1.0, **cfg):
    """A tiny Skip-RNN whose gate skips part of the steps, differently per sample."""
    m = skip_rnn(cell=cell, input_size=F_IN, hidden_size=HID, num_classes=5, seq_len=T, **cfg)
    with torch.no_grad():
        m.gate.weight.mul_(8.0)
        m.gate.bias.fill_(bias)
    return m.eval()


def plain_loop(model, x):
    """The plain recurrent loop over the same cell: every step updates."""
    cell, hs = model.step.cell, model.hidden_size
    h = x.new_zeros(x.shape[0], hs)
    c = x.new_zeros(x.shape[0], hs)
    for t in range(x.shape[1]):
        if isinstance(cell, nn.GRUCell):
            h = cell(x[:, t], h)
        else:
            h, c = cell(x[:, t], (h, c))
    return model.head(h)


def test_registered_names():
    names = list_models("skiprnn_*")
    for n in ("skiprnn_gru_mnist_rows", "skiprnn_lstm_mnist_rows", "skiprnn_plain_gru_mnist_rows",
              "skiprnn_plain_lstm_mnist_rows"):
        assert n in names
    m = create_model("skiprnn_lstm_mnist_rows", num_classes=10, in_chans=1, hidden_size=8)
    assert is_gated(m) and m.step.kind == "lstm" and not m.force_update
    assert create_model("skiprnn_plain_gru_mnist_rows", hidden_size=8).force_update
    assert len(m.decision_names) == 28


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_batched_infer_equals_per_sample(cell):
    m = tiny(cell)
    x = torch.randn(12, T, F_IN)
    r = m.infer(x)
    # skipping happens and differs between samples, so the gather/scatter paths are exercised
    assert 0 < int(r.choices.sum()) < r.choices.numel()
    assert len({tuple(c.tolist()) for c in r.choices}) > 1
    assert torch.equal(r.exit_index, r.choices.sum(1))
    for i in range(len(x)):
        ri = m.infer(x[i:i + 1])
        assert torch.equal(ri.choices[0], r.choices[i])
        assert torch.equal(ri.macs[0], r.macs[i])
        torch.testing.assert_close(ri.logits[0], r.logits[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_ledger_equals_flop_counter(cell):
    m = tiny(cell)
    x = torch.randn(9, T, F_IN)
    m.full_macs(x)                                       # warm the per-stage MAC cache outside the counter
    with FlopCounterMode(display=False) as counter:
        r = m.infer(x)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    full = m.full_macs(x)
    assert int(r.macs.max()) < full                      # skipped updates were not computed
    # the cold call (cache filled inside the counted call) counts the same
    m2 = tiny(cell)
    with FlopCounterMode(display=False) as counter:
        r2 = m2.infer(x)
    assert int(r2.macs.sum()) == counter.get_total_flops() // 2


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_forced_open_reproduces_plain_rnn(cell):
    gated = tiny(cell)
    plain = skip_rnn(cell=cell, input_size=F_IN, hidden_size=HID, num_classes=5, force_update=True).eval()
    plain.load_state_dict(gated.state_dict())
    x = torch.randn(7, T, F_IN)
    r = plain.infer(x)
    assert torch.equal(r.logits, plain_loop(gated, x))                # bit-exact: the same cell, every step
    assert torch.equal(r.exit_index, torch.full((7,), T)) and bool(r.choices.all())
    assert torch.equal(plain(x), r.logits)                            # eval forward = infer().logits
    # ... and the fused torch.nn.GRU / LSTM with the same weights
    rnn = (nn.GRU if cell == "gru" else nn.LSTM)(F_IN, HID, batch_first=True)
    with torch.no_grad():
        for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, f"{a}_l0").copy_(getattr(gated.step.cell, a))
        ref = gated.head(rnn(x)[0][:, -1])
    torch.testing.assert_close(r.logits, ref, atol=1e-5, rtol=1e-5)
    # the plain model pays no gate: T cell updates + the classifier
    cell_macs = (3 if cell == "gru" else 4) * HID * (F_IN + HID)
    assert int(r.macs[0]) == plain.full_macs(x) == T * cell_macs + HID * 5
    assert gated.full_macs(x) == plain.full_macs(x) + (T - 1) * HID
    plain.train()
    plain(x)
    assert float(plain.regularization_loss()) == 0.0


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_training_forward_matches_executed_inference(cell):
    m = tiny(cell).train()
    x = torch.randn(16, T, F_IN)
    logits = m(x)
    m.eval()
    r = m.infer(x)
    assert torch.equal(m._updates.detach().to(torch.int64), r.choices)   # same decisions, dense vs executed
    torch.testing.assert_close(logits.detach(), r.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x), r.logits)


@pytest.mark.parametrize("binarize", ["round", "gumbel"])
def test_gradients_reach_the_gate(binarize):
    m = tiny("gru", bias=0.0, binarize=binarize, cost_per_update=0.1).train()
    m.set_progress(0.5)
    x, y = torch.randn(32, T, F_IN), torch.randint(0, 5, (32,))
    loss = F.cross_entropy(m(x), y) + m.regularization_loss()
    loss.backward()
    g = m.gate.weight.grad
    assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    # the cost term alone pushes towards fewer updates: raising the gate bias would raise the cost
    if binarize == "round":
        m.zero_grad()
        m(x)
        m.regularization_loss().backward()
        assert float(m.gate.bias.grad) > 0
    else:
        assert m.binarizer.tau < m.config.tau_start                      # set_progress anneals the temperature


def test_regularization_terms():
    m = tiny("gru", cost_per_update=0.01, budget=0.25, budget_weight=2.0).train()
    m(torch.randn(8, T, F_IN))
    used = m._updates.detach().sum(1)
    expected = 0.01 * used.mean() + 2.0 * (used.mean() / T - 0.25) ** 2
    torch.testing.assert_close(m.regularization_loss().detach(), expected)


def _train_updates(cost: float, steps: int = 60) -> float:
    """Train a tiny Skip-GRU on a task that needs only the first step; return the fraction of updates."""
    torch.manual_seed(0)
    m = skip_rnn(input_size=4, hidden_size=8, num_classes=2, seq_len=12, cost_per_update=cost).train()
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    for _ in range(steps):
        x = torch.randn(64, 12, 4)
        y = (x[:, 0, 0] > 0).long()
        loss = F.cross_entropy(m(x), y) + m.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x = torch.randn(256, 12, 4)
    r = m.infer(x)
    return float(r.choices.float().mean()), float((r.logits.argmax(1) == (x[:, 0, 0] > 0)).float().mean())


def test_skipped_fraction_follows_the_cost():
    (free, _), (cheap, acc_cheap) = _train_updates(0.0), _train_updates(0.05)
    assert free > 0.5                 # no cost: the initial gate (bias 1) keeps reading most steps
    assert cheap < 0.5 * free         # a cost per update: most updates are skipped ...
    assert acc_cheap > 0.9            # ... and the task (it needs the first step only) is still solved


def test_bad_inputs():
    m = tiny("gru")
    for bad in (torch.randn(T, F_IN), torch.randn(2, 1, T, F_IN), torch.randn(2, T, F_IN + 1),
                torch.randn(2, 0, F_IN), torch.randn(0, T, F_IN)):
        with pytest.raises(ValueError, match=rf"\(N, T, {F_IN}\)"):
            m.infer(bad)
    with pytest.raises(ValueError, match="floating"):
        m.infer(torch.ones(2, T, F_IN, dtype=torch.int64))
    nan = torch.randn(2, T, F_IN)
    nan[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.infer(nan)
    with pytest.raises(ValueError, match=r"\(N, T, 6\)"):
        m.train()(torch.randn(2, 0, F_IN))
    with pytest.raises(ValueError, match="cell must be one of"):
        SkipRNNConfig(cell="rnn")
    with pytest.raises(ValueError, match="binarize"):
        SkipRNNConfig(binarize="sign")
    with pytest.raises(ValueError, match="budget"):
        SkipRNNConfig(budget=1.5)
    with pytest.raises(ValueError, match="in_chans=1"):
        create_model("skiprnn_gru_mnist_rows", in_chans=3)


def test_row_sequence_digits_and_evaluation():
    rows = RowSequenceDigits("val")
    digits = MNISTDigits("val")
    x, y = rows[3]
    assert x.shape == (28, 28) and rows.seq_len == rows.feature_size == 28 and len(rows) == 500
    assert torch.equal(x, digits[3][0][0]) and y == digits[3][1]
    m = create_model("skiprnn_gru_mnist_rows", hidden_size=8).eval()
    with torch.no_grad():
        m.gate.bias.fill_(-1.0)           # du = sigmoid(-1 + ...) < 0.5: some steps are skipped
    report = evaluate_dynamic(m, Subset(rows, range(40)), batch_size=16)
    assert report["n"] == 40 and len(report["choice_rate"]) == 28 and report["choice_rate"][0] == 1.0
    assert report["macs_fraction"] < 1.0 and report["decision_names"][0] == "update_t00"


def test_checkpoint_round_trip(tmp_path):
    from dyncnn.train import load_checkpoint, save_checkpoint
    m = create_model("skiprnn_lstm_mnist_rows", hidden_size=8, cost_per_update=0.02).eval()
    with torch.no_grad():
        m.gate.bias.fill_(-1.0)
    save_checkpoint(tmp_path / "m.safetensors", m)
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    loaded.eval()
    x = torch.rand(5, 28, 28)
    a, b = m.infer(x), loaded.infer(x)
    assert loaded.config == m.config
    assert torch.equal(a.logits, b.logits) and torch.equal(a.choices, b.choices)


def test_clip_feature_sequences():
    from dyncnn.data.sequences import ClipFeatureSequences
    clips = ClipFeatureSequences("val", limit=4, frames=8)
    x, y = clips[0]
    assert x.shape == (8, 256) and clips.seq_len == 8 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert clips.informative.shape == (4, 8) and 0 <= y < 10
    m = create_model("skiprnn_gru_clips", hidden_size=8).eval()
    r = m.infer(torch.stack([clips[i][0] for i in range(4)]))
    assert r.choices.shape == (4, 8) and bool((r.choices[:, 0] == 1).all())
    with pytest.raises(ValueError, match="pool"):
        ClipFeatureSequences("val", limit=2, pool=5)
