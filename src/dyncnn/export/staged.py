"""Bundles: an exported model as ONNX graphs (or ExecuTorch programs) plus a JSON manifest, the portable form
that :func:`dyncnn.export.load_bundle` runs with ONNX Runtime (or ExecuTorch, see :mod:`.executorch`; the
manifest's ``runtime`` says which, and everything below holds for both: only the file written per graph and the
session that runs it differ, :func:`write_graph`).

A **static** model is one graph (``model.onnx``). A **multi-exit** network (``MultiExitNetwork``: MSDNet, RANet,
``multi_exit`` backbones, cascades) is one graph per stage with its exit head (``stage{k}.onnx``), because the
exit decision and the batch compaction between stages happen on the host (:mod:`dyncnn.export.runtime`), exactly
as in eager ``infer``. Stage and head share one graph so that each exit costs one ONNX Runtime call (a call has a
fixed cost of tens of microseconds, which matters at batch 1). The state that flows between stages is any pytree
of batch-first tensors (a dict of named tensors for ``multi_exit`` and RANet, a list of scales for MSDNet); it is
flattened into a fixed ordered list of leaves, and each graph's ONNX inputs are ``in{i}`` (leaf ``i`` of its input
state), its outputs ``out{j}`` (leaf ``j`` of its output state) and ``logits``. The manifest records, per stage,
the pytree structures (``torch.utils._pytree.treespec_dumps``), each output leaf's origin (computed by the graph,
passed through from input leaf ``i`` unchanged, or a constant such as ``None``), per-sample shapes and dtypes, and
where the logits come from (the graph, or a state leaf when the head is an identity). Pass-through leaves (a
segment keeping an earlier value for a later one) never enter ONNX Runtime, so they cost no copy, and the last
stage outputs its logits only.

Stage 0 includes ``model.initial_state``, so the host feeds the raw image. Per-stage and per-head MACs are
measured in eager with the executor's own ``measure_macs`` (FlopCounterMode on one sample), so the bundle's
per-sample ledger equals eager's. The input's channels and spatial size are fixed by the export (MACs depend on
them); only the batch axis is dynamic.

Every export is checked: ``onnx.checker`` on each graph, then the bundle is loaded and every exit's logits are
compared with eager on a random batch and on any real batches given (relative error below 1e-4). The bundle is
built in a temporary folder beside ``out_dir`` and renamed into place, so an interrupted export leaves nothing but
that folder, which the next export into ``out_dir`` removes; an advisory lock keeps a second export out of
``out_dir`` meanwhile (:func:`~.bundle_format.writing_bundle`). The format itself (manifest, file records, checks,
limits) is :mod:`.bundle_format`'s.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps

from ..dynamic.executor import measure_macs
from ..dynamic.exits import as_policy
from ..dynamic.policy import ExitPolicy
from ..dynamic.protocols import EarlyExitModel
from .bundle_format import (FORMAT, GRAPH_SUFFIX, MANIFEST, RUNTIMES, base_manifest,  # noqa: F401 (re-exported)
                            file_record, graph_io, register_writer, registered_writer, sha256_file, write_manifest,
                            writing_bundle)
from .onnx import ExportError, export_graph, relative_error, required_opset

_CONST_TYPES = (type(None), bool, int, float, str)


def is_multi_exit(model: nn.Module) -> bool:
    """Whether ``model`` has the MultiExitNetwork interface (stages, heads, initial_state, infer):
    :class:`~dyncnn.dynamic.protocols.EarlyExitModel`."""
    return isinstance(model, EarlyExitModel)


def write_graph(runtime: str, module: nn.Module, args: Sequence[Tensor], folder: Path, stem: str,
                input_names: Sequence[str], output_names: Sequence[str], *, opset: int, what: str = "",
                strip: str = "", max_batch: int | None = None, calibration=None) -> tuple[str, list, list, dict]:
    """Write one graph of a bundle for ``runtime``: ``module(*args)`` with a dynamic batch axis, as
    ``folder/stem.onnx`` (ONNX Runtime) or ``folder/stem.pte`` (ExecuTorch, lowered to XNNPACK). Returns the file
    name, its input and output names (the ONNX exporter drops unused inputs; an ExecuTorch program keeps them) and
    runtime notes for the manifest (ExecuTorch: the ops that run on portable kernels, the batch bound)."""
    name = stem + GRAPH_SUFFIX[runtime]
    if runtime == "executorch":
        from .executorch import DEFAULT_MAX_BATCH, lower_graph
        notes = lower_graph(module, args, folder / name, max_batch=max_batch or DEFAULT_MAX_BATCH, what=what,
                            strip=strip, calibration=calibration)
        return name, list(input_names), list(output_names), notes
    export_graph(module, args, folder / name, input_names, output_names, opset=opset, what=what, strip=strip)
    ins, outs = graph_io(folder / name)
    return name, ins, outs, {}


def _leaf_record(leaf: Any, where: str) -> dict:
    if isinstance(leaf, Tensor):
        if leaf.dim() == 0:
            raise ExportError(f"{where} is a 0-d tensor; stage states must hold batch-first tensors")
        return {"kind": "tensor", "shape": list(leaf.shape[1:]), "dtype": str(leaf.dtype).replace("torch.", "")}
    if isinstance(leaf, _CONST_TYPES) and not (isinstance(leaf, float) and not math.isfinite(leaf)):
        return {"kind": "const", "value": leaf}
    raise ExportError(f"{where} is a {type(leaf).__name__}; a stage state may hold tensors and constants "
                      f"(None, bool, int, float, str) only")


class _GraphCall(nn.Module):
    """Stage ``k`` of ``model`` followed by its exit head, as a module of flat tensors for the exporter.

    Rebuilds the input state from the tensors it is given and the recorded constants, runs the stage (stage 0
    after ``initial_state``), and returns the output leaves at ``out_pos`` and, with ``with_logits``, the head's
    logits last. ``model`` is a submodule, so export errors name module paths as ``model.stages.1...``.
    """

    def __init__(self, model: nn.Module, k: int, template: list, spec, tensor_pos: list[int], out_pos: list[int],
                 with_logits: bool):
        super().__init__()
        self.model, self.k = model, k
        self.template, self.spec, self.tensor_pos, self.out_pos = template, spec, tensor_pos, out_pos
        self.with_logits = with_logits

    def forward(self, *tensors: Tensor):
        leaves = list(self.template)
        for p, t in zip(self.tensor_pos, tensors):
            leaves[p] = t
        state = tree_unflatten(leaves, self.spec)
        if self.k == 0:
            state = self.model.initial_state(state)
        out = self.model.stages[self.k](state)
        flat = tree_flatten(out)[0]
        res = [flat[j] for j in self.out_pos]
        if self.with_logits:
            res.append(self.model.heads[self.k](out))
        return tuple(res)


def _calibration_chunks(calibration: Tensor | None, runtime: str, batch: int = 32) -> list[Tensor] | None:
    """ExecuTorch INT8 graphs are quantized at export (PT2E): the calibration images in batches."""
    if calibration is None or runtime != "executorch":
        return None
    return [calibration[i:i + batch].float() for i in range(0, len(calibration), batch)]


def _runtime_notes(notes: list[dict]) -> dict:
    """The manifest's ``executorch`` record: batch bound and, per graph, the ops on portable kernels."""
    if not notes or not notes[0]:
        return {}
    return {"executorch": {"max_batch": notes[0]["max_batch"], "delegate": "XnnpackBackend",
                           "portable_ops": [op for n in notes for op in n["portable_ops"]]}}


def _export_static(model: nn.Module, folder: Path, example: Tensor, opset: int, runtime: str = "onnxruntime",
                   max_batch: int | None = None, calibration: list[Tensor] | None = None) -> dict:
    from ..profile.macs import count_macs
    name, _, _, notes = write_graph(runtime, model, (example,), folder, "model", ["input"], ["logits"], opset=opset,
                                    max_batch=max_batch)
    files = {"fp32": file_record(folder, name)}
    if calibration is not None:
        qname, *_ = write_graph(runtime, model, (example,), folder, "model.int8", ["input"], ["logits"],
                                opset=opset, max_batch=max_batch, calibration=[(c,) for c in calibration])
        files["int8"] = file_record(folder, qname)
    with torch.no_grad():
        out = model(example)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ExportError(f"{type(model).__name__} returns {type(out).__name__} from forward, not one (N, classes) "
                          f"logits tensor, and is neither a multi-exit network nor a family with its own bundle "
                          f"writer: it has no bundle format")
    num_classes = int(out.shape[1])
    manifest = base_manifest(model, "static", example.shape[1:], opset, runtime)
    manifest.update(num_classes=num_classes, macs=int(count_macs(model, example[:1]).total),
                    graph={"files": files, "inputs": ["input"], "outputs": ["logits"]}, **_runtime_notes([notes]))
    return manifest


def _output_records(leaves: list, out_leaves: list, where: str) -> list[dict]:
    """Describe a stage's output leaves: computed by the graph, passed through from input leaf ``index`` (the
    very same tensor object), or a constant."""
    records = []
    for j, leaf in enumerate(out_leaves):
        rec = _leaf_record(leaf, f"{where}: output leaf {j}")
        same = [i for i, src in enumerate(leaves) if isinstance(leaf, Tensor) and src is leaf]
        if same:
            rec.update(source="input", index=same[0])
        elif rec["kind"] == "tensor":
            rec.update(source="graph")
        records.append(rec)
    return records


def _export_multi_exit(model: nn.Module, folder: Path, example: Tensor, policy: ExitPolicy, opset: int,
                       runtime: str = "onnxruntime", max_batch: int | None = None,
                       calibration: list[Tensor] | None = None) -> dict:
    k_exits = len(model.stages)
    stages, cum, total, notes = [], [], 0, []
    leaves, spec = tree_flatten(example)           # stage 0's graph input is the raw image
    calib = [tree_flatten(c)[0] for c in calibration] if calibration is not None else None   # each stage's inputs
    with torch.no_grad():
        for k in range(k_exits):
            last = k == k_exits - 1
            where = f"exit {k} (stage {type(model.stages[k]).__name__} + head {type(model.heads[k]).__name__})"
            in_records = [_leaf_record(leaf, f"{where}: input leaf {i}") for i, leaf in enumerate(leaves)]
            state = tree_unflatten(leaves, spec)
            state = model.initial_state(state) if k == 0 else state
            stage_macs = measure_macs(model.stages[k], state)
            out = model.stages[k](state)
            head_macs = measure_macs(model.heads[k], out)
            logits = model.heads[k](out)
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                raise ExportError(f"head {k} must return (N, classes) logits, got "
                                  f"{getattr(logits, 'shape', type(logits).__name__)}")
            out_leaves, out_spec = tree_flatten(out)
            out_records = _output_records(leaves, out_leaves, where)
            # after the last exit nothing reads the state: the last graph computes the logits only
            computed = [] if last else [j for j, r in enumerate(out_records) if r.get("source") == "graph"]
            from_leaf = [j for j, leaf in enumerate(out_leaves) if leaf is logits]
            logits_rec = {"source": "leaf", "index": from_leaf[0]} if from_leaf and not last else {"source": "graph"}
            tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
            template = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]
            entry: dict[str, Any] = {"order": k, "stage_macs": int(stage_macs), "head_macs": int(head_macs),
                                     "files": {}, "inputs": [], "outputs": [], "logits": logits_rec,
                                     "state_in": {"spec": treespec_dumps(spec), "leaves": in_records},
                                     "state_out": {"spec": treespec_dumps(out_spec), "leaves": out_records}}
            with_logits = logits_rec["source"] == "graph"
            if computed or with_logits:
                call = _GraphCall(model, k, template, spec, tensor_pos, computed, with_logits)
                io_names = ([f"in{i}" for i in tensor_pos],
                            [f"out{j}" for j in computed] + (["logits"] if with_logits else []))
                kw = dict(opset=opset, what=f"{type(model).__name__} {where}", strip="model.", max_batch=max_batch)
                name, ins, outs, note = write_graph(runtime, call, [leaves[i] for i in tensor_pos], folder,
                                                    f"stage{k}", *io_names, **kw)
                notes.append(note)
                entry.update(files={"fp32": file_record(folder, name)}, inputs=[int(n[2:]) for n in ins],
                             outputs=[int(n[3:]) for n in outs if n != "logits"])
                if calib is not None:
                    qname, *_ = write_graph(runtime, call, [leaves[i] for i in tensor_pos], folder,
                                            f"stage{k}.int8", *io_names, **kw,
                                            calibration=[[c[i] for i in tensor_pos] for c in calib])
                    entry["files"]["int8"] = file_record(folder, qname)
            if calib is not None and not last:
                calib = [tree_flatten(model.stages[k](model.initial_state(tree_unflatten(c, spec)) if k == 0
                                                      else tree_unflatten(c, spec)))[0] for c in calib]
            stages.append(entry)
            total += stage_macs + head_macs
            cum.append(int(total))
            leaves, spec = out_leaves, out_spec
    manifest = base_manifest(model, "multi_exit", example.shape[1:], opset, runtime)
    manifest.update(num_classes=int(logits.shape[1]), num_exits=k_exits, stages=stages, exit_macs=cum,
                    policy=policy.to_dict(), **_runtime_notes(notes))
    return manifest


def _coerce_policy(model: nn.Module, policy: ExitPolicy | Sequence[float] | None) -> ExitPolicy:
    return as_policy(policy, len(model.stages), error=ExportError)


def check_bundle(model: nn.Module, folder: str | os.PathLike, inputs: Sequence[Tensor], tol: float = 1e-4,
                 precision: str = "fp32") -> float:
    """Worst relative error between the bundle and eager over ``inputs`` (every exit of a multi-exit model);
    raises ExportError at ``tol`` or above."""
    from .runtime import load_bundle
    bundle = load_bundle(folder, precision=precision)
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            want = model(x)
            if is_multi_exit(model):
                got = bundle.exit_logits(x)
                worst = max([worst] + [relative_error(g, w) for g, w in zip(got, want)])
            else:
                worst = max(worst, relative_error(bundle.run_numpy(x), want))
    if worst >= tol:
        raise ExportError(f"bundle {folder} disagrees with eager: relative error {worst:.2e} >= {tol:.0e}")
    return worst


def own_writer(model: nn.Module) -> Callable | None:
    """The bundle writer registered for ``model``'s class (or a base class, see
    :func:`~.bundle_format.register_writer`); None: the staged writer below."""
    from . import glance  # noqa: F401  (the module that registers GFNet's writer)
    return registered_writer(model)


def export_bundle(model: nn.Module, out_dir: str | os.PathLike, input_shape: Sequence[int], *,
                  policy: ExitPolicy | Sequence[float] | None = None, check_inputs: Sequence[Tensor] = (),
                  quantize: bool = False, calibration: Tensor | None = None, single_graph: bool = False,
                  opset: int | None = None, seed: int = 0, runtime: str = "onnxruntime",
                  max_batch: int | None = None, data: dict | None = None) -> dict:
    """Export ``model`` for inputs of shape ``(N, *input_shape)`` into the folder ``out_dir``; returns the manifest.

    Multi-exit networks get one graph per stage with its exit head (see the module docstring), and ``policy``
    (default: full depth) is recorded in the manifest; other models get one graph. The result is checked against
    eager on a random batch and on ``check_inputs`` (relative error below 1e-4; ``manifest["check"]`` holds the
    worst).
    With ``quantize``, INT8 graphs calibrated on ``calibration`` images are added (see :mod:`.quantize`); with
    ``single_graph``, a multi-exit network also gets ``single.onnx``, its ``torch.cond`` form (see :mod:`.cond`).

    ``data`` (the dataset the model was trained on, as its checkpoint records it) is kept in the manifest, so that
    ``dyncnn bench DIR`` times the bundle on the same kind of images.

    ``runtime="executorch"`` writes ExecuTorch programs lowered to XNNPACK instead of ONNX graphs (same bundle
    layout and driver, see :mod:`.executorch`; ``max_batch`` bounds the batch of one program call, larger batches
    run in chunks); its INT8 programs are quantized with the PT2E XNNPACK quantizer at export.
    """
    out_dir = Path(out_dir)
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    writer = own_writer(model)
    if writer is not None:      # a family with its own bundle writer and driver (glance-and-focus)
        if runtime != "onnxruntime" or quantize or single_graph:
            raise ExportError(f"{type(model).__name__} bundles are written for ONNX Runtime in FP32 only (their "
                              f"driver crops patches between graphs): runtime, quantize and single_graph do not apply")
        if len(input_shape) != 3 or input_shape[-1] != input_shape[-2]:
            raise ExportError(f"{type(model).__name__} bundles take square images: input_shape must be (C, S, S), "
                              f"got {tuple(input_shape)}")
        manifest = writer(model, out_dir, policy=policy, check_inputs=check_inputs, input_size=int(input_shape[-1]))
        if data:
            manifest["data"] = dict(data)
            write_manifest(out_dir, manifest)
        return manifest
    if runtime == "executorch":
        from .executorch import require
        require()
        if single_graph:
            raise ExportError("single_graph (the torch.cond form) is written for ONNX Runtime only; export it with "
                              "runtime='onnxruntime'")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ExportError(f"input_shape must be (C, H, W), got {input_shape}")
    if quantize and calibration is None:
        raise ExportError("quantize=True needs calibration images (a few hundred from the validation split)")
    opset = required_opset(model, opset)
    with writing_bundle(out_dir, model) as tmp:
        gen = torch.Generator().manual_seed(seed)
        example = torch.randn(2, *input_shape, generator=gen)       # batch 2: nothing specialises to batch 1
        calib = _calibration_chunks(calibration if quantize else None, runtime)
        opts = dict(runtime=runtime, max_batch=max_batch, calibration=calib)
        if is_multi_exit(model):
            manifest = _export_multi_exit(model, tmp, example, _coerce_policy(model, policy), opset, **opts)
        else:
            manifest = _export_static(model, tmp, example, opset, **opts)
        if data:
            manifest["data"] = dict(data)
        write_manifest(tmp, manifest)
        checks = [torch.randn(3, *input_shape, generator=gen), *check_inputs]
        manifest["check"] = {"max_rel_err": check_bundle(model, tmp, checks), "batches": len(checks),
                             "real_batches": len(check_inputs)}
        if single_graph and manifest["kind"] == "multi_exit":
            from .cond import export_cond_graph
            export_cond_graph(model, tmp / "single.onnx", input_shape, manifest["policy"]["criterion"])
            manifest["single_graph"] = {"files": {"fp32": file_record(tmp, "single.onnx")},
                                        "inputs": ["input", "thresholds", "temperatures"],
                                        "outputs": ["logits", "exit_index"],
                                        "criterion": manifest["policy"]["criterion"],
                                        "condition": "per batch: a batch leaves at exit k when all its samples "
                                                     "are confident there"}
        write_manifest(tmp, manifest)
        if quantize and runtime == "executorch":
            manifest["int8"] = {"method": "PT2E XNNPACKQuantizer (torchao prepare_pt2e / convert_pt2e)",
                                "activations": "int8 static", "weights": "int8 symmetric per-channel",
                                "calibration_images": int(len(calibration))}
            write_manifest(tmp, manifest)
        elif quantize:
            from .quantize import quantize_bundle
            manifest = quantize_bundle(tmp, calibration)
    return manifest
