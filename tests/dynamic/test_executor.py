import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic.evaluation import evaluate_dynamic, format_dynamic
from dyncnn.dynamic.protocols import is_gated
from dyncnn.dynamic.executor import CostLedger, ExitResult, Executor


def test_run_where_runs_only_the_taken_rows_and_charges_only_them():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(6, 8)
    take = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    ex, ledger = Executor(), CostLedger(6)
    rows = torch.tensor([10, 11, 12, 13, 14, 15]) - 10
    with FlopCounterMode(display=False) as counter:
        out = ex.run_where(lin, x, take, rows, ledger, otherwise=x)
    assert counter.get_total_flops() // 2 == ledger.total == 3 * 64
    assert ledger.macs.tolist() == [64, 0, 64, 64, 0, 0]
    assert torch.allclose(out[take], lin(x[take])) and torch.equal(out[~take], x[~take])


def test_run_where_with_nothing_to_run_does_not_call_the_stage():
    calls = []
    ex, ledger = Executor(), CostLedger(3)
    x = torch.randn(3, 2)
    out = ex.run_where(lambda t: calls.append(1) or t, x, torch.zeros(3, dtype=torch.bool), torch.arange(3),
                       ledger, otherwise=x)
    assert out is x and not calls and ledger.total == 0
    with pytest.raises(ValueError, match="length 3"):
        ex.run_where(lambda t: t, x, torch.ones(2, dtype=torch.bool), torch.arange(3), ledger, otherwise=x)


class ToyGated(nn.Module):
    """Runs a second linear layer only for samples whose first feature is positive."""

    decision_names = ["extra"]

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.executor = Executor()

    def infer(self, x):
        x = x.flatten(1)
        n = x.shape[0]
        ledger, rows = CostLedger(n), torch.arange(n)
        h = self.executor.run(self.a, x, rows, ledger)
        take = x[:, 0] > 0
        h = self.executor.run_where(self.b, h, take, rows, ledger, otherwise=h)
        return ExitResult(h, take.long(), ledger.macs, take[:, None].long())

    def full_macs(self, x):
        return 32


def test_evaluate_dynamic_reports_accuracy_macs_and_choice_rates():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 2, 2)
    y = torch.randint(0, 4, (40,))
    model = ToyGated()
    assert is_gated(model)
    r = evaluate_dynamic(model, list(zip(x, y)), batch_size=16)
    expected = model.infer(x)
    assert r["accuracy"] == pytest.approx((expected.logits.argmax(1) == y).float().mean().item())
    assert r["mean_macs"] == pytest.approx(expected.macs.double().mean().item())
    assert r["choice_rate"][0] == pytest.approx((x.flatten(1)[:, 0] > 0).float().mean().item(), abs=1e-4)
    assert r["macs_fraction"] == pytest.approx(r["mean_macs"] / 32)
    assert "extra=" in format_dynamic(r)


def test_stage_costs_are_cached_per_stage_and_shape_and_never_confused_after_a_stage_is_freed():
    ex = Executor()
    lin = nn.Linear(4, 4)
    assert ex.stage_macs(lin, torch.zeros(3, 4)) == 16
    assert ex.stage_macs(lin, torch.zeros(5, 4)) == 16            # cached: the batch size is not part of the key
    assert ex.stage_macs(lin, torch.zeros(2, 7, 4)) == 7 * 16     # another shape, measured again
    del lin
    import gc
    gc.collect()
    for _ in range(20):      # new modules may reuse a freed module's id: their own cost must be measured
        other = nn.Linear(4, 8)
        assert ex.stage_macs(other, torch.zeros(1, 4)) == 32

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)

        def head(self, x):
            return self.a(x)
    h = Holder()
    assert ex.stage_macs(h.head, torch.zeros(1, 4)) == 8
    assert len(ex._cache[h]) == 1 and ex.stage_macs(h.head, torch.zeros(1, 4)) == 8 and len(ex._cache[h]) == 1


def test_nested_states_are_keyed_by_structure_and_shapes():
    """A state of nested dicts, lists and tuples (RANet's flows, a stage's state with the previous exit's logits):
    its cost is cached per structure and per-sample shape, and measured again when either changes."""
    ex = Executor()

    def stage(state):
        feats, logits = state
        return feats["x"] @ torch.ones(feats["x"].shape[-1], 3) + logits.sum() * 0

    def state(d, extra=None):
        feats = {"x": torch.zeros(2, d), "inputs": [torch.zeros(2, 1)], "low": extra}
        return (feats, torch.zeros(2, 10))
    assert ex.stage_macs(stage, state(4)) == 12
    assert ex.stage_macs(stage, state(4)) == 12 and len(ex._cache[stage]) == 1       # cached
    assert ex.stage_macs(stage, state(5)) == 15                                       # another shape
    assert ex.stage_macs(stage, state(5, extra=1)) == 15 and len(ex._cache[stage]) == 3   # another structure
    from dyncnn.dynamic.executor import _shape_key
    assert _shape_key(state(4)) != _shape_key(state(4, extra=1)) != _shape_key(state(4, extra=torch.zeros(2, 1)))


def test_ledger_folds_deferred_charges_exactly_whenever_it_is_read():
    ledger = CostLedger(5)
    everyone, some, others = torch.arange(5), torch.tensor([1, 3]), torch.tensor([0, 3, 4])
    ledger.charge(everyone, 10)
    ledger.charge(some, 2)
    ledger.charge(some, 3)                      # the same rows tensor again: its charges add up
    ledger.charge(others, 7)
    ledger.charge(torch.tensor([4, 2]), torch.tensor([1, 100]))   # one value per row
    assert ledger.macs.tolist() == [17, 15, 110, 22, 18]
    ledger.charge(everyone, 1)                  # charges after a read are folded at the next read
    ledger.charge(torch.tensor([2]), 4)
    assert ledger.macs.tolist() == [18, 16, 115, 23, 19] and ledger.total == 191


def test_run_where_overwrite_writes_the_rows_that_ran_into_otherwise():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.randn(5, 4)
    take = torch.tensor([0, 1, 0, 1, 1], dtype=torch.bool)
    expected = torch.where(take[:, None], lin(x), x).detach()
    own = x.clone()
    copied = Executor().run_where(lin, own, take, torch.arange(5), CostLedger(5), otherwise=own)
    assert torch.equal(own, x) and torch.allclose(copied, expected)        # default: otherwise is left as it was
    written = Executor().run_where(lin, own, take, torch.arange(5), CostLedger(5), otherwise=own, overwrite=True)
    assert written is own and torch.allclose(own, expected)
