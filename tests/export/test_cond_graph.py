"""The single-graph form with torch.cond (ONNX If): per-sample early exit at batch 1, per-batch above."""
import onnx
import pytest
import torch

from dyncnn.dynamic.policy import confidence
from dyncnn.export import export_bundle, load_bundle

pytest.importorskip("onnxscript")


def test_single_graph_exits_like_eager_at_batch_1_and_per_batch_above(tmp_path, tiny_multi_exit, spread_policy):
    x = torch.rand(300, 1, 32, 32)
    model = tiny_multi_exit(bn_images=x)
    policy = spread_policy(model, x[:200], "max_prob", [0.05, 0.05, 1.0])
    manifest = export_bundle(model, tmp_path / "b", (1, 32, 32), policy=policy, single_graph=True)
    entry = manifest["single_graph"]
    assert entry["criterion"] == "max_prob" and entry["inputs"] == ["input", "thresholds", "temperatures"]
    graph = onnx.load(str(tmp_path / "b" / "single.onnx")).graph
    assert sum(n.op_type == "If" for n in graph.node) == 1          # the nested If holds the later exits
    single = load_bundle(tmp_path / "b").single_graph()
    test = x[200:240]
    want = model.infer(test, policy)
    assert len(set(want.exit_index.tolist())) == 3
    for i in range(len(test)):                                      # batch 1: per-sample early exit
        got = single.run(test[i:i + 1], policy)
        assert int(got.exit_index) == int(want.exit_index[i]) and int(got.macs) == int(want.macs[i])
        assert float((got.logits[0] - want.logits[i]).abs().max() / want.logits[i].abs().max()) < 1e-4
    # batch 8: the batch leaves at the first exit where all of its samples are confident
    batch = test[:8]
    with torch.no_grad():
        outs = model(batch)
    confident = [bool((confidence(outs[k], "max_prob", 0.05) >= policy.thresholds[k]).all()) for k in range(2)]
    k = confident.index(True) if True in confident else 2
    got = single.run(batch, policy)
    assert (got.exit_index == k).all() and (got.macs == manifest["exit_macs"][k]).all()
    assert float((got.logits - outs[k]).abs().max() / outs[k].abs().max()) < 1e-4
    # thresholds are an input: the same file serves another calibration
    assert (single.run(batch, [-1.0, -1.0]).exit_index == 0).all()
    assert (single.run(batch, [2.0, 2.0]).exit_index == 2).all()


def test_bundle_without_single_graph_says_so(tmp_path, tiny_multi_exit):
    export_bundle(tiny_multi_exit(), tmp_path / "b", (1, 32, 32))
    with pytest.raises(ValueError, match="no single graph"):
        load_bundle(tmp_path / "b").single_graph()
