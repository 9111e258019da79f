"""What every dyncnn backbone offers: a stage description, ``forward_features`` / ``forward_head``.

The dynamic-network code attaches exits, gates and masks using ``stage_info``, so a backbone only has to say
where its stages end (module name, output channels, cumulative stride), in the manner of timm's ``feature_info``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import DyncnnError, check_image_batch, is_exporting, param_dtype  # noqa: F401 - is_exporting re-exported


@dataclass(frozen=True)
class StageInfo:
    """One stage of a backbone: the module that ends it, its output channels and cumulative stride."""
    module: str      # attribute path inside the model, e.g. "stages.2"
    channels: int
    stride: int      # reduction relative to the input, e.g. 8 for a 224 input giving 28x28


class Backbone(nn.Module):
    """Base class of dyncnn's classifiers.

    Subclasses set ``in_chans``, ``num_classes``, ``num_features`` and ``stage_info`` and implement
    ``forward_features`` (image -> last feature map) and ``forward_head`` (feature map -> logits).
    """

    in_chans: int = 3
    num_classes: int = 1000
    num_features: int = 0
    stage_info: list[StageInfo]
    min_input_size: int = 32

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_input(self, x: Tensor) -> Tensor:
        """Shape, channel and dtype checks (NaN/Inf checks belong to the public entry points, not the hot path)."""
        if is_exporting():
            return x
        check_image_batch(x, self.in_chans, check_finite=False, dtype=param_dtype(self))
        if min(x.shape[-2:]) < self.min_input_size:
            raise DyncnnError(f"{type(self).__name__}: expected inputs of at least {self.min_input_size}x"
                             f"{self.min_input_size}, got {tuple(x.shape[-2:])}")
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(self.check_input(x)))
