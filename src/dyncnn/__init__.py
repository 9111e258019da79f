"""dyncnn: efficient mobile CNN backbones and dynamic networks that execute the computation they save.

The public names are imported on first use (PEP 562), so that ``import dyncnn`` and ``dyncnn --help`` do not
import torch.
"""
from __future__ import annotations

import importlib

from .errors import CheckpointError, DyncnnError, check_image_batch

__version__ = "0.1.0"

_LAZY = {"create_model": ".models", "list_models": ".models", "register_model": ".models",
         "count_macs": ".profile", "count_params": ".profile", "measure_latency": ".profile",
         "peak_memory": ".profile", "optimize_for_inference": ".layers.fusion"}

__all__ = [
    "create_model", "list_models", "register_model", "count_macs", "count_params", "measure_latency",
    "peak_memory", "optimize_for_inference", "DyncnnError", "CheckpointError", "check_image_batch", "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dyncnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
