"""Stage-wise training: stage k learns for exit k while the stages before it stay exactly as they were."""
import pytest
import torch
from torch.utils.data import Subset

import dyncnn
from dyncnn.data import MNISTDigits
from dyncnn.errors import DyncnnError
from dyncnn.train import TrainConfig, read_checkpoint
from dyncnn.train.recipes import fit_model, recipe_for
from dyncnn.train.recipes.stagewise import StageObjective, fit_multi_exit, fit_stagewise


@pytest.fixture(scope="module")
def data():
    return Subset(MNISTDigits("train"), range(64)), Subset(MNISTDigits("val"), range(32))


def _net(**kw):
    torch.manual_seed(0)
    return dyncnn.create_model("multi_stage", num_classes=10, in_chans=1, widths=[[4, 8], [4, 8], [2, 4]], **kw)


def _state(net, prefixes):
    return {k: v.clone() for k, v in net.state_dict().items() if k.startswith(prefixes)}


def _cfg(**kw):
    return TrainConfig(epochs=1, batch_size=16, lr=0.05, progress=False, **kw)


def test_each_stage_trains_alone_and_earlier_exits_stay(data, tmp_path):
    net = _net()
    x = torch.stack([data[1][i][0] for i in range(8)])
    before = _state(net, ("stages.", "heads."))
    snapshots = []

    result = fit_stagewise(net, *data, _cfg(), out_dir=tmp_path, log=snapshots.append)
    assert [h["stage"] for h in result.history] == [0, 1, 2] and len(snapshots) == 3
    assert result.steps == 3 * (64 // 16)
    after = _state(net, ("stages.", "heads."))
    for k in range(3):       # every stage (weights and normalization statistics) and head was trained
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith((f"stages.{k}.",
                                                                                       f"heads.{k}.")))
    assert all(p.requires_grad for p in net.parameters())

    # retraining stage 2 alone changes nothing that exits 0 and 1 compute (poisoned later stages prove they are
    # not read), and changes exit 2
    net.eval()
    with torch.no_grad():
        ref = [t.clone() for t in net(x)]
    kept = _state(net, ("stages.0.", "stages.1.", "heads.0.", "heads.1."))
    objective = StageObjective(net, 2)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == \
        {n for n, _ in net.named_parameters() if n.startswith(("stages.2.", "heads.2."))}
    objective.train()
    assert not net.stages[0].training and not net.stages[1].training and net.stages[2].training
    opt = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(objective(x), torch.arange(8) % 10).backward()
        opt.step()
    objective.release()
    assert all(torch.equal(v, net.state_dict()[n]) for n, v in kept.items())
    net.eval()
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
    assert not torch.allclose(out[2], ref[2])


def test_checkpoints_per_stage_and_the_whole_network(data, tmp_path):
    net = _net()
    fit_stagewise(net, *data, _cfg(), out_dir=tmp_path)
    for k in range(3):
        assert (tmp_path / f"stage{k}" / "last.safetensors").exists()
    _, meta = read_checkpoint(tmp_path / "last.safetensors")
    assert meta["train_state"]["stagewise"] and meta["train_state"]["epoch"] == 1
    assert {h["stage"] for h in meta["train_state"]["history"]} == {0, 1, 2}
    again = _net()
    dyncnn.train.load_checkpoint(tmp_path / "last.safetensors", again)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))

    # a second run resumes every finished stage: nothing changes
    resumed = _net()
    fit_stagewise(resumed, *data, _cfg(), out_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), resumed.state_dict().values()))


def test_clear_errors():
    with pytest.raises(DyncnnError, match="multi-exit network"):
        StageObjective(dyncnn.create_model("tiny_mobilenet", widths=[4, 8]), 0)
    with pytest.raises(ValueError, match=r"stage must be an int in \[0, 2\]"):
        StageObjective(_net(), 3)
    with pytest.raises(ValueError, match="drop freeze"):
        fit_stagewise(_net(), None, None, _cfg(freeze="backbone"))


def test_the_recipe_from_create_model_and_the_cli(data, tmp_path, capsys):
    assert recipe_for(_net()) is fit_multi_exit
    with pytest.raises(ValueError, match="choose one"):
        _net(stagewise=True, imta=True)
    with pytest.raises(DyncnnError, match="'stagewise' expects bool"):
        _net(stagewise="yes")
    # without stagewise=True a multi-exit network trains in one Trainer run (no stage folders)
    fit_model(_net(), *data, _cfg(), out_dir=tmp_path / "joint")
    assert not (tmp_path / "joint" / "stage0").exists() and (tmp_path / "joint" / "last.safetensors").exists()

    from dyncnn.cli import main
    out = tmp_path / "cli"
    assert main(["train", "--model", "multi_stage", "--dataset", "scaled_mnist", "--canvas", "32", "--clutter", "0",
                 "--epochs", "1", "--batch-size", "64", "--cfg", "widths=[[4, 8], [2, 4]]", "stagewise=true",
                 "--out", str(out)]) == 0
    assert "stage 2/2: exit 1 val acc" in capsys.readouterr().out
    model, meta = dyncnn.train.load_checkpoint(out / "last.safetensors")
    assert model.stagewise and meta["train_state"]["stagewise"]
    assert (out / "stage0" / "last.safetensors").exists() and (out / "stage1" / "last.safetensors").exists()
