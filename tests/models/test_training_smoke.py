"""Training smoke test of every backbone family: does a tiny instance actually learn?

Shape and MAC tests (``test_<family>.py``) cannot catch a network that runs but does not train (a wrong
residual, a dead branch, a shuffle that scrambles channels, a condensing step that drops the wrong weights).
Here one small instance of each family is trained with the real :class:`~dyncnn.train.Trainer` on easy
ScaledMNIST (32x32 canvas filled by the digit, no clutter) for 60-100 steps (one epoch of 32-sample batches,
fewer for the families that learn fastest) and must reach a validation accuracy far above chance (0.1).
CondenseNet V1 / V2 run their whole condensing schedule (it ends at half of training); the converted inference
network must then score exactly what the masked one scores.

Cost is what limits this file (2-core CI machine; the whole file well under 90 s): the models are the smallest
width / depth each family allows (DenseNet-BC: growth 8, as growth 4 does not learn in 100 steps), one thread,
one short epoch. The ImageNet designs (MobileNet, ShuffleNet) reduce a 32x32 input to 1x1 and learn slowest
here, which is why the digits fill the canvas (with digits at 0.5-0.9 of it, 100 steps leave MobileNetV1/V2
near chance). Bar and step counts were checked on seeds 0, 1, 2: every family cleared MIN_ACC = 0.35 by at
least 0.09 (lowest: MobileNetV2, 0.44 / 0.51 / 0.49).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import dyncnn
from dyncnn.data import ScaledMNIST
from dyncnn.models.condensenet import build_condensenet, cifar_cfg
from dyncnn.train import TrainConfig, Trainer, evaluate

BATCH = 32
MIN_SCALE, MAX_SCALE = 1.0, 1.0  # digit side / canvas side
MIN_ACC = 0.35                   # chance is 0.1


def registered(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: dyncnn.create_model(name, num_classes=10, in_chans=1, **kwargs)


def condensenet(v2: bool) -> Callable[[], nn.Module]:
    """A CIFAR CondenseNet with one layer per stage (depth 8), from the builder of the registered models.

    ``condensenet_cifar<d>`` is ``build_condensenet(cifar_cfg(d))`` and ``condensenetv2_cifar`` the same table
    with G = C = 8 and reactivation; their builders take no depth argument and the smallest registered ones
    (depth 50 / 110) cost 0.9 s / 5 s a step on this CPU, so the test builds the depth-8 table directly.
    """
    cfg = cifar_cfg(8, groups=8 if v2 else 4)
    if v2:
        cfg = replace(cfg, sfr_groups=8, sfr_condense_factor=8)
    return lambda: build_condensenet(cfg, num_classes=10, in_chans=1)


# family -> (builder of a tiny 1-channel 10-class instance, training steps)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "mobilenet_v1": (registered("mobilenet_v1", width_mult=0.25), 100),
    "mobilenet_v2": (registered("mobilenet_v2", width_mult=0.25, drop_rate=0.0), 100),
    # V3 keeps BN momentum 0.01 for ImageNet: after 100 steps its running statistics would still be 37% the
    # initial ones (0.99 ** 100), and evaluation would be at chance although training works.
    "mobilenet_v3_small": (registered("mobilenet_v3_small", width_mult=0.25, drop_rate=0.0,
                                      norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1)), 75),
    "shufflenet_v1": (registered("shufflenet_v1_g3_x0_5"), 75),
    "shufflenet_v2": (registered("shufflenet_v2_x0_5"), 75),
    "resnet_cifar": (registered("resnet20_cifar", width_mult=0.25), 60),
    "densenet_bc_cifar": (registered("densenet_bc_cifar", depth=10, growth_rate=8), 100),
    "condensenet_cifar": (condensenet(v2=False), 100),
    "condensenetv2_cifar": (condensenet(v2=True), 100),
}
CONDENSE = ("condensenet_cifar", "condensenetv2_cifar")


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family][0]()


def load_data() -> tuple[ScaledMNIST, ScaledMNIST]:
    kw = dict(canvas=32, min_scale=MIN_SCALE, max_scale=MAX_SCALE, clutter=0)
    return ScaledMNIST("train", **kw), ScaledMNIST("val", **kw)


def train(family: str, model: nn.Module, data, seed: int = 0, steps: int | None = None):
    """One epoch of ``steps`` batches (the family's count by default): AdamW, cosine schedule, 5% warm-up."""
    steps = steps or FAMILIES[family][1]
    cfg = TrainConfig(epochs=1, batch_size=BATCH, optimizer="adamw", lr=1e-2, weight_decay=1e-4,
                      warmup_epochs=0.05, seed=seed, progress=False)
    return Trainer(model, Subset(data[0], range(steps * BATCH)), data[1], cfg).fit()


@pytest.fixture(scope="module")
def data():
    return load_data()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_learns(family, data):
    model = build(family)
    result = train(family, model, data)
    assert result.steps == FAMILIES[family][1]
    assert result.final_val_acc >= MIN_ACC, f"{family}: val acc {result.final_val_acc:.3f} < {MIN_ACC}"
    if family not in CONDENSE:
        return
    # The trainer drove the condensing schedule (it ends at progress 0.5) to the last step's progress; the
    # converted network scores exactly what the masked one does.
    assert model.progress == pytest.approx((result.steps - 1) / result.steps)
    converted = model.convert()
    assert converted.is_converted and not model.is_converted
    n_masked = sum(p.numel() for p in model.parameters())
    n_conv = sum(p.numel() for p in converted.parameters())
    assert n_conv < 0.8 * n_masked, f"conversion kept {n_conv} of {n_masked} parameters"
    assert evaluate(converted, data[1])["acc"] == result.final_val_acc
    x = torch.stack([data[1][i][0] for i in range(64)])
    model.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4)
