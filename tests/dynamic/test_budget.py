import math

import pytest
import torch

from dyncnn.dynamic.budget import (NO_EXIT, assign_exits, dynamic_evaluate, evaluate_thresholds, exit_proportions,
                                   fit_temperatures, msdnet_thresholds, solve_for_budget)
from dyncnn.dynamic.losses import MultiExitLoss


def official_thresholds(max_preds, p):
    """Plain restatement of the official MSDNet dynamic_eval_find_threshold loop (kalviny/MSDNet-PyTorch)."""
    n_stage, n_sample = max_preds.shape
    _, sorted_idx = max_preds.sort(dim=1, descending=True)
    filtered = torch.zeros(n_sample)
    T = torch.full((n_stage,), 1e8)
    for k in range(n_stage - 1):
        count = 0
        out_n = math.floor(n_sample * p[k])
        for i in range(n_sample):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    T[k] = max_preds[k][ori_idx]
                    break
        filtered.add_(max_preds[k].ge(T[k]).type_as(filtered))
    T[n_stage - 1] = -1e8
    return T


def official_proportions(p, n_blocks):
    q = torch.tensor([p / 20.0])
    probs = torch.exp(torch.log(q) * torch.arange(1, n_blocks + 1))
    return probs / probs.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_the_official_loop(seed):
    g = torch.Generator().manual_seed(seed)
    k_exits, n = 5, 300
    scores = torch.softmax(torch.randn(k_exits, n, 10, generator=g) * 3, -1).max(-1).values
    for p in range(1, 40):
        ours = msdnet_thresholds(scores, exit_proportions(p / 20, k_exits))
        ref = official_thresholds(scores, official_proportions(p, k_exits).tolist())
        torch.testing.assert_close(ours, ref.to(ours.dtype))


def test_assign_exits_first_threshold_met():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.0, 0.0, 0.0]])
    th = torch.tensor([0.8, 0.7, -NO_EXIT])
    assert assign_exits(scores, th).tolist() == [0, 1, 2]


def _toy(n=400, seed=0):
    """Exits that get better with depth: exit k is right with probability 0.5 + 0.15 k."""
    g = torch.Generator().manual_seed(seed)
    k_exits = 4
    correct = torch.rand(k_exits, n, generator=g) < torch.tensor([0.5, 0.65, 0.8, 0.95])[:, None]
    scores = (0.5 + 0.4 * correct.float() + 0.1 * torch.rand(k_exits, n, generator=g)).clamp(max=1)
    return scores, correct, [100.0, 200.0, 300.0, 400.0]


def test_dynamic_evaluate_sweep():
    scores, correct, macs = _toy()
    points = dynamic_evaluate(scores, scores, correct, macs)
    assert len(points) == 39
    for pt in points:
        assert 100 <= pt.mean_macs <= 400 and abs(sum(pt.exit_fractions) - 1) < 1e-9
    # more budget, better accuracy (on the toy the confidence is informative)
    assert points[-1].mean_macs > points[0].mean_macs
    assert points[-1].accuracy >= points[0].accuracy
    # confident samples leave early at high accuracy: the dynamic point beats the static exit of the same cost
    cheap = min(points, key=lambda p: abs(p.mean_macs - 200))
    assert cheap.accuracy > correct[1].float().mean()


def test_solve_for_budget_and_accuracy():
    scores, correct, macs = _toy()
    pt = solve_for_budget(scores, correct, macs, target_macs=250)
    assert pt.mean_macs <= 250 and pt.mean_macs > 200
    again = evaluate_thresholds(scores, correct, torch.tensor(pt.thresholds), macs)
    assert again.mean_macs == pt.mean_macs
    acc_pt = solve_for_budget(scores, correct, macs, target_accuracy=0.9)
    assert acc_pt.accuracy >= 0.9 and acc_pt.mean_macs < 400
    with pytest.raises(ValueError, match=r"feasible range \[0.000M .*0.000M"):
        solve_for_budget(scores, correct, macs, target_macs=50)
    with pytest.raises(ValueError, match="feasible range"):
        solve_for_budget(scores, correct, macs, target_macs=500)
    with pytest.raises(ValueError, match="above what the network reaches"):
        solve_for_budget(scores, correct, macs, target_accuracy=0.999)


def test_temperature_scaling_tames_overconfidence():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 10, (500,), generator=g)
    logits = torch.randn(500, 10, generator=g)
    logits[torch.arange(500), targets] += 2.0
    temps = fit_temperatures(torch.stack([logits * 5, logits]), targets)
    # the same logits made 5x sharper need a 5x higher temperature
    assert temps[0] / temps[1] == pytest.approx(5, rel=0.02)
    assert temps[0] > 1 > temps[0] / 25


def test_multi_exit_loss():
    outs = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 10, (8,))
    plain = MultiExitLoss()(outs, y)
    ce = sum(torch.nn.functional.cross_entropy(o, y) for o in outs)
    torch.testing.assert_close(plain, ce)
    kd = MultiExitLoss(distill=0.5)(outs, y)
    assert kd > plain
    kd.backward()
    assert outs[0].grad is not None
    with pytest.raises(ValueError, match="2 exit weights for 3 exits"):
        MultiExitLoss(weights=[1, 1])(outs, y)
