"""Export to ONNX and run exported models with ONNX Runtime."""
from .onnx import export_onnx, onnx_session

__all__ = ["export_onnx", "onnx_session"]
