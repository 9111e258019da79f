"""The multi-exit wrapper as a registered model (``multi_exit``): exits attached to a registered, torchvision or
timm backbone (:func:`dyncnn.dynamic.attach_exits`), created by name and restored from checkpoints."""
from __future__ import annotations

from typing import Sequence

from ..dynamic.exits import SplitMultiExit, attach_exits
from .registry import create_model, register_model


@register_model(name="multi_exit")
def multi_exit(backbone: str = "mobilenet_v2", stages: Sequence[str] | None = None, head: str = "linear",
               num_classes: int = 10, in_chans: int = 3, backbone_cfg: dict | None = None,
               example_size: int = 64) -> SplitMultiExit:
    """Registered builder: exits attached to a registered / torchvision / timm backbone, rebuildable by name
    (``create_model("multi_exit", backbone="tiny_mobilenet", stages=[...])``), hence checkpointable. Without
    ``stages``, exits go after the backbone's stage ends (:func:`dyncnn.dynamic.backbone.stage_ends`);
    ``create_model("multi_exit", backbone=..., weights=PATH)`` loads the backbone's state dict file."""
    cfg = dict(backbone_cfg or {})
    cfg.setdefault("in_chans", in_chans)        # torchvision / timm backbones take in_chans too (stem adapted)
    net = attach_exits(create_model(backbone, num_classes=num_classes, **cfg), stages, head, num_classes,
                       example_size)
    return net
