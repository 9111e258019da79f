"""Training recipes: the registry ``fit_model`` dispatches on (families with stages), and the plain Trainer run
for every other model."""
import math

import pytest
import torch
from torch.utils.data import TensorDataset

import dyncnn
from dyncnn.models.adafocus import AdaFocus
from dyncnn.models.blockdrop import BlockDrop
from dyncnn.models.gfnet import GFNet
from dyncnn.train import TrainConfig
from dyncnn.train.recipes import collate, fit_model, recipe_for, register_recipe
from dyncnn.train.recipes.blockdrop import fit_blockdrop
from dyncnn.train.recipes.glance import fit_glance_stages
from dyncnn.train.recipes.temporal import fit_adafocus


def test_each_staged_family_has_its_recipe_and_subclasses_inherit_it():
    assert recipe_for(dyncnn.create_model("blockdrop_resnet20_cifar", width_mult=0.25)) is fit_blockdrop
    assert recipe_for(dyncnn.create_model("tiny_mobilenet", widths=(8, 16))) is None

    class MyBlockDrop(BlockDrop):
        pass
    assert recipe_for(MyBlockDrop.__new__(MyBlockDrop)) is fit_blockdrop
    assert recipe_for(GFNet.__new__(GFNet)) is fit_glance_stages
    assert recipe_for(AdaFocus.__new__(AdaFocus)) is fit_adafocus
    with pytest.raises(ValueError, match="already has a training recipe"):
        register_recipe(BlockDrop)(lambda *a, **k: None)


def test_a_plain_model_trains_with_one_trainer_run(tmp_path):
    torch.manual_seed(0)
    model = dyncnn.create_model("tiny_mobilenet", widths=(8, 16), in_chans=1, num_classes=10)
    data = TensorDataset(torch.rand(16, 1, 16, 16), torch.arange(16) % 10)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, progress=False)
    with pytest.raises(TypeError, match="plain Trainer run, which takes no options"):
        fit_model(model, data, data, cfg, stages=1)
    before = [p.detach().clone() for p in model.parameters()]
    result = fit_model(model, data, data, cfg, out_dir=tmp_path)
    assert result.steps == 2 and (tmp_path / "last.safetensors").exists()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    x, y = collate(data, [3, 1])
    assert x.shape == (2, 1, 16, 16) and y.tolist() == [3, 1]


def test_the_shared_ppo_update_favours_actions_with_positive_advantage():
    """GFNet and AdaFocus share one PPO (train/recipes/ppo.py): on a Gaussian policy whose reward is the first
    coordinate of the action, the update moves the mean along that coordinate."""
    from dyncnn.dynamic.rl import RolloutBuffer, gaussian_log_prob
    from dyncnn.train.recipes.ppo import PPOSettings, ppo_update
    torch.manual_seed(0)
    mean = torch.zeros(2, requires_grad=True)
    T, N = 3, 64
    actions = torch.randn(T, N, 2) * 0.1
    buf = RolloutBuffer()
    for t in range(T):
        buf.add((), actions[t], gaussian_log_prob(actions[t], mean.detach().expand(N, 2), 0.1), torch.zeros(N),
                actions[t][:, 0])
    opt = torch.optim.SGD([mean], lr=0.01)
    loss = ppo_update(opt, lambda: (gaussian_log_prob(actions, mean.expand(T, N, 2), 0.1), torch.zeros(T, N)),
                      buf, PPOSettings(updates=3))
    assert math.isfinite(loss)
    assert mean[0].item() > 0.01 and abs(mean[1].item()) < mean[0].item() / 3
