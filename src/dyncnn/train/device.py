"""Which device to train and evaluate on: ``"cpu"``, ``"cuda"`` (``"cuda:N"``), ``"mps"``, or ``"auto"`` (CUDA when
available, else the CPU). Under ``torchrun`` a CUDA run takes the GPU of its local rank (one GPU per process).

Nothing else in dyncnn picks a device: the :class:`~dyncnn.train.Trainer` moves the model and each batch to the
resolved device, checkpoints are written from CPU copies (they load on any device), and inference functions
follow the device of the model's parameters (:func:`module_device`).
"""
from __future__ import annotations

import os

import torch

from ..dynamic.executor import module_device  # noqa: F401 - re-exported: where a model's tensors live
from ..errors import DyncnnError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for ``name``; raises DyncnnError for an unknown name or a device that is absent.

    ``local_rank`` (default: ``LOCAL_RANK`` from torchrun's environment) picks the GPU of a ``"cuda"`` run
    launched with several processes.
    """
    if isinstance(name, torch.device):
        name = str(name)
    base = str(name).split(":", 1)[0]
    if base not in DEVICES:
        raise DyncnnError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if base == "auto":
        base = name = "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cuda":
        if not torch.cuda.is_available():
            raise DyncnnError(f"device {name!r} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if name == "cuda":
            rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0") or 0)
            name = f"cuda:{rank % torch.cuda.device_count()}"
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DyncnnError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DyncnnError("device 'mps' requested but Apple's Metal backend is not available on this machine")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (mixed precision for training: matmuls and convolutions in
    bfloat16, reductions and the loss in float32; bf16 needs no loss scaling)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
