"""Zoo variants with dynamic parameters, built by module substitution on the registered backbones.

One mechanism, :func:`substitute_convs`, walks a built backbone and replaces the chosen ``nn.Conv2d`` modules of
its later units by a dynamic-parameter layer made from each of them (same geometry). The variants:

- ``condconv_*`` (CondConv, Yang et al. 2019): every convolution of the last ``last_blocks`` units becomes a
  :class:`CondConv2d` with ``num_experts`` kernels (the paper uses CondConv in the later layers, where the
  feature maps are small and extra kernels cost little computation);
- ``dyconv_*`` (dynamic convolution, Chen et al. 2020): every convolution except the stem (and the SE layers)
  becomes a :class:`DynamicConv2d` with 4 kernels, the paper's setting; the temperature follows the paper's
  schedule (30 -> 1 linearly, early in training) through ``set_progress``;
- ``hyper_*``: the depthwise convolutions become :class:`PredictedDepthwiseConv2d` (kernels predicted per sample);
- ``deform_*``: the 3x3 convolutions of the last three stages (conv3-conv5, DCNv2's placement) become
  :class:`DeformConv2d`, modulated (v2) by default.

Every variant is a :class:`DynamicParamNet` wrapping the backbone (its modules under ``backbone.``). The layers
run one (grouped) convolution per layer for the whole batch: the cost of a sample is fixed by the architecture,
not by its content, so these are static-cost models whose MACs FlopCounterMode counts directly (routing and
kernel aggregation included). No published figures are registered: the CondConv paper's numbers are for
EfficientNet-B0, not for these backbones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..layers.deform import DeformConv2d
from ..layers.dynamic_conv import CondConv2d, DynamicConv2d, check_experts, check_tau, dyconv_tau
from ..layers.weight_prediction import PredictedDepthwiseConv2d
from .base import Backbone, StageInfo
from .registry import create_model, register_model

KINDS = ("condconv", "dyconv", "hyper", "deform")


@dataclass(frozen=True)
class DynamicParamsCfg:
    """Which convolutions become which dynamic-parameter layer.

    ``last_blocks``: only the last that many units (blocks) of the backbone (None: all units). ``stages``: only
    the units of these stage indices (used by ``deform``; None: all). ``copy_weights``: start every new layer
    from the convolution it replaces so that the variant equals the backbone at initialisation (CondConv /
    DyConv experts then start identical and stay identical under training: use it to convert a trained backbone,
    not to train from scratch); otherwise experts are initialised independently like the backbone's convolutions.
    """
    kind: str
    num_experts: int = 4
    last_blocks: int | None = None
    stages: tuple[int, ...] | None = None
    copy_weights: bool = False
    tau_start: float = 30.0
    tau_end: float = 1.0
    tau_anneal: float = 0.1          # fraction of training over which tau goes from tau_start to tau_end
    modulated: bool = True
    hyper_hidden: int | None = None
    include_head: bool = False       # also the 1x1 head convolution after the last stage (``conv_head``)
    offset_scale: float = 1.0        # deform: scale of the offset branch (an lr multiplier under Adam)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        check_experts(self.num_experts)
        check_tau(self.tau_start), check_tau(self.tau_end)
        if not 0 < self.tau_anneal <= 1:
            raise ValueError(f"tau_anneal must be in (0, 1], got {self.tau_anneal!r}")
        if self.last_blocks is not None and (not isinstance(self.last_blocks, int) or self.last_blocks < 1):
            raise ValueError(f"last_blocks must be None or an int >= 1, got {self.last_blocks!r}")


def backbone_units(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(stage index, unit) in execution order: the blocks of MobileNet / ShuffleNet / ResNet stages, or the
    depthwise-separable units of TinyMobileNet (whose stages are single units)."""
    from .tiny import TinyMobileNet
    if isinstance(model, TinyMobileNet):
        return list(enumerate(model.stages))
    return [(i, unit) for i, stage in enumerate(model.stages) for unit in stage]


def substitute_convs(root: nn.Module, select: Callable[[str, nn.Conv2d], bool],
                     make: Callable[[nn.Conv2d], nn.Module]) -> list[str]:
    """Replace every ``nn.Conv2d`` under ``root`` for which ``select(path, conv)`` holds by ``make(conv)``;
    returns the replaced paths (relative to ``root``)."""
    chosen = [(name, m) for name, m in root.named_modules() if type(m) is nn.Conv2d and select(name, m)]
    for name, conv in chosen:
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, make(conv))
    return [name for name, _ in chosen]


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size != (1, 1)


def _maker(cfg: DynamicParamsCfg) -> Callable[[nn.Conv2d], nn.Module]:
    def fresh_experts(layer):
        if not cfg.copy_weights:   # the backbones' scheme: He-normal, fan-out, per expert
            for w in layer.weight:
                nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        return layer

    if cfg.kind == "condconv":
        return lambda c: fresh_experts(CondConv2d.from_conv(c, cfg.num_experts, cfg.copy_weights))
    if cfg.kind == "dyconv":
        return lambda c: fresh_experts(DynamicConv2d.from_conv(c, cfg.num_experts, cfg.copy_weights,
                                                               tau=cfg.tau_start))
    if cfg.kind == "hyper":
        return lambda c: PredictedDepthwiseConv2d.from_conv(c, cfg.hyper_hidden)
    return lambda c: DeformConv2d.from_conv(c, modulated=cfg.modulated, offset_scale=cfg.offset_scale)


def _selector(cfg: DynamicParamsCfg) -> Callable[[str, nn.Conv2d], bool]:
    def select(name: str, conv: nn.Conv2d) -> bool:
        if name.split(".")[0] == "se" or ".se." in f".{name}":
            return False    # squeeze-excitation is already a dynamic (channel attention) layer
        if cfg.kind == "hyper":
            return _is_depthwise(conv)
        if cfg.kind == "deform":
            return conv.kernel_size == (3, 3) and conv.groups == 1
        return True
    return select


class DynamicParamNet(Backbone):
    """A backbone whose chosen convolutions were replaced by dynamic-parameter layers (see module docstring).

    ``replaced`` lists the substituted module paths; ``set_progress`` anneals DyConv temperatures.
    """

    def __init__(self, backbone: Backbone, cfg: DynamicParamsCfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.in_chans, self.num_classes = backbone.in_chans, backbone.num_classes
        self.num_features, self.min_input_size = backbone.num_features, backbone.min_input_size
        self.stage_info = [StageInfo(f"backbone.{s.module}", s.channels, s.stride) for s in backbone.stage_info]
        units = backbone_units(backbone)
        if cfg.stages is not None:
            bad = [s for s in cfg.stages if not 0 <= s < len(backbone.stages)]
            if bad:
                raise ValueError(f"stages must be indices in [0, {len(backbone.stages)}), got {list(cfg.stages)}")
            units = [(i, u) for i, u in units if i in cfg.stages]
        if cfg.last_blocks is not None:
            units = units[-cfg.last_blocks:]
        select, make = _selector(cfg), _maker(cfg)
        paths = {id(u): p for p, u in backbone.named_modules()}
        self.replaced: list[str] = []
        for _, unit in units:
            self.replaced += [f"backbone.{paths[id(unit)]}.{n}" for n in substitute_convs(unit, select, make)]
        head = getattr(backbone, "conv_head", None)
        if cfg.include_head and isinstance(head, nn.Module):
            self.replaced += [f"backbone.conv_head.{n}" for n in substitute_convs(head, select, make)]
        if not self.replaced:
            raise ValueError(f"{cfg.kind}: no convolution of {type(backbone).__name__} matched the selection "
                             f"(last_blocks={cfg.last_blocks}, stages={cfg.stages})")

    def dynamic_layers(self) -> list[tuple[str, nn.Module]]:
        return [(p, self.get_submodule(p)) for p in self.replaced]

    def set_progress(self, progress: float) -> None:
        """Called by the Trainer before each step: DyConv's temperature schedule."""
        if self.cfg.kind == "dyconv":
            self.set_tau(dyconv_tau(progress, self.cfg.tau_start, self.cfg.tau_end, self.cfg.tau_anneal))

    def set_tau(self, tau: float) -> None:
        for m in self.modules():
            if isinstance(m, DynamicConv2d):
                m.set_tau(tau)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.backbone.forward_head(x, pre_logits)


def make_dynamic(backbone: Backbone, cfg: DynamicParamsCfg) -> DynamicParamNet:
    """The one builder: substitute the convolutions ``cfg`` selects in ``backbone`` (modified in place)."""
    return DynamicParamNet(backbone, cfg)


# --- registered variants --------------------------------------------------------------------------------------

_CFG_KEYS = set(DynamicParamsCfg.__dataclass_fields__) - {"kind"}


def _variant(name: str, backbone: str, kind: str, doc: str, **defaults) -> None:
    def build(**kwargs) -> DynamicParamNet:
        opts = {**defaults, **{k: kwargs.pop(k) for k in list(kwargs) if k in _CFG_KEYS}}
        if "stages" in opts and opts["stages"] is not None:
            opts["stages"] = tuple(opts["stages"])
        cfg = DynamicParamsCfg(kind, **opts)      # checked before the backbone is built
        return make_dynamic(create_model(backbone, **kwargs), cfg)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{doc} Backbone: ``{backbone}`` (its keyword arguments pass through)."
    register_model(build, name=name)


for _e in (4, 8):
    _variant(f"condconv_mobilenet_v2_e{_e}", "mobilenet_v2", "condconv",
             f"MobileNetV2 with CondConv ({_e} experts) in every convolution of its last 6 inverted residuals.",
             num_experts=_e, last_blocks=6)
    _variant(f"condconv_shufflenet_v2_e{_e}", "shufflenet_v2", "condconv",
             f"ShuffleNetV2 (default 1x) with CondConv ({_e} experts) in every convolution of its last 6 units.",
             num_experts=_e, last_blocks=6)
    _variant(f"condconv_tiny_mobilenet_e{_e}", "tiny_mobilenet", "condconv",
             f"TinyMobileNet (tests, ScaledMNIST) with CondConv ({_e} experts) in its last 2 units.",
             num_experts=_e, last_blocks=2)
for _size in ("large", "small"):
    _variant(f"dyconv_mobilenet_v3_{_size}", f"mobilenet_v3_{_size}", "dyconv",
             f"MobileNetV3-{_size.capitalize()} with dynamic convolution (4 kernels, tau 30 -> 1) in every "
             f"convolution but the stem and the SE layers.", num_experts=4, include_head=True)
_variant("dyconv_tiny_mobilenet", "tiny_mobilenet", "dyconv",
         "TinyMobileNet with dynamic convolution (4 kernels) in its last 2 units.", num_experts=4, last_blocks=2)
_variant("hyper_mobilenet_v2", "mobilenet_v2", "hyper",
         "MobileNetV2 whose depthwise kernels are predicted per sample (residual on the static kernel).")
_variant("hyper_tiny_mobilenet", "tiny_mobilenet", "hyper",
         "TinyMobileNet whose depthwise kernels are predicted per sample.")
for _depth in (18, 50):
    _variant(f"deform_resnet{_depth}", f"resnet{_depth}", "deform",
             f"ResNet-{_depth} with deformable 3x3 convolutions (v2, modulated) in stages conv3-conv5; offset "
             f"branch scaled by 0.1 (see DeformConv2d: trains under AdamW).", stages=(1, 2, 3), modulated=True,
             offset_scale=0.1)


def dynamic_macs_ledger(model: DynamicParamNet, static_macs: int, static_layer_macs: dict[str, int],
                        input_sizes: dict[str, tuple[int, int]]) -> int:
    """Per-sample MACs of ``model`` from its backbone's count: ``static_macs`` minus the replaced convolutions'
    static MACs plus each dynamic layer's own ``macs`` ledger (routing + aggregation + convolution).

    ``static_layer_macs`` and ``input_sizes`` (H, W of each replaced layer's input) are keyed by the replaced
    paths; the tests compare the result with FlopCounterMode's count of the variant.
    """
    total = static_macs
    for path, layer in model.dynamic_layers():
        if not hasattr(layer, "macs"):
            raise ValueError(f"{path}: {type(layer).__name__} has no macs ledger")
        total += layer.macs(input_sizes[path]) - static_layer_macs[path]
    return total


@torch.no_grad()
def layer_input_sizes(model: nn.Module, x: Tensor, paths: list[str]) -> dict[str, tuple[int, int]]:
    """Spatial size of the input each module in ``paths`` sees for ``model(x)`` (forward pre-hooks)."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, args, p=p: sizes.__setitem__(p, tuple(args[0].shape[-2:]))) for p in paths]
    try:
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return sizes
