"""Export to ONNX or ExecuTorch and run exported models with ONNX Runtime or ExecuTorch (XNNPACK).

- :mod:`.onnx`: static export of one graph, ONNX Runtime sessions, export errors that name the op and module;
- :mod:`.bundle_format`: the bundle format that writers and loaders share (manifest reading, validation and
  writing, file records, checksums, size limits, the folder's lock);
- :mod:`.host`: the host-side exit rule and input checks of every bundle driver;
- :mod:`.staged`: bundles (graphs + manifest): a static model, or a multi-exit network as one graph per stage
  with its exit head;
- :mod:`.runtime`: ``load_bundle(dir)``, the host-side driver that keeps the exits (same decisions as eager);
- :mod:`.executorch`: the same bundles as ExecuTorch programs lowered to XNNPACK (``runtime="executorch"``), and
  the session that runs them behind the driver;
- :mod:`.quantize`: post-training static INT8 quantization with ONNX Runtime's tooling;
- :mod:`.cond`: the single-graph form of a multi-exit network with ``torch.cond`` (a per-batch exit condition);
- :mod:`.bench`: the latency table of ``dyncnn bench``.
"""
from .onnx import ExportError, check_against_eager, export_graph, export_onnx, onnx_session, relative_error
from .bundle_format import FORMAT, RUNTIMES, BundleError, register_writer
from .host import confidence_np
from .runtime import DynamicBundle, StaticBundle, load_bundle
from .staged import export_bundle, is_multi_exit, own_writer

__all__ = ["export_onnx", "onnx_session", "export_graph", "check_against_eager", "relative_error", "ExportError",
           "export_bundle", "is_multi_exit", "FORMAT", "RUNTIMES", "load_bundle", "BundleError", "DynamicBundle",
           "StaticBundle", "confidence_np", "own_writer", "register_writer"]
