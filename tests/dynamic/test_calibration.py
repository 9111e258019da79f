"""calibrate(): its record is a policy, infeasible budgets say the feasible range, temperatures stay in range."""
import math

import pytest
import torch
from torch.utils.data import Subset

import dyncnn
from dyncnn.data import get_dataset
from dyncnn.dynamic import ExitPolicy
from dyncnn.dynamic.budget import TEMPERATURE_RANGE, fit_temperatures
from dyncnn.dynamic.calibration import calibrate


@pytest.fixture(scope="module")
def val():
    ds = get_dataset("scaled_mnist", "val")
    return Subset(ds, range(64))


def _tiny():
    torch.manual_seed(0)
    return dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1).eval()


def test_record_is_accepted_as_a_policy(val):
    net = _tiny()
    rec = calibrate(net, val, target_fraction=0.8)
    assert isinstance(rec, dict) and rec["format"] == "dyncnn-thresholds-1"      # unchanged for existing callers
    policy = ExitPolicy.of(rec)
    assert policy == ExitPolicy(rec["thresholds"], rec["criterion"], rec["temperatures"])
    x = torch.stack([val[i][0] for i in range(16)])
    a, b = net.infer(x, rec), net.infer(x, policy)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.logits, b.logits)
    assert ExitPolicy.of(policy.to_dict()) == policy
    with pytest.raises(dyncnn.DyncnnError, match="with 'thresholds'"):
        ExitPolicy.of({"threshold": [0.5]})


def test_infeasible_budget_says_the_range_and_the_cheapest_exits_share(val):
    net = _tiny()
    cum = net.exit_macs(val[0][0].unsqueeze(0))
    share = cum[0] / cum[-1]
    assert share > 0.5                  # tiny_mobilenet's first stage runs at full resolution: most of the work
    with pytest.raises(dyncnn.DyncnnError) as e:
        calibrate(net, val, target_fraction=0.5)
    msg = str(e.value)
    assert "feasible range" in msg and f"{share:.1%} of full depth" in msg
    lowest = math.ceil(share * 1000) / 1000
    assert f"[{lowest:.3f}, 1]" in msg
    rec = calibrate(net, val, target_fraction=lowest)          # the range it names is feasible
    assert rec["val_mean_macs"] <= lowest * cum[-1] + 1
    with pytest.raises(dyncnn.DyncnnError, match=r"feasible range.*\(exit 0\)"):
        calibrate(net, val, target_macs=cum[0] / 2)


def test_docs_example_budget_is_feasible_for_msdnet(val):
    """docs/early-exits.md: msdnet_cifar with data=imagenet nBlocks=5 on the digits, then `--budget 0.5`."""
    torch.manual_seed(0)
    net = dyncnn.create_model("msdnet_cifar", num_classes=10, in_chans=1, data="imagenet", nBlocks=5).eval()
    rec = calibrate(net, Subset(val, range(32)), target_fraction=0.5)
    assert rec["exit_macs"][0] < 0.5 * rec["exit_macs"][-1] and rec["val_mean_macs"] <= 0.5 * rec["exit_macs"][-1]


def test_temperatures_are_kept_in_range():
    torch.manual_seed(0)
    targets = torch.randint(0, 10, (400,))
    chance = torch.randn(2, 400, 10)                      # no information: the NLL falls as T grows without end
    sharp = torch.nn.functional.one_hot(targets, 10).float()[None] * 30 + torch.randn(1, 400, 10)
    sharp[0, :40] = sharp[0, :40].roll(1, dims=1)         # overconfident and 10% wrong: T > 1, finite
    temps = fit_temperatures(torch.cat([chance, sharp]), targets)
    assert temps[:2] == [TEMPERATURE_RANGE[1]] * 2
    assert 1.0 < temps[2] < TEMPERATURE_RANGE[1]
    # the search finds the minimum of the NLL over the range (a plain grid of 4001 temperatures as the reference)
    grid = torch.exp(torch.linspace(math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1]), 4001,
                                    dtype=torch.float64))
    nll = torch.stack([torch.nn.functional.cross_entropy(sharp[0].double() / t, targets) for t in grid])
    assert temps[2] == pytest.approx(float(grid[nll.argmin()]), rel=2e-3)
    # a perfectly separated validation set drives T to 0: the fit stops at the end of the range
    perfect = torch.nn.functional.one_hot(targets, 10).float()[None] * 50
    assert fit_temperatures(perfect, targets) == [TEMPERATURE_RANGE[0]]
