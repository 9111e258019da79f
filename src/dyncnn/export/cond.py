"""The single-graph form of a multi-exit network: exits as ``torch.cond`` (ONNX ``If``) inside one ONNX graph.

After stage ``k`` and head ``k`` the graph computes the exit confidence of every sample and takes the branch
"leave now" when **all** samples of the batch meet threshold ``k``, otherwise the branch that runs stage ``k + 1``
(itself holding the next ``If``). The graph takes ``input``, ``thresholds`` (K - 1 values) and ``temperatures``
(K values), so one file serves any calibration of the same criterion, and returns ``logits`` and ``exit_index``.
It is exported with the ``torch.export``-based exporter (the TorchScript one cannot export ``torch.cond``) and
runs in ONNX Runtime, which executes only the branch taken: an early exit really skips the later stages.

Limits (why the bundle of per-stage graphs plus the host driver remains the main deployment form):

- the condition is **per batch**: a batch leaves at exit k only if every sample in it is confident there, so
  the result equals per-sample early exit only at batch size 1; at larger batches easy samples ride along to the
  depth the hardest sample needs (no compaction inside the graph);
- the MACs of a call are the exit's cumulative MACs for every sample (looked up from the manifest's per-exit
  figures, not measured inside the graph);
- the criterion is fixed at export (max_prob, entropy or margin), thresholds and temperatures are inputs;
- the confidence is computed by ONNX Runtime's Softmax, not by the host driver's numpy, so a sample within
  ~1e-6 of a threshold may be decided differently from eager;
- export needs ``onnxscript`` (the ``torch.export``-based exporter), and its time grows quickly with the number
  of exits and of state leaves, since every branch nests the rest of the network: on a shared 2-core CPU, 6 s for a
  3-exit ``multi_exit`` on ``tiny_mobilenet``, 95 s for ``msdnet_cifar`` (7 exits), 520 s for a 5-exit RANet with
  three scale flows (against 1-35 s for the per-stage graphs of the same networks);
- dyncnn does not quantize it: the INT8 path works on the per-stage graphs of the bundle;
- it is slower than the bundle even at batch 1, where its decisions are the same: ONNX Runtime runs the stages
  inside the ``If`` branches about three times slower than in their own graphs, and the in-graph exit test and
  ``If`` cost more than the host driver's call and test (``benchmarks/bench_single_graph.py``: a searched cascade
  at its chosen point, 0.250 against 0.105 ms per image at 64x64 and 1.13 against 0.42 at 128x128, 1 thread).

Checked with torch 2.14 and ONNX Runtime 1.32 (``tests/export/test_cond_graph.py``): the nested ``If`` graph
exports, passes ``onnx.checker``, reproduces eager ``infer`` (exit, logits to 1e-4, MACs) sample by sample at
batch 1, and at batch 8 leaves at the first exit where the whole batch is confident.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..dynamic.policy import CRITERIA
from ..dynamic.policy import confidence_unchecked as traceable_confidence
from .onnx import ExportError, writing_onnx


class CondExitNetwork(nn.Module):
    """``forward(x, thresholds, temperatures) -> (logits, exit_index)`` with one ``torch.cond`` per exit."""

    def __init__(self, model: nn.Module, criterion: str = "max_prob"):
        super().__init__()
        if criterion not in CRITERIA:
            raise ExportError(f"unknown exit criterion {criterion!r}; expected one of {CRITERIA}")
        self.model, self.criterion = model, criterion
        self.num_exits = len(model.stages)

    def _level(self, k: int, state: Any, thresholds: Tensor, temperatures: Tensor):
        state = self.model.stages[k](state)
        logits = self.model.heads[k](state)
        if k == self.num_exits - 1:
            return logits.clone(), torch.full_like(logits[:, 0], k, dtype=torch.int64)
        leaves, spec = tree_flatten(state)
        pos = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]
        template = [None if isinstance(v, Tensor) else v for v in leaves]
        conf = traceable_confidence(logits, self.criterion, temperatures[k])
        pred = (conf >= thresholds[k]).all()

        def leave(logits, thresholds, temperatures, *tensors):
            return logits.clone(), torch.full_like(logits[:, 0], k, dtype=torch.int64)

        def go_on(logits, thresholds, temperatures, *tensors):
            rebuilt = list(template)
            for p, t in zip(pos, tensors):
                rebuilt[p] = t
            return self._level(k + 1, tree_unflatten(rebuilt, spec), thresholds, temperatures)

        return torch.cond(pred, leave, go_on, (logits, thresholds, temperatures, *[leaves[p] for p in pos]))

    def forward(self, x: Tensor, thresholds: Tensor, temperatures: Tensor):
        return self._level(0, self.model.initial_state(x), thresholds, temperatures)


def export_cond_graph(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int],
                      criterion: str = "max_prob", check: bool = True) -> Path:
    """Export the single-graph form of ``model`` (a MultiExitNetwork) for inputs ``(N, *input_shape)``."""
    k = len(model.stages)
    net = CondExitNetwork(model, criterion)
    example = (torch.randn(2, *input_shape), torch.full((max(k - 1, 1),), 0.5), torch.ones(k))
    with writing_onnx(path, net, check) as tmp:
        try:
            torch.onnx.export(net, example, tmp, dynamo=True, external_data=False, verbose=False,
                              input_names=["input", "thresholds", "temperatures"],
                              output_names=["logits", "exit_index"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)}, None, None))
        except Exception as e:
            raise ExportError(f"cannot export the single-graph (torch.cond) form of {type(model).__name__}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return Path(path)


class CondGraph:
    """Runs a single-graph export; ``run(x, policy)`` returns an ``ExitResult`` (MACs from ``exit_macs``)."""

    def __init__(self, path: str | os.PathLike, exit_macs: Sequence[int], input_shape: Sequence[int],
                 threads: int = 1, sess: Any = None):
        from .onnx import onnx_session
        self.sess = sess if sess is not None else onnx_session(path, threads)
        self.exit_macs = np.asarray(exit_macs, dtype=np.int64)
        self.num_exits = len(exit_macs)
        self.input_shape = tuple(input_shape)

    def run(self, x: Any, policy) -> Any:
        from ..dynamic.executor import ExitResult
        from ..dynamic.policy import ExitPolicy
        from .host import _as_batch
        policy = ExitPolicy.of(policy)
        x = _as_batch(x, self.input_shape)
        thr = np.asarray((list(policy.thresholds) + [math.inf])[:max(self.num_exits - 1, 1)], dtype=np.float32)
        temps = np.asarray([policy.temperature(k) for k in range(self.num_exits)], dtype=np.float32)
        logits, exit_index = self.sess.run(None, {"input": x, "thresholds": thr, "temperatures": temps})
        exit_index = exit_index.astype(np.int64)
        return ExitResult(torch.from_numpy(logits), torch.from_numpy(exit_index),
                          torch.from_numpy(self.exit_macs[exit_index]))
