"""Local pretrained weights: state dict files the test writes, the torch hub cache, never a download."""
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import dyncnn
from dyncnn.errors import CheckpointError
from dyncnn.models.pretrained import hub_weights_path


@pytest.fixture(scope="module")
def reference():
    """A torchvision ResNet-18 (1000 classes, RGB) with seeded weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
    return m.eval()


def _same(a: dict, b: dict, skip=()):
    for k, v in a.items():
        if k not in skip:
            assert torch.equal(v, b[k]), k


def test_pth_file_loads_all_keys(reference, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    m = dyncnn.create_model("torchvision:resnet18", weights=path).eval()
    _same(m.state_dict(), reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), reference(x))
    assert m.dyncnn_weights == {"file": str(path), "into": "model", "adapted_stem": [], "dropped_classifier": []}
    assert "weights" not in m.dyncnn_spec["cfg"]        # a checkpoint rebuilds the model, its weights follow


def test_new_classes_and_grey_input_adapt_stem_and_drop_classifier(reference, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    torch.manual_seed(1)
    fresh_fc = torchvision.models.resnet18(num_classes=10).fc.weight.clone()
    torch.manual_seed(1)
    m = dyncnn.create_model("torchvision:resnet18", num_classes=10, in_chans=1, weights=path).eval()
    assert m.dyncnn_weights["adapted_stem"] == ["conv1.weight"]
    assert m.dyncnn_weights["dropped_classifier"] == ["fc.bias", "fc.weight"]
    assert m.fc.weight.shape == (10, 512) and torch.equal(m.fc.weight, fresh_fc)   # the builder's own init
    torch.testing.assert_close(m.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    _same(m.state_dict(), reference.state_dict(), skip={"conv1.weight", "fc.weight", "fc.bias"})
    # a grey image gives the features the RGB network gives its replicated version
    x = torch.rand(2, 1, 32, 32)
    feats = torch.nn.Sequential(*list(m.children())[:-1])
    ref_feats = torch.nn.Sequential(*list(reference.children())[:-1])
    torch.testing.assert_close(feats(x), ref_feats(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_wrapped_and_prefixed_training_checkpoint(reference, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    m = dyncnn.create_model("torchvision:resnet18", weights=str(path))
    _same(m.state_dict(), reference.state_dict())


def test_mismatch_lists_missing_and_unexpected_keys(reference, tmp_path):
    state = dict(reference.state_dict())
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["layer2.0.bn1.bias"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        dyncnn.create_model("torchvision:resnet18", weights=path)
    msg = str(e.value)
    assert "missing keys: layer1.0.conv1.weight" in msg and "unexpected keys: extra.weight" in msg
    assert "layer2.0.bn1.bias: model (128,) vs weights" in msg and str(path) in msg


def test_files_that_are_not_state_dicts(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))
    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(dyncnn.DyncnnError, match="weights_only"):
        dyncnn.create_model("torchvision:resnet18", weights=bad)
    with pytest.raises(dyncnn.DyncnnError, match="does not exist"):
        dyncnn.create_model("torchvision:resnet18", weights=tmp_path / "none.pth")
    lst = tmp_path / "list.pth"
    torch.save([1, 2], lst)
    with pytest.raises(dyncnn.DyncnnError, match="expected a state dict"):
        dyncnn.create_model("torchvision:resnet18", weights=lst)


def test_weights_by_name_come_from_the_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert hub_weights_path("mobilenet_v3_small", "DEFAULT")[0] == expected
    with pytest.raises(dyncnn.DyncnnError, match="never downloads") as e:
        dyncnn.create_model("torchvision:mobilenet_v3_small", weights="DEFAULT")
    assert str(expected) in str(e.value) and "download.pytorch.org" in str(e.value)
    with pytest.raises(dyncnn.DyncnnError, match="IMAGENET1K_V1"):
        dyncnn.create_model("torchvision:mobilenet_v3_small", weights="IMAGENET9K")
    torch.manual_seed(2)
    ref = torchvision.models.mobilenet_v3_small()
    expected.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), expected)
    for name in ("DEFAULT", "IMAGENET1K_V1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        _same(dyncnn.create_model("torchvision:mobilenet_v3_small", weights=name).state_dict(), ref.state_dict())
    with pytest.raises(dyncnn.DyncnnError, match="not a file"):
        dyncnn.create_model("tiny_mobilenet", weights="DEFAULT")


def test_timm_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    ref = timm.create_model("mobilenetv3_small_050")
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    m = dyncnn.create_model("timm:mobilenetv3_small_050", num_classes=7, in_chans=1, weights=path)
    assert m.dyncnn_weights["adapted_stem"] == ["conv_stem.weight"]
    assert m.dyncnn_weights["dropped_classifier"] == ["classifier.bias", "classifier.weight"]
    _same(m.state_dict(), ref.state_dict(), skip={"conv_stem.weight", "classifier.weight", "classifier.bias"})


def test_multi_exit_takes_its_backbones_file(reference, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = dyncnn.create_model("multi_exit", backbone="torchvision:resnet18", num_classes=1000, weights=path).eval()
    assert net.exit_stages == ["layer2", "layer3", "layer4"] and "weights" not in net.dyncnn_spec["cfg"]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net(x)[-1], reference(x))
    grey = dyncnn.create_model("multi_exit", backbone="torchvision:resnet18", in_chans=1, weights=path)
    assert grey.dyncnn_weights["adapted_stem"] == ["conv1.weight"] and grey.dyncnn_weights["dropped_classifier"]
    assert grey.dyncnn_weights["into"] == "backbone" and net.dyncnn_weights["into"] == "backbone"


def test_timm_default_weights_come_from_the_hugging_face_cache_only(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(dyncnn.DyncnnError, match="never downloads") as e:
        dyncnn.create_model("timm:mobilenetv3_small_050", weights="DEFAULT")
    repo = tmp_path / "hf" / "models--timm--mobilenetv3_small_050.lamb_in1k"
    assert f"{repo}/snapshots/REVISION/model.safetensors" in str(e.value)
    assert "huggingface.co/timm/mobilenetv3_small_050.lamb_in1k" in str(e.value)
    torch.manual_seed(4)
    ref = timm.create_model("mobilenetv3_small_050")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(repo / "snapshots" / "abc123" / "model.safetensors"))
    m = dyncnn.create_model("timm:mobilenetv3_small_050", weights="DEFAULT")
    _same(m.state_dict(), ref.state_dict())
    assert m.dyncnn_weights["file"] == str(repo / "snapshots" / "abc123" / "model.safetensors")
    net = dyncnn.create_model("multi_exit", backbone="timm:mobilenetv3_small_050", num_classes=1000,
                              weights="DEFAULT")
    assert net.dyncnn_weights["into"] == "backbone"
