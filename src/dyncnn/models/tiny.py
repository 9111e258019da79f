"""A tiny depthwise-separable network for tests, smoke runs and the quick demo on 64x64 digits."""
from __future__ import annotations

from torch import Tensor, nn

from ..layers import ConvNormAct, DepthwiseSeparableConv
from .base import Backbone, StageInfo
from .registry import register_model


class TinyMobileNet(Backbone):
    """Stem conv (stride 2) + one depthwise-separable unit per entry of ``widths`` (stride 2 each after the first)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128),
                 drop_rate: float = 0.0):
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {widths}")
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, widths[-1]
        self.stem = ConvNormAct(in_chans, widths[0], 3, stride=2)
        stages, info, c, stride = [], [], widths[0], 2
        for i, w in enumerate(widths):
            s = 1 if i == 0 else 2
            stride *= s
            stages.append(DepthwiseSeparableConv(c, w, stride=s))
            info.append(StageInfo(f"stages.{i}", w, stride))
            c = w
        self.stages = nn.Sequential(*stages)
        self.stage_info = info
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(c, num_classes)
        self.min_input_size = 2 ** len(widths)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)


@register_model(name="tiny_mobilenet")
def tiny_mobilenet(num_classes: int = 10, in_chans: int = 1, **kwargs) -> TinyMobileNet:
    return TinyMobileNet(num_classes=num_classes, in_chans=in_chans, **kwargs)
