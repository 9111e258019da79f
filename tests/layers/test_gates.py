import pytest
import torch

from dyncnn.layers.gates import (HardGate, anneal, budget_loss, check_budget, gumbel_sigmoid, gumbel_softmax,
                                 layer_bounds_loss)


def test_gumbel_sigmoid_is_hard_forward_and_carries_gradient():
    torch.manual_seed(0)
    logits = torch.randn(200, requires_grad=True)
    g = gumbel_sigmoid(logits, tau=0.5)
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    g.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_sigmoid_sample_rate_follows_the_probability():
    torch.manual_seed(0)
    logits = torch.full((20000,), 1.0)          # sigmoid(1) = 0.731
    rate = gumbel_sigmoid(logits).mean().item()
    assert abs(rate - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02


def test_gumbel_softmax_is_one_hot():
    torch.manual_seed(0)
    y = gumbel_softmax(torch.randn(5, 4, requires_grad=True))
    assert torch.equal(y.detach().sum(-1), torch.ones(5)) and set(y.detach().unique().tolist()) <= {0.0, 1.0}


def test_hard_gate_thresholds_in_eval_and_can_be_forced():
    gate = HardGate(tau=1.0).eval()
    logits = torch.tensor([-0.1, 0.0, 0.3])
    assert gate(logits).tolist() == [0.0, 1.0, 1.0]
    gate.force = False
    assert gate(logits).tolist() == [0.0, 0.0, 0.0]
    gate.force = True
    assert gate.train()(logits).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan")])
def test_budget_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_budget(bad)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="> 0"):
        HardGate(tau=0)
    with pytest.raises(ValueError, match="> 0"):
        gumbel_sigmoid(torch.zeros(2), tau=-1)


def test_budget_loss_is_zero_at_the_budget_and_pushes_towards_it():
    used = torch.tensor([50.0, 50.0], requires_grad=True)
    assert budget_loss(used, 100, 0.5).item() == 0
    loss = budget_loss(used, 100, 0.25)
    loss.backward()
    assert loss.item() == pytest.approx(0.0625) and (used.grad > 0).all()


def test_layer_bounds_anneal_to_the_budget():
    f = [torch.tensor([0.9]), torch.tensor([0.5])]
    assert layer_bounds_loss(f, 0.5, progress=0.0).item() == 0          # wide bounds at the start
    late = layer_bounds_loss(f, 0.5, progress=1.0).item()
    assert late == pytest.approx(0.4 ** 2 / 2)


def test_anneal_is_geometric():
    assert anneal(0, 30, 1) == 30 and anneal(1, 30, 1) == pytest.approx(1) and anneal(0.5, 4, 1) == pytest.approx(2)
