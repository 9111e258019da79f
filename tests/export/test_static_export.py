"""Static export: registered, torchvision: and timm: models as one ONNX graph, checked against eager."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyncnn
from dyncnn.dynamic import Cascade
from dyncnn.export import ExportError, check_against_eager, export_bundle, export_onnx, load_bundle


def _real(scaled_mnist, shape, n=16):
    """ScaledMNIST validation images fitted to ``shape`` (resized, channels repeated)."""
    x = scaled_mnist["val"][0][:n]
    if tuple(x.shape[2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
    return x.repeat(1, shape[0], 1, 1).contiguous()


@pytest.mark.parametrize("name,kw,shape", [
    ("tiny_mobilenet", {"in_chans": 1}, (1, 64, 64)),
    ("mobilenet_v3_small", {"in_chans": 1}, (1, 64, 64)),
    ("shufflenet_v2", {"in_chans": 1}, (1, 64, 64)),
    ("torchvision:mobilenet_v3_small", {}, (3, 64, 64)),
    ("timm:mobilenetv3_small_050", {"in_chans": 1}, (1, 64, 64)),
])
def test_static_bundle_matches_eager_on_random_and_real_inputs(tmp_path, scaled_mnist, name, kw, shape):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = dyncnn.create_model(name, num_classes=10, **kw).eval()
    real = _real(scaled_mnist, shape)
    manifest = export_bundle(model, tmp_path / "b", shape, check_inputs=[real])
    assert manifest["kind"] == "static" and manifest["check"] == {"max_rel_err": manifest["check"]["max_rel_err"],
                                                                  "batches": 2, "real_batches": 1}
    assert manifest["check"]["max_rel_err"] < 1e-4
    onnx.checker.check_model(str(tmp_path / "b" / "model.onnx"))
    bundle = load_bundle(tmp_path / "b")
    x = torch.cat([real[:3], torch.randn(2, *shape)])                 # batch 5: the batch axis is dynamic
    with torch.no_grad():
        want = model(x)
    got = bundle.run(x)
    assert got.shape == want.shape == (5, 10)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert manifest["macs"] == dyncnn.count_macs(model, x[:1]).total


def test_export_onnx_and_check_against_eager(tmp_path):
    model = dyncnn.create_model("tiny_mobilenet", num_classes=10).eval()
    path = export_onnx(model, torch.randn(1, 1, 32, 32), tmp_path / "m.onnx")
    err = check_against_eager(model, path, [torch.rand(4, 1, 32, 32), torch.rand(1, 1, 32, 32)])
    assert 0 <= err < 1e-4


class Bessel(nn.Module):
    """An op without an ONNX translation (aten::special_bessel_j0)."""

    def forward(self, x):
        return torch.special.bessel_j0(x)


class WithBadLayer(nn.Module):
    def __init__(self, in_chans=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.Sequential(nn.ReLU(), Bessel()))
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_unexportable_op_names_the_op_and_the_module(tmp_path):
    with pytest.raises(ExportError, match=r"aten::special_bessel_j0.*module 'body\.1\.1' \(Bessel\)"):
        export_bundle(WithBadLayer(), tmp_path / "b", (1, 32, 32))
    with pytest.raises(ExportError, match=r"aten::special_bessel_j0.*module 'body\.1\.1' \(Bessel\)"):
        export_onnx(WithBadLayer(), torch.randn(1, 1, 32, 32), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []                # nothing half-written


def test_unexportable_op_in_a_multi_exit_network_names_the_stage_module(tmp_path):
    net = Cascade([dyncnn.create_model("tiny_mobilenet", widths=(8, 16)), WithBadLayer()], num_classes=10,
                  in_chans=1).eval()
    with pytest.raises(ExportError, match=r"exit 1 .*head WithBadLayer.*aten::special_bessel_j0.*module "
                                          r"'heads\.1\.body\.1\.1' \(Bessel\)"):
        export_bundle(net, tmp_path / "b", (1, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_export_checks_its_arguments(tmp_path):
    model = dyncnn.create_model("tiny_mobilenet").eval()
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        export_bundle(model, tmp_path / "b", (32, 32))
    with pytest.raises(ValueError, match="calibration images"):
        export_bundle(model, tmp_path / "b", (1, 32, 32), quantize=True)
    assert not np.any([p.name == "b" for p in tmp_path.iterdir()])
