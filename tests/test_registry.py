import pytest
import torch
import torchvision

import dyncnn
from dyncnn import create_model, list_models, register_model
from dyncnn.models.registry import UnknownModelError


def test_create_registered_model_records_spec():
    m = create_model("tiny_mobilenet", num_classes=7, widths=(8, 16))
    assert m.fc.out_features == 7
    assert m.dyncnn_spec == {"name": "tiny_mobilenet", "cfg": {"widths": (8, 16), "num_classes": 7}}
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_name_lists_closest():
    with pytest.raises(UnknownModelError, match="closest registered names: tiny_mobilenet"):
        create_model("tiny_mobilenett")
    with pytest.raises(KeyError):
        create_model("no_such_model_at_all")


def test_list_models_pattern():
    assert "tiny_mobilenet" in list_models("tiny*")
    assert list_models("zzz*") == []
    assert "torchvision:mobilenet_v2" in list_models("torchvision:mobilenet*", include_external=True)


def test_torchvision_prefix_builds_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))      # an empty hub cache: weights by name are not there
    ours = create_model("torchvision:mobilenet_v2", num_classes=10)
    ref = torchvision.models.mobilenet_v2(num_classes=10)
    assert dyncnn.count_params(ours) == dyncnn.count_params(ref)
    with pytest.raises(UnknownModelError, match="torchvision:mobilenet_v2"):
        create_model("torchvision:mobilenet_v22")
    with pytest.raises(dyncnn.DyncnnError, match="never downloads"):
        create_model("torchvision:mobilenet_v2", weights="DEFAULT")


def test_timm_prefix():
    timm = pytest.importorskip("timm")
    m = create_model("timm:mobilenetv3_small_050", num_classes=5)
    ref = timm.create_model("mobilenetv3_small_050", num_classes=5)
    assert dyncnn.count_params(m) == dyncnn.count_params(ref)
    with pytest.raises(dyncnn.DyncnnError, match="never downloads"):
        create_model("timm:mobilenetv3_small_050", pretrained=True)


def test_unknown_source_prefix():
    with pytest.raises(dyncnn.DyncnnError, match="expected 'torchvision:' or 'timm:'"):
        create_model("keras:mobilenet")


def test_register_twice_is_refused(monkeypatch):
    from dyncnn.models import registry
    list_models()                                   # the built-in families first, then a copy the test may change
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model(name="_test_dummy_model")
    def dummy(num_classes=10):
        return torch.nn.Linear(2, num_classes)

    assert isinstance(create_model("_test_dummy_model"), torch.nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="_test_dummy_model")
    monkeypatch.undo()
    assert "_test_dummy_model" not in list_models()  # nothing left registered for the tests after this one


def test_model_class_names_what_a_builder_builds():
    from dyncnn.models import model_class
    from dyncnn.models.msdnet import MSDNet
    assert model_class("msdnet_cifar") is MSDNet
    assert all(model_class(n) is not None for n in list_models())
    with pytest.raises(dyncnn.DyncnnError, match="msdnet_cifar"):
        model_class("msdnet_cifarr")
