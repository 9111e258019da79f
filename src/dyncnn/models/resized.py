"""Networks on a downsampled input, and cascades of registered models, both rebuildable by name.

A network that looks at a 2x or 4x downsampled image is a legitimate static operating point (RANet's observation:
large, clear digits are recognised at low resolution), and it is the first member of a *resolution cascade*: the
small network on the downsampled image, then the full network on the full image for the samples it is unsure of.

``resized`` averages non-overlapping ``factor`` x ``factor`` blocks (area downsampling, an ``AveragePool`` in ONNX)
before the backbone. ``cascade`` builds :class:`~dyncnn.dynamic.exits.Cascade` from member specs, so a cascade of
trained models can be checkpointed and exported like any multi-exit network.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..dynamic.backbone import input_channels
from ..dynamic.exits import Cascade
from .registry import create_model, register_model


class Resized(nn.Module):
    """``backbone`` applied to the input downsampled by ``factor`` (mean of each factor x factor block)."""

    def __init__(self, backbone: nn.Module, factor: int):
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.backbone, self.factor = backbone, int(factor)
        self.num_classes = getattr(backbone, "num_classes", None)
        self.in_chans = input_channels(backbone, default=3)
        min_size = getattr(backbone, "min_input_size", 1)
        self.min_input_size = min_size * self.factor

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"input of {tuple(x.shape[-2:])} pixels is not divisible by the downsampling "
                             f"factor {self.factor}")
        return self.backbone(F.avg_pool2d(x, self.factor) if self.factor > 1 else x)


@register_model(name="resized")
def resized(backbone: str = "tiny_mobilenet", factor: int = 2, num_classes: int = 10, in_chans: int = 1,
            backbone_cfg: dict | None = None) -> Resized:
    """``create_model("resized", backbone="tiny_mobilenet", factor=2, backbone_cfg={"widths": [16, 48]})``."""
    cfg = dict(backbone_cfg or {})
    if not backbone.startswith(("torchvision:", "timm:")):
        cfg.setdefault("in_chans", in_chans)
    return Resized(create_model(backbone, num_classes=num_classes, **cfg), factor)


def member_model(spec: dict, num_classes: int, in_chans: int) -> nn.Module:
    """A cascade member (``cascade``, ``fused_cascade``) from its spec, ``{"name": ..., **cfg}``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a cascade member is a dict with a registered 'name' and its config, got {spec!r}")
    cfg = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if not name.startswith(("torchvision:", "timm:")):
        cfg.setdefault("in_chans", in_chans)
    return create_model(name, num_classes=num_classes, **cfg)


@register_model(name="cascade")
def cascade(members: Sequence[dict] = ({"name": "resized", "factor": 2}, {"name": "tiny_mobilenet"}),
            num_classes: int = 10, in_chans: int = 1) -> Cascade:
    """A cascade of registered models, cheapest first: ``members`` are ``{"name": ..., **cfg}`` dicts."""
    members = list(members)
    if len(members) < 2:
        raise ValueError(f"a cascade needs at least two members, got {len(members)}")
    net = Cascade([member_model(m, num_classes, in_chans) for m in members], num_classes, in_chans)
    net.min_input_size = max(getattr(m, "min_input_size", 1) for m in net.heads)
    return net
