"""MAC counting with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode follows the path that really executed (a skipped branch costs nothing, a functional call is
counted) and counts matrix multiplications and convolutions: MACs = its FLOPs / 2, the convention behind
torchvision's "GFLOPS" and the mobile papers' "FLOPs".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import check_batch


@dataclass
class MacReport:
    """MACs of one call. ``total`` is for the whole input batch; ``per_sample`` divides by its size."""
    total: int
    batch_size: int
    params: int
    by_module: dict[str, int] = field(default_factory=dict)   # module path -> MACs (its subtree, whole batch)
    by_op: dict[str, int] = field(default_factory=dict)       # aten op -> MACs

    @property
    def per_sample(self) -> float:
        return self.total / self.batch_size

    def __str__(self) -> str:
        return f"{self.per_sample / 1e6:.2f}M MACs/sample, {self.params / 1e6:.3f}M params"


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module | Any, input: Tensor, *args, check: bool = True, **kwargs) -> MacReport:
    """Count the MACs of ``model(input, *args, **kwargs)`` as executed, in eval mode and without gradients.

    ``input`` is a batch of what the model takes (its ``input_kind``): images (N, C, H, W), clips
    (N, T, C, H, W; a 5-D input is read as clips) or sequences (N, T, F). ``model`` may be any callable;
    ``by_module`` is filled when it is an ``nn.Module``. The model's train/eval state is restored afterwards.
    """
    if check:
        kind = getattr(model, "input_kind", None)
        check_batch(input, kind or ("clip" if isinstance(input, Tensor) and input.dim() == 5 else "image"))
    was_training = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(input, *args, **kwargs)
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
    counts = counter.get_flop_counts()
    by_module: dict[str, int] = {}
    for mod_name, ops in counts.items():
        if mod_name == "Global":
            continue
        # FlopCounterMode names modules "<ClassName>.<path>"; keep the path relative to the model.
        path = mod_name.split(".", 1)[1] if "." in mod_name else ""
        by_module[path] = sum(ops.values()) // 2
    by_op = {str(op): v // 2 for op, v in counts.get("Global", {}).items()}
    total = counter.get_total_flops() // 2
    params = count_params(model) if isinstance(model, nn.Module) else 0
    return MacReport(total=int(total), batch_size=int(input.shape[0]), params=params,
                     by_module=by_module, by_op=by_op)


def example_input(model: nn.Module, input_size: int | None = None, published_size: int | None = None,
                  ) -> tuple[str, tuple[int, ...]]:
    """(input kind, shape of one sample) that profiles ``model`` at its own default input.

    A model that takes something other than square images declares it: ``input_kind`` ("image", "clip" or
    "sequence") and ``default_input_shape`` (one sample: (C, H, W), (T, C, H, W) or (T, F)). Otherwise it takes
    images of ``in_chans`` channels at ``published_size`` (the registry's published input size), else 224.
    ``input_size`` overrides the side of images and clip frames (sequences keep their shape).
    """
    kind = getattr(model, "input_kind", "image")
    shape = getattr(model, "default_input_shape", None)
    if shape is None:
        if kind != "image":
            raise ValueError(f"{type(model).__name__} takes {kind}s but declares no default_input_shape")
        size = published_size or 224
        shape = (int(getattr(model, "in_chans", 3)), size, size)
    shape = tuple(int(s) for s in shape)
    if input_size is not None and kind in ("image", "clip"):
        shape = (*shape[:-2], input_size, input_size)
    return kind, shape
