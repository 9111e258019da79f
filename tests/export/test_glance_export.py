"""GFNet's staged ONNX bundle: the host driver (numpy crops + per-step graphs + exit thresholds) reproduces eager
``GFNet.infer``: logits, exit steps and MACs."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dyncnn.dynamic.patches import crop_patches
from dyncnn.export.glance import export_glance_bundle, load_glance_bundle
from dyncnn.models.gfnet import gather_patches, traceable_corners
from dyncnn.export.runtime import BundleError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_gfnet import median_thresholds, tiny_gfnet  # noqa: E402


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(16, 1, 64, 64, generator=g) * (torch.rand(16, 1, 1, 1, generator=g) + 0.2)


@pytest.fixture(scope="module")
def exported(images, tmp_path_factory):
    torch.set_num_threads(1)
    model = tiny_gfnet(4, images)
    th = median_thresholds(model, images)
    out = tmp_path_factory.mktemp("gfnet") / "bundle"
    manifest = export_glance_bundle(model, out, policy=th, check_inputs=[images[:8]])
    return model, th, out, manifest


def test_manifest_and_graphs(exported, images):
    model, th, out, manifest = exported
    assert manifest["kind"] == "glance" and manifest["num_exits"] == 3
    assert manifest["exit_macs"] == model.exit_macs(images[:1])
    assert manifest["check"]["max_rel_err"] < 1e-4
    assert sorted(p.name for p in out.glob("*.onnx")) == ["focus.onnx", "focus_last.onnx", "glance.onnx"]
    assert json.loads((out / "manifest.json").read_text())["policy"]["thresholds"] == pytest.approx(th)


def test_driver_equals_eager_infer(exported, images):
    model, th, out, _ = exported
    bundle = load_glance_bundle(out)
    for policy in (th, None, [math.inf, math.inf], [-math.inf, 0.0]):
        want = model.infer(images, policy if policy is not None else th)
        got = bundle.run(images, policy)
        assert got.exit_index.tolist() == want.exit_index.tolist()
        assert got.macs.tolist() == want.macs.tolist()
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    assert len(set(bundle.run(images).exit_index.tolist())) >= 2      # the recorded policy mixes exit steps
    for i in range(3):                                                 # batch 1, the deployment case
        one, want = bundle.run(images[i:i + 1]), model.infer(images[i:i + 1], th)
        assert one.exit_index.tolist() == want.exit_index.tolist() and one.macs.tolist() == want.macs.tolist()
    with torch.no_grad():
        steps = model(images)
    for got, want in zip(bundle.step_logits(images), steps):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_in_graph_crop_equals_torch_crop():
    """The exported focus step crops with a flat-index gather at ``traceable_corners``: the same pixels as
    ``crop_patches`` (half-way corners round half to even in both; out-of-range centres clamp)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 5):
        x = torch.rand(n, 3, 40, 40, generator=g)
        c = torch.rand(n, 2, generator=g) * 1.4 - 0.2
        c[0] = torch.tensor([0.5, 1.0])          # (40 - 16) * 0.5 = 12 exactly; 1.0 -> the last corner
        if n > 1:
            c[1] = torch.tensor([0.5 / 24 * 3, 0.5 / 24 * 5])   # 1.5 and 2.5 pixels: round half to even
        got = gather_patches(x, traceable_corners(c, 40, 16), 16)
        torch.testing.assert_close(got, crop_patches(x, c, 16), rtol=0, atol=0)


def test_bad_bundles_and_inputs(exported, tmp_path, images):
    _, _, out, _ = exported
    with pytest.raises(BundleError, match="no manifest.json"):
        load_glance_bundle(tmp_path)
    bundle = load_glance_bundle(out)
    with pytest.raises(ValueError, match=r"expected shape \(N, 1, 64, 64\)"):
        bundle.run(torch.rand(2, 1, 32, 32))
    with pytest.raises(BundleError, match="expected 2 thresholds"):
        bundle.run(images, [0.5])
    bad = tmp_path / "copy"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "focus.onnx").write_bytes((bad / "focus.onnx").read_bytes()[:-8] + b"00000000")
    with pytest.raises(BundleError, match="checksum"):
        load_glance_bundle(bad)


def test_export_bundle_goes_through_the_glance_writer_and_refuses_what_it_cannot_hold(tmp_path):
    from dyncnn.export import ExportError, export_bundle
    model = tiny_gfnet().eval()
    side = model.cfg.input_size
    for kw in ({"runtime": "executorch"}, {"quantize": True}, {"single_graph": True}):
        with pytest.raises(ExportError, match="ONNX Runtime in FP32 only"):
            export_bundle(model, tmp_path / "refused", (model.in_chans, side, side), **kw)
        assert not (tmp_path / "refused").exists()
    with pytest.raises(ExportError, match="square images"):
        export_bundle(model, tmp_path / "refused", (model.in_chans, side, side // 2))
    manifest = export_bundle(model, tmp_path / "b", (model.in_chans, side, side), policy=[0.5] * (model.num_exits - 1))
    assert manifest["kind"] == "glance" and load_glance_bundle(tmp_path / "b").manifest["kind"] == "glance"


def test_glance_bundles_come_from_the_registered_writer():
    import dyncnn
    from dyncnn.export import own_writer, register_writer
    from dyncnn.export.glance import export_glance_bundle
    from dyncnn.models.gfnet import GFNet
    assert own_writer(dyncnn.create_model("gfnet_tiny_mnist")) is export_glance_bundle
    assert own_writer(dyncnn.create_model("tiny_mobilenet", widths=(8, 16))) is None   # the staged writer
    with pytest.raises(ValueError, match="already has a bundle writer"):
        register_writer(GFNet)(lambda *a, **k: None)
