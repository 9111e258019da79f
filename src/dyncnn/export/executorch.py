"""ExecuTorch programs (``.pte``) lowered to XNNPACK, PyTorch's own on-device runtime and the kernel library phones
run, as the second runtime of dyncnn bundles (``pip install dyncnn[mobile]``).

A bundle is the same for both runtimes (see :mod:`dyncnn.export.staged`): one program for a static model, one per
stage with its exit head for a multi-exit network, the same manifest with ``"runtime": "executorch"``. Only the
per-graph session differs: :class:`ExecuTorchSession` has ONNX Runtime's ``run(output_names, feed)`` interface, so
the host-side driver (:mod:`dyncnn.export.runtime`: exit policy, batch compaction, MAC ledger) is shared.

**Batch size.** ExecuTorch plans every tensor's memory ahead of time, so a program's shapes have an upper bound.
Each graph is exported with a dynamic batch axis ``1..max_batch`` (default 64; all inputs share it) and XNNPACK
resizes its kernels to the batch of each call, so batch compaction between exits works as with ONNX Runtime (a
compacted batch is simply smaller). A batch above ``max_batch`` is run in chunks of ``max_batch`` by the session.
Memory is planned for ``max_batch``; a larger bound costs memory, not speed. (XNNPACK's batch-norm fusion pass
re-traces convolutions with the example batch as a hint, and PyTorch's fake convolution then narrows the batch
range to below 16; the range is reset to the one exported before memory planning, and the session reads the real
bound back from the program, so a narrowed bound could only cost chunking, never a wrong answer.)

**Ops XNNPACK cannot take** are not an error when ExecuTorch has a portable kernel for them: the program calls
that kernel between XNNPACK partitions (the flatten before a classifier is one, a view). They are listed, with the
module they come from, in the manifest (``portable_ops``), because they run slower than XNNPACK's. An op with no
ExecuTorch kernel at all (e.g. torchvision's ``deform_conv2d``) raises :class:`ExportError` naming the op and the
module.

**Threads**: ExecuTorch's XNNPACK threadpool is one per process; ``threads`` resets it (the last bundle loaded
sets it for all).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DyncnnError
from .onnx import ExportError, _describe_module, _quiet_native_output

DEFAULT_MAX_BATCH = 64
_INSTALL = "install ExecuTorch with `pip install dyncnn[mobile]` (executorch>=1.5)"
_OP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*::[A-Za-z0-9_.]+|aten\.[A-Za-z0-9_]+)")


def available() -> bool:
    """Whether ExecuTorch and its Python runtime are installed."""
    try:
        import executorch.exir  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise ExportError(f"the executorch runtime needs the executorch package: {_INSTALL}")


def version() -> str:
    from importlib.metadata import version as v
    return v("executorch")


@contextlib.contextmanager
def _quiet():
    """ExecuTorch's C++ runtime logs CPU probing to stderr on first use; the exporter warns about pytree enums."""
    import warnings
    with warnings.catch_warnings(), _quiet_native_output():
        warnings.simplefilter("ignore")
        yield


def _registered_kernels() -> set[str]:
    with _quiet():
        from executorch.extension.pybindings import portable_lib
        return set(portable_lib._get_operator_names())


def _node_module(node) -> str | None:
    """The module path (``stages.1.conv``) that an exported node came from, '' for the root, None if unknown."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return None if path.startswith("_empty") else path


def _op_name(node) -> str:
    name = getattr(node.target, "_name", None) or getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0] if "::" in name else name


def _reset_batch_bound(program, max_batch: int) -> None:
    """Undo the narrowing of the batch range by lowering passes (see the module docstring) before memory planning."""
    from torch.utils._sympy.value_ranges import ValueRanges
    ep = program.exported_program()
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, Tensor) and val.dim() and not isinstance(val.shape[0], int):
            sym = val.shape[0].node
            sym.shape_env.var_to_range[sym.expr] = ValueRanges(1, max_batch)
    ep._range_constraints = {k: ValueRanges(1, max_batch) for k in ep.range_constraints}


def _batch_shapes(module: nn.Module, args: tuple, batch) -> tuple:
    """``dynamic_shapes`` for torch.export: axis 0 of every argument is ``batch``."""
    shapes = tuple({0: batch} for _ in args)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        shapes = (shapes,)             # forward(*tensors): torch.export sees one tuple argument
    return shapes


def lower_graph(module: nn.Module, args: Sequence[Tensor], path: str | os.PathLike, *,
                max_batch: int = DEFAULT_MAX_BATCH, what: str = "", strip: str = "",
                calibration: Sequence[Sequence[Tensor]] | None = None) -> dict:
    """Export ``module(*args)`` with ``torch.export`` (axis 0 of every input: one dynamic batch axis
    ``1..max_batch``), lower it to XNNPACK and write the ExecuTorch program to ``path`` (atomically).

    With ``calibration`` (a list of argument tuples), the graph is quantized to INT8 first with the PT2E XNNPACK
    quantizer (symmetric, per-channel weights, static activations) calibrated on them. Returns
    ``{"portable_ops": [{"op", "module"}...], "max_batch": n}``; raises :class:`ExportError` naming the op and
    module of anything that cannot be exported or has no ExecuTorch kernel.
    """
    require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim, export
    what = what or type(module).__name__
    if max_batch < 2:
        raise ExportError(f"max_batch must be >= 2, got {max_batch}")
    args = tuple(args)
    batch = Dim("batch", min=1, max=max_batch)
    shapes = _batch_shapes(module, args, batch)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    path = Path(path)
    try:
        with _quiet(), torch.no_grad():
            try:
                ep = export(module, args, dynamic_shapes=shapes, strict=False)
                if calibration is not None:
                    ep = _quantize(ep, args, batch, calibration)
                edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            except Exception as e:
                raise _export_error(module, args, e, what, strip, "torch.export / XNNPACK lowering") from e
            _reset_batch_bound(edge, max_batch)
            nodes = [n for n in edge.exported_program().graph.nodes if n.op == "call_function"]
            try:
                program = edge.to_executorch()
            except Exception as e:
                raise _export_error(module, args, e, what, strip, "ExecuTorch", nodes) from e
        plan = program.executorch_program.execution_plan[0]
        kernels = _registered_kernels()
        portable, missing = [], []
        for op in plan.operators:
            full = f"{op.name}.{op.overload}"
            if op.name.startswith("executorch_prim::") or op.name == "aten::sym_size":
                continue
            found = [n for n in nodes if _op_name(n) == op.name]
            module_path = _node_module(found[0]) if found else None
            record = {"op": op.name, "module": _describe_module(module, module_path, strip)}
            (portable if full in kernels else missing).append(record)
        if missing:
            listed = "; ".join(f"{r['op']} from {r['module']}" for r in missing)
            raise ExportError(f"cannot run {what} on ExecuTorch: no XNNPACK or portable kernel for {listed}. "
                              f"Replace that layer with standard convolution / linear / elementwise ops, or "
                              f"export to ONNX (--runtime onnxruntime)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pte.tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                program.write_to_file(f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        for m, mode in modes:
            m.training = mode
    return {"portable_ops": portable, "max_batch": int(max_batch)}


def _export_error(module: nn.Module, args: tuple, exc: BaseException, what: str, strip: str, stage: str,
                  nodes: Sequence = ()) -> ExportError:
    """An :class:`ExportError` naming the operator (read from the exception) and the module it comes from (from
    the lowered graph's nodes when there is one, else by tracing)."""
    from .onnx import find_op_module
    text = str(exc)
    match = _OP.search(text)
    first = text.strip().splitlines()[0] if text.strip() else ""
    if match is None:
        return ExportError(f"cannot export {what} for ExecuTorch ({stage}): {type(exc).__name__}: {first[:300]}")
    op = match.group(0).replace("aten.", "aten::")
    found = [n for n in nodes if _op_name(n) == op.split(".")[0]]
    path = _node_module(found[0]) if found else find_op_module(module, args, op.split(".")[0])
    where = _describe_module(module, path, strip)
    return ExportError(f"cannot export {what} for ExecuTorch ({stage}): operator {op} is not supported (no "
                       f"XNNPACK or portable kernel); it comes from {where}. Replace that layer with standard "
                       f"ops, or export to ONNX (--runtime onnxruntime). ({type(exc).__name__}: {first[:200]})")


def _quantize(ep, args: tuple, batch, calibration):
    """PT2E static INT8 quantization for XNNPACK of the exported program ``ep``, calibrated on ``calibration``
    (argument tuples); returns the quantized graph exported again."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torch.export import export
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(ep.module(), quantizer)
    for inputs in calibration:
        prepared(*inputs)
    converted = convert_pt2e(prepared)
    return export(converted, args, dynamic_shapes=_batch_shapes(converted, args, batch), strict=False)


class ExecuTorchSession:
    """One ExecuTorch program's ``forward`` behind ONNX Runtime's session interface: ``run(output_names, feed)``
    takes ``{input name: numpy array}`` and returns the named outputs (all for None) as numpy arrays.

    ``input_names`` / ``output_names`` are the manifest's names of the program's inputs and outputs, in order.
    Batches above the program's batch bound run in chunks. Outputs are copied out of the program's planned memory
    (the next call reuses it).
    """

    def __init__(self, path: str | os.PathLike, input_names: Sequence[str], output_names: Sequence[str],
                 threads: int = 1):
        require()
        with _quiet():
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
            portable_lib._unsafe_reset_threadpool(int(threads))
            self.path = Path(path)
            self.program = Runtime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
        meta = self.method.metadata
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.num_inputs, self.num_outputs = meta.num_inputs(), meta.num_outputs()
        self.max_batch = int(meta.input_tensor_meta(0).sizes()[0]) if self.num_inputs else 0
        self._index = {n: i for i, n in enumerate(self.output_names)}

    def _execute(self, inputs: list[Tensor]) -> list[np.ndarray]:
        try:
            outs = self.method.execute(inputs)
        except RuntimeError as e:
            n = inputs[0].shape[0] if inputs else 0
            raise DyncnnError(f"the ExecuTorch program {self.path.name} failed on a batch of {n} (bound "
                              f"{self.max_batch}): {e}. A known cause is a split / chunk inside an XNNPACK "
                              f"partition, which plans its outputs at the export batch; write it as slices "
                              f"(x[:, :k], x[:, k:]) or export to ONNX (--runtime onnxruntime)") from e
        return [t.clone().numpy() for t in outs]

    def run(self, output_names: Sequence[str] | None, feed: dict) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(feed[n]) for n in self.input_names]
        n = len(arrays[0]) if arrays else 0
        if n <= self.max_batch:
            outs = self._execute([torch.from_numpy(a) for a in arrays])
        else:
            parts = [self._execute([torch.from_numpy(a[i:i + self.max_batch]) for a in arrays])
                     for i in range(0, n, self.max_batch)]
            outs = [np.concatenate(chunk) for chunk in zip(*parts)]
        if output_names is None:
            return outs
        return [outs[self._index[name]] for name in output_names]
