"""Freeze the backbone, train the exits (and the classifier), then unfreeze."""
import pytest
import torch
from torch.utils.data import Subset

import dyncnn
from dyncnn.data import MNISTDigits
from dyncnn.train import TrainConfig, Trainer
from dyncnn.train.finetune import set_backbone_frozen, trainable_when_frozen


@pytest.fixture(scope="module")
def data():
    return Subset(MNISTDigits("train"), range(64)), Subset(MNISTDigits("val"), range(32))


def _net():
    torch.manual_seed(0)
    return dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=10, in_chans=1,
                               backbone_cfg={"widths": (8, 16)})


def _split(net):
    """(backbone tensors, exit-head + classifier tensors) of the network's state, copied."""
    keep = {id(t) for m in trainable_when_frozen(net) for t in list(m.parameters()) + list(m.buffers())}
    backbone = {k: v.clone() for k, v in net.state_dict(keep_vars=True).items() if id(v) not in keep}
    heads = {k: v.clone() for k, v in net.state_dict(keep_vars=True).items() if id(v) in keep}
    return backbone, heads


def _changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]) and "num_batches" not in k)


def test_frozen_backbone_then_unfrozen(data):
    net = _net()
    backbone0, heads0 = _split(net)
    assert any(k.startswith("heads.") for k in heads0) and any("classifier" in k or "fc" in k for k in heads0)
    snapshots = []
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False, freeze="backbone", freeze_epochs=1)
    Trainer(net, *data, cfg, callbacks=[lambda r: snapshots.append(_split(net))]).fit()
    (backbone1, heads1), (backbone2, _) = snapshots
    assert _changed(backbone0, backbone1) == []                   # weights and BatchNorm statistics kept
    assert set(_changed(heads0, heads1)) == set(heads0) - {k for k in heads0 if "num_batches" in k}
    assert len(_changed(backbone1, backbone2)) > 0.5 * len(backbone1)   # unfrozen in epoch 2
    assert all(p.requires_grad for p in net.parameters())


def test_frozen_throughout_and_static_models(data):
    net = _net()
    backbone0, _ = _split(net)
    Trainer(net, *data, TrainConfig(epochs=1, batch_size=16, progress=False, freeze="backbone")).fit()
    assert _changed(backbone0, _split(net)[0]) == []
    static = dyncnn.create_model("torchvision:resnet18", num_classes=10, in_chans=1)
    frozen = set_backbone_frozen(static, True)
    assert [n for n, p in static.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert frozen == dyncnn.count_params(static) - 5130
    set_backbone_frozen(static, False)
    assert all(p.requires_grad for p in static.parameters())


def test_freeze_config_is_checked():
    with pytest.raises(ValueError, match="freeze must be one of"):
        TrainConfig(freeze="stem")
    with pytest.raises(ValueError, match="freeze_epochs needs"):
        TrainConfig(freeze_epochs=2)
