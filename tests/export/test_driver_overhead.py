"""The bundle driver's hot path (issue 29, less fixed cost per call): the input check's first look and the session
call without ONNX Runtime's Python wrapper keep every refusal and every result."""
import numpy as np
import pytest
import torch

import dyncnn
from dyncnn.errors import DyncnnError
from dyncnn.export import export_bundle, load_bundle
from dyncnn.export.host import _as_batch, all_finite


def test_all_finite_refuses_nan_and_inf_and_keeps_huge_finite_values():
    x = np.random.rand(2, 1, 8, 8).astype(np.float32)
    assert all_finite(x)
    huge = x * np.float32(1e30)                  # finite, but its dot product with itself overflows
    assert all_finite(huge)
    np.testing.assert_array_equal(_as_batch(huge, (1, 8, 8)), huge)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 0, 3, 5] = bad
        assert not all_finite(y)
        with pytest.raises(DyncnnError, match="expected finite values, got 1 NaN/Inf"):
            _as_batch(y, (1, 8, 8))
        with pytest.raises(DyncnnError, match="expected finite values"):
            _as_batch(y.astype(np.float64), (1, 8, 8))              # the converting path too


def test_static_driver_calls_the_session_directly_and_times_it(tmp_path):
    net = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 16]).eval()
    export_bundle(net, tmp_path / "s", (1, 32, 32))
    bundle = load_bundle(tmp_path / "s")
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(bundle.run_numpy(x), want, rtol=1e-4, atol=1e-5)
    assert bundle.session_seconds > 0

    class Wrapped:                 # a session without ONNX Runtime's inner one goes through its run()
        calls = 0

        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feed):
            Wrapped.calls += 1
            return self.sess.run(names, feed)
    bundle.sess = Wrapped(bundle.sess)
    np.testing.assert_allclose(bundle.run_numpy(x), want, rtol=1e-4, atol=1e-5)
    assert Wrapped.calls == 1
