"""Peak memory of a forward pass, counted from the tensors the pass allocates.

CPU PyTorch has no allocator statistics, so we watch every ATen op with a ``TorchDispatchMode``: each output
tensor's storage is added to the live total when first seen and removed when its last tensor is freed. The peak
of that total is the activation memory a forward pass needs on top of the weights (the same quantity
``torch.cuda.max_memory_allocated`` reports on a GPU, minus the caching allocator's rounding).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import check_image_batch


@dataclass
class MemoryReport:
    peak_activation_bytes: int   # largest total of live intermediate tensors during the pass
    param_bytes: int             # weights and buffers
    input_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.peak_activation_bytes + self.param_bytes + self.input_bytes


class _LiveTensorTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}   # storage pointer -> [nbytes, live tensor count]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_memory(model: nn.Module, input: Tensor) -> MemoryReport:
    """Peak memory of ``model(input)`` in eval mode without gradients."""
    check_image_batch(input)
    was_training = model.training
    model.eval()
    tracker = _LiveTensorTracker()
    try:
        with torch.no_grad(), tracker:
            out = model(input)
            del out
    finally:
        model.train(was_training)
    tensors = list(model.parameters()) + list(model.buffers())
    return MemoryReport(peak_activation_bytes=tracker.peak,
                        param_bytes=sum(t.numel() * t.element_size() for t in tensors),
                        input_bytes=input.numel() * input.element_size())
