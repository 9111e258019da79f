"""Shared fixtures of the export tests: the ScaledMNIST splits (built once per session) and tiny networks."""
import pytest
import torch

import dyncnn
from dyncnn.dynamic import ExitPolicy


@pytest.fixture(scope="session")
def scaled_mnist():
    """The real data: ScaledMNIST val (500) and test (1000) images on the 64x64 canvas, with their labels."""
    from dyncnn.data import ScaledMNIST
    out = {}
    for split in ("val", "test"):
        ds = ScaledMNIST(split, canvas=64, clutter=2)
        out[split] = (torch.stack([ds[i][0] for i in range(len(ds))]), ds.targets.clone())
    return out


def _tiny_multi_exit(seed: int = 0, bn_images: torch.Tensor | None = None) -> torch.nn.Module:
    """multi_exit on tiny_mobilenet widths (8, 16, 32), one input channel: 3 exits (the last is the backbone's).

    Random weights. With ``bn_images``, the batch-norm statistics are set on them (one pass in train mode): at
    initialisation (mean 0, variance 1) the features of a random net collapse and every image gets nearly the
    same confidence, which would put every sample within float rounding of any threshold.
    """
    torch.manual_seed(seed)
    model = dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1,
                                backbone_cfg={"widths": [8, 16, 32]})
    if bn_images is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None            # cumulative average over the pass
                m.reset_running_stats()
        model.train()
        with torch.no_grad():
            model(bn_images)
    return model.eval()


def _spread_policy(model, x, criterion="max_prob", temperatures=()) -> ExitPolicy:
    """Thresholds on ``x`` (the validation images) that send about a third of the samples to each exit."""
    from dyncnn.dynamic.policy import confidence
    with torch.no_grad():
        outs = model(x)
    temps = list(temperatures) or [1.0] * len(outs)
    left = torch.ones(len(x), dtype=torch.bool)
    thresholds = []
    for k, logits in enumerate(outs[:-1]):
        conf = confidence(logits, criterion, temps[k])
        share = 1.0 / (len(outs) - k)                      # of the samples still present
        thr = float(torch.quantile(conf[left].double(), 1.0 - share))
        thresholds.append(thr)
        left &= conf < thr
    return ExitPolicy(thresholds, criterion, temps)


@pytest.fixture(scope="session")
def tiny_multi_exit():
    return _tiny_multi_exit


@pytest.fixture(scope="session")
def spread_policy():
    return _spread_policy
