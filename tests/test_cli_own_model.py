"""Issue 27 from the command line: torchvision networks on 1-channel digits, --init from a state dict file,
--freeze backbone, --dataset folder, and `dyncnn frontier --dataset ... --data-root ...`."""
import json

import pytest
import torch
import torchvision

from dyncnn.cli import main
from dyncnn.train import read_checkpoint


@pytest.mark.parametrize("model", ["torchvision:mobilenet_v3_small", "torchvision:resnet18"])
def test_torchvision_models_train_on_one_channel_digits(model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", "mnist", "--epochs", "1", "--batch-size", "1000",
                 "--lr", "0.01", "--out", str(out)]) == 0                  # 28x28 digits, 3 steps
    assert "for 3 steps" in capsys.readouterr().out
    _, meta = read_checkpoint(out / "last.safetensors")
    assert meta["model"] == {"name": model, "cfg": {"in_chans": 1, "num_classes": 10}}
    assert main(["eval", str(out / "last.safetensors"), "--split", "val", "--json"]) == 0   # rebuilt from its header
    assert json.loads(capsys.readouterr().out)["n"] == 500


def test_init_from_a_state_dict_file_and_freeze_the_backbone(tmp_path, capsys):
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v3_small()                               # 1000 classes, RGB
    torch.save(ref.state_dict(), tmp_path / "mnv3.pth")
    out = tmp_path / "run"
    assert main(["train", "--model", "torchvision:mobilenet_v3_small", "--dataset", "mnist", "--epochs", "1",
                 "--batch-size", "1000", "--init", str(tmp_path / "mnv3.pth"),
                 "--freeze", "backbone", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "initialised model; stem adapted: features.0.0.weight; classifier left new: classifier.3.bias, " \
           "classifier.3.weight" in printed
    tensors, _ = read_checkpoint(out / "last.safetensors")
    # the frozen backbone is the file's (its stem summed over RGB, its BatchNorm statistics); only the last layer,
    # new for 10 classes, learned
    torch.testing.assert_close(tensors["model.features.0.0.weight"], ref.features[0][0].weight.sum(1, keepdim=True))
    assert torch.equal(tensors["model.features.5.block.0.1.running_var"], ref.features[5].block[0][1].running_var)
    assert torch.equal(tensors["model.classifier.0.weight"], ref.classifier[0].weight)
    assert tensors["model.classifier.3.weight"].shape == (10, 1024)
    # a file that does not fit says which keys
    torch.save({"nonsense.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    assert main(["train", "--model", "torchvision:mobilenet_v3_small", "--dataset", "mnist", "--epochs", "1",
                 "--init", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "missing keys: classifier.0.bias" in err and "more)" in err
    assert "unexpected keys: nonsense.weight" in err


def test_train_and_eval_on_an_image_folder(tmp_path, write_image_tree, capsys):
    root = write_image_tree(tmp_path / "images", per_class=12, size=20)
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny_mobilenet", "--cfg", "widths=[8,16]", "--dataset", "folder",
                 "--data-root", str(root), "--image-size", "16", "--epochs", "2", "--batch-size", "8",
                 "--out", str(out)]) == 0
    _, meta = read_checkpoint(out / "last.safetensors")
    assert meta["data"] == {"name": "folder", "root": str(root), "seed": 0, "input_size": 16}
    assert meta["model"]["cfg"]["in_chans"] == 3 and meta["model"]["cfg"]["num_classes"] == 3
    capsys.readouterr()
    assert main(["eval", str(out / "last.safetensors"), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4      # 10% of 36, carved with the recorded seed and size


def test_frontier_takes_the_users_data(tmp_path, monkeypatch, capsys):
    import dyncnn.frontier.runner as runner
    seen = []
    monkeypatch.setattr(runner, "run_frontier", lambda s: seen.append(s))
    assert main(["frontier", "--dataset", "folder", "--data-root", str(tmp_path), "--out", str(tmp_path / "f")]) == 0
    assert (seen[0].dataset, seen[0].data_root, seen[0].canvas) == ("folder", str(tmp_path), 64)
    assert main(["frontier", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "f")]) == 0
    assert seen[1].canvas == 32
    assert main(["frontier", "--dataset", "folder", "--out", str(tmp_path / "f")]) == 2
    assert "give data_root (--data-root)" in capsys.readouterr().err
