import numpy as np
import onnx
import pytest
import torch

import dyncnn
from dyncnn.export import export_onnx, onnx_session


@pytest.mark.parametrize("name,shape", [("tiny_mobilenet", (1, 32, 32)), ("torchvision:mobilenet_v3_small", (3, 64, 64))])
def test_onnx_export_matches_eager_with_dynamic_batch(tmp_path, name, shape):
    model = dyncnn.create_model(name).eval()
    path = export_onnx(model, torch.randn(1, *shape), tmp_path / "m.onnx")
    onnx.checker.check_model(str(path))
    sess = onnx_session(path, threads=1)
    x = torch.randn(3, *shape)                        # a batch size the export never saw
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() / (np.abs(want).max() + 1e-12) < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]    # written atomically, no leftovers


def test_export_rejects_unknown_exporter(tmp_path):
    with pytest.raises(ValueError, match="exporter must be"):
        export_onnx(dyncnn.create_model("tiny_mobilenet"), torch.randn(1, 1, 32, 32), tmp_path / "m.onnx",
                    exporter="tf")
    assert list(tmp_path.iterdir()) == []
