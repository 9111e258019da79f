import math

import pytest
import torch

from dyncnn.dynamic.rl import (RolloutBuffer, blockdrop_reward, discounted_returns, gaussian_log_prob, ppo_loss,
                             reinforce_loss, sample_bernoulli, sample_gaussian)


def test_blockdrop_reward():
    actions = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).float()
    r = blockdrop_reward(actions, torch.tensor([True, True, False]), gamma=5)
    assert torch.allclose(r, torch.tensor([1 - 0.25, 0.0, -5.0]))


def test_reinforce_raises_the_probability_of_rewarded_actions():
    torch.manual_seed(0)
    logit = torch.zeros(1, 1, requires_grad=True)
    opt = torch.optim.SGD([logit], lr=0.5)
    for _ in range(60):
        probs = torch.sigmoid(logit).expand(64, 1)
        actions, logp = sample_bernoulli(probs)
        reward = actions.squeeze(1)               # action 1 is rewarded
        loss = reinforce_loss(logp, reward, baseline=reward.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.sigmoid(logit).item() > 0.9


def test_exploration_clamps_probabilities():
    torch.manual_seed(0)
    a, _ = sample_bernoulli(torch.zeros(10000, 1), explore=0.2)
    assert 0.17 < a.mean().item() < 0.23


def test_discounted_returns():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    assert torch.allclose(discounted_returns(r, 0.5), torch.tensor([[1.5], [1.0], [2.0]]))


def test_gaussian_log_prob_and_sampling_clip():
    mean = torch.tensor([[0.5, 0.5]])
    lp = gaussian_log_prob(mean, mean, 0.1)
    assert lp.item() == pytest.approx(2 * (-math.log(0.1) - 0.5 * math.log(2 * math.pi)))
    torch.manual_seed(0)
    a, _ = sample_gaussian(torch.zeros(1000, 2), 0.5)
    assert a.min() >= 0 and a.max() <= 1


def test_ppo_clips_the_ratio():
    old = torch.zeros(4)
    new = torch.full((4,), math.log(2.0), requires_grad=True)   # ratio 2
    adv = torch.ones(4)
    loss = ppo_loss(new, old, adv, clip=0.2)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert torch.all(new.grad == 0)      # clipped: no gradient pushes the ratio further


def test_rollout_buffer_advantages_are_normalised():
    buf = RolloutBuffer()
    for t in range(3):
        buf.add(torch.randn(5, 2), torch.rand(5, 2), torch.zeros(5), torch.zeros(5), torch.full((5,), float(t)))
    returns, adv = buf.returns_and_advantages(gamma=0.7)
    assert returns.shape == (3, 5) and abs(adv.mean().item()) < 1e-5
    assert returns[2, 0].item() == 2.0 and returns[1, 0].item() == pytest.approx(1 + 0.7 * 2)
    buf.clear()
    assert len(buf) == 0
