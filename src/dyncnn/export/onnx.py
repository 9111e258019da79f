"""Static ONNX export with a dynamic batch axis, and ONNX Runtime sessions with a fixed thread count.

The TorchScript-based exporter is used by default: for the static CNNs here it gives the same graph as the
``torch.export``-based one (checked in the tests against eager outputs) about 20x faster, which matters for the
latency commands. ``exporter="dynamo"`` selects the newer one (needs onnxscript), which ``torch.cond`` requires
(see :mod:`dyncnn.export.cond`).

A model that cannot be exported (an operator without an ONNX translation) raises :class:`ExportError` naming the
operator and the module it came from (found by tracing the model and reading the module scope of the offending
node), so that the user knows which layer to replace.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DyncnnError


class ExportError(DyncnnError):
    """A model (or one of its modules) that cannot be exported to ONNX; the message names the operator and module."""


_OP = re.compile(r"(aten|prim|onnx|quantized)::[A-Za-z0-9_.]+")


def find_op_module(model: nn.Module, args: tuple, op: str) -> str | None:
    """Module path (``"body.1.conv"``, ``""`` for the root) of the first traced node of kind ``op``, or None.

    Traces with ``torch.jit.trace``, whose inlined graph keeps each node's module scope
    (``__module.body/__module.body.1``); the last scope component is the module's path.
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, args, check_trace=False, strict=False)
        for node in traced.inlined_graph.nodes():
            if node.kind() == op:
                scope = node.scopeName().split("/")[-1]
                return scope[len("__module."):] if scope.startswith("__module.") else scope
    except Exception:  # tracing is best effort: the error message still names the operator
        return None
    return None


def _describe_module(model: nn.Module, path: str | None, strip: str = "") -> str:
    if path is None:
        return "module not found by tracing"
    try:
        cls = type(model.get_submodule(path)).__name__ if path else type(model).__name__
    except AttributeError:
        cls = "?"
    shown = path[len(strip):] if strip and path.startswith(strip) else path
    return f"module {shown or '<root>'!r} ({cls})"


def export_error(model: nn.Module, args: tuple, exc: BaseException, opset: int, what: str = "",
                 strip: str = "") -> ExportError:
    """An :class:`ExportError` for the failure ``exc`` of exporting ``model``: names the operator and module."""
    text = str(exc)
    match = _OP.search(text)
    what = what or type(model).__name__
    if match is None:
        return ExportError(f"cannot export {what} to ONNX (opset {opset}): {type(exc).__name__}: "
                           f"{text.splitlines()[0] if text else ''}")
    op = match.group(0)
    where = _describe_module(model, find_op_module(model, args, op), strip)
    return ExportError(f"cannot export {what} to ONNX (opset {opset}): operator {op} has no ONNX translation; "
                       f"it comes from {where}. Replace that layer with ONNX-exportable ops, or register a "
                       f"custom symbolic (torch.onnx.register_custom_op_symbolic)")


@contextlib.contextmanager
def _quiet_native_output():
    """Silence file descriptors 1 and 2 for the duration: the TorchScript exporter's C++ logger prints the whole
    graph there on failure (its logging switch is always on in torch 2.x), burying the error that we raise."""
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile() as sink:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        except OSError:
            pass
        try:
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def writing_onnx(path: str | os.PathLike, module: nn.Module, check: bool = True):
    """Yield a temporary file beside ``path`` to export ``module`` into (in eval mode, without gradients); on
    success run the ONNX checker and rename it into place. Every submodule's train/eval mode is restored (the
    exporters restore only the root's), and an interrupted or failed export leaves no file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield tmp
        if check:
            import onnx
            onnx.checker.check_model(tmp)
        from ..files import apply_umask
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        for m, mode in modes:
            m.training = mode
        if os.path.exists(tmp):
            os.unlink(tmp)


DEFAULT_OPSET = 17


def required_opset(module: nn.Module, opset: int | None = None) -> int:
    """``opset`` if given, else the default raised to what the model's layers need (a layer class may declare
    ``min_onnx_opset``, e.g. deformable convolution needs 19 for ONNX's ``DeformConv``)."""
    if opset is not None:
        return int(opset)
    return max([DEFAULT_OPSET] + [int(getattr(m, "min_onnx_opset", 0)) for m in module.modules()])


def export_graph(module: nn.Module, args: Sequence[Tensor], path: str | os.PathLike, input_names: Sequence[str],
                 output_names: Sequence[str], *, dynamic_batch: bool = True, opset: int | None = None, check: bool = True,
                 what: str = "", strip: str = "") -> Path:
    """TorchScript-export ``module(*args)`` to ``path`` with the given input/output names; axis 0 of every input
    and output is the dynamic ``batch`` axis. Written to a temporary file and renamed into place.

    Inputs that the graph does not use are dropped by the exporter (read the names back from the file).
    """
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    opset = required_opset(module, opset)
    with writing_onnx(path, module, check) as tmp:
        chatter = io.StringIO()    # the exporter prints the whole TorchScript graph on failure
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), _quiet_native_output():
                torch.onnx.export(module, tuple(args), tmp, dynamo=False, input_names=list(input_names),
                                  output_names=list(output_names), opset_version=opset, dynamic_axes=axes)
        except Exception as e:   # UnsupportedOperatorError, SymbolicValueError, tracer errors, ...
            raise export_error(module, tuple(args), e, opset, what, strip) from e
    return Path(path)


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike, *, dynamic_batch: bool = True,
                opset: int | None = None, exporter: str = "torchscript", check: bool = True) -> Path:
    """Export ``model`` (eval mode) to ``path`` with input ``input`` and output ``logits``; returns the path.

    The file is written next to its destination and renamed into place, so an interrupted export leaves nothing.
    """
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    if exporter == "torchscript":
        return export_graph(model, (example,), path, ["input"], ["logits"], dynamic_batch=dynamic_batch,
                            opset=opset, check=check)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with writing_onnx(path, model, check) as tmp:
        torch.onnx.export(model, (example,), tmp, dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=shapes, external_data=False, verbose=False)
    return Path(path)


def onnx_session(path: str | os.PathLike, threads: int = 1, spin: bool = True):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (one inter-op thread).

    ``spin=False``: its pool's threads stop spinning when a run ends (they still spin between the parallel sections
    of a run, ONNX Runtime's default), so that they do not take the cores of the session that runs next, as the
    stage sessions of a multi-exit bundle do, one after the other (:func:`dyncnn.export.load_bundle`). Measured on
    a 2-core CPU (``benchmarks/bench_stage_threads.py``, two runs): a four-exit network at 2 threads, full depth,
    took 0.52-0.73 ms per image at batch 1 and 0.86-0.96 at batch 64 with pools that spin on after their run,
    0.41-0.43 and 0.17-0.20 with pools that stop. Threads that never spin (``session.intra_op.allow_spinning=0``)
    would wake up for every parallel section of a run."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spin and threads > 1:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def relative_error(got: np.ndarray | Tensor, want: np.ndarray | Tensor) -> float:
    """max |got - want| / max |want|: the measure behind the "agrees with eager to 1e-4" checks."""
    got = np.asarray(got.detach() if isinstance(got, Tensor) else got, dtype=np.float64)
    want = np.asarray(want.detach() if isinstance(want, Tensor) else want, dtype=np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {want.shape}")
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12)) if want.size else 0.0


def check_against_eager(model: nn.Module, path: str | os.PathLike, inputs: Sequence[Tensor],
                        tol: float = 1e-4, threads: int = 1) -> float:
    """Run the exported ``path`` and eager ``model`` on each batch of ``inputs``; return the worst relative error,
    raising ExportError when it reaches ``tol``."""
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    worst = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in inputs:
                worst = max(worst, relative_error(sess.run(None, {name: x.float().numpy()})[0], model(x)))
    finally:
        model.train(was_training)
    if worst >= tol:
        raise ExportError(f"exported {path} disagrees with eager: relative error {worst:.2e} >= {tol:.0e}")
    return worst
