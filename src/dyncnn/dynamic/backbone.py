"""Reading and adapting any backbone (dyncnn, torchvision, timm): its input channels, its stem, its stage ends.

- :func:`input_channels` reads the channels a model takes from its first convolution (``in_chans`` when it
  declares one), so that exits, exports and checks need not be told.
- :func:`set_input_channels` swaps the stem convolution for one taking another number of channels, with the
  weights adapted the way timm adapts a pretrained stem (``timm.models.adapt_input_conv``): for one channel the
  RGB filters are summed (a grey image replicated to RGB gives the same response), for C channels the filters are
  repeated to C and scaled by 3/C (an image whose channels are all equal gives the same response).
- :func:`stage_ends` suggests where to attach exits: the ends of the stages at output strides 8, 16 and 32 --
  ``feature_info`` where timm has it, ``stage_info`` on dyncnn backbones, else the last module of the model's trunk
  at each resolution, found from one forward pass.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import DyncnnError


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """(path, module) of the model's stem convolution: the first ``nn.Conv2d`` in registration order (torchvision,
    timm and dyncnn all register the stem first); None when there is none."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return path, module
    return None


def input_channels(model: nn.Module, default: int | None = None) -> int:
    """The number of input channels ``model`` takes: its ``in_chans`` when it declares one, else its first
    convolution's ``in_channels``; ``default`` when it has neither (a DyncnnError without a default)."""
    declared = getattr(model, "in_chans", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    found = first_conv(model)
    if found is not None:
        return found[1].in_channels
    if default is not None:
        return default
    raise DyncnnError(f"cannot tell the input channels of {type(model).__name__}: it declares no in_chans and has "
                      f"no nn.Conv2d; set model.in_chans")


def adapt_input_weight(weight: Tensor, in_chans: int) -> Tensor:
    """A stem convolution's weight (out, C, kh, kw) adapted to ``in_chans`` input channels: summed over C for one
    channel, else repeated to ``in_chans`` and scaled by C / in_chans (timm's rule for pretrained stems)."""
    if in_chans < 1:
        raise DyncnnError(f"in_chans must be >= 1, got {in_chans}")
    c = weight.shape[1]
    if in_chans == c:
        return weight.clone()
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / c), 1, 1)[:, :in_chans] * (c / in_chans)
    return w.to(weight.dtype)


def set_input_channels(model: nn.Module, in_chans: int) -> nn.Module:
    """Make ``model`` take ``in_chans`` channels: its stem convolution (:func:`first_conv`) is replaced by one with
    ``in_chans`` inputs and weights from :func:`adapt_input_weight`; ``model.in_chans`` is set. Returns ``model``.
    A grouped stem (depthwise on the input) cannot be adapted and is refused."""
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise DyncnnError(f"in_chans must be a positive integer (1 for grey images, 3 for RGB), got {in_chans!r}")
    found = first_conv(model)
    if found is None:
        raise DyncnnError(f"{type(model).__name__} has no nn.Conv2d stem whose input channels could be changed")
    path, conv = found
    if conv.in_channels != in_chans:
        if conv.groups != 1:
            raise DyncnnError(f"cannot change the input channels of {type(model).__name__}: its stem {path!r} is a "
                              f"grouped convolution (groups={conv.groups})")
        new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                        bias=conv.bias is not None, padding_mode=conv.padding_mode,
                        device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            if conv.weight.device.type != "meta":
                new.weight.copy_(adapt_input_weight(conv.weight, in_chans))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)
    try:
        model.in_chans = in_chans
    except (AttributeError, TypeError):      # a read-only property: the stem says it anyway
        pass
    return model


# Output strides whose stage ends are suggested as exits: the feature levels detection necks use (C3, C4, C5).
EXIT_STRIDES = (8, 16, 32)


def _pick(cands: list[tuple[str, int]]) -> list[str]:
    """From (module path, output stride) in execution order: the last module at each stride in EXIT_STRIDES (or
    above 32); a network of one stride throughout (a ViT) gets cuts at a third and two thirds of its depth."""
    last: dict[int, str] = {}
    for path, stride in cands:
        if stride >= EXIT_STRIDES[0]:
            last[stride] = path
    picked = [last[s] for s in sorted(last)]
    if len(picked) < 2 and len(cands) >= 3 and len({s for _, s in cands}) == 1:
        n = len(cands)
        picked = [cands[n // 3 - 1][0], cands[2 * n // 3 - 1][0], cands[-1][0]]
    return picked


def _trunk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's chain of blocks: ``features`` when it is an nn.Sequential (MobileNet, EfficientNet, VGG,
    DenseNet), else its direct children (ResNet, ShuffleNet); a child Sequential that spans several strides (RegNet's
    ``trunk_output``) is opened into its own children after the pass (see :func:`stage_ends`)."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [(f"features.{n}", m) for n, m in features.named_children()]
    return list(model.named_children())


def stage_ends(model: nn.Module, example_size: int = 64) -> list[str]:
    """Suggested module paths to attach exits after (for :func:`~dyncnn.dynamic.exits.attach_exits`): the end of
    each stage at output stride 8, 16 and 32. From ``stage_info`` (dyncnn backbones), ``feature_info`` (timm), or
    else a forward pass of a ``example_size`` image that records each trunk module's output resolution."""
    info = getattr(model, "stage_info", None)
    if info:
        return [s.module for s in info]
    feature_info = getattr(model, "feature_info", None)
    if isinstance(feature_info, (list, tuple)) and feature_info and all(
            isinstance(f, dict) and "module" in f and "reduction" in f for f in feature_info):
        picked = _pick([(f["module"], int(f["reduction"])) for f in feature_info])
        if picked:
            return picked
    chans = input_channels(model, default=3)
    strides: dict[str, int] = {}
    hooks = []

    def record(path: str):
        def hook(_module, _inputs, out):
            if isinstance(out, Tensor) and out.dim() == 4 and max(out.shape[-2:]) > 1:   # not a global pool
                strides[path] = max(1, round(example_size / out.shape[-1]))
        return hook
    todo = _trunk(model)
    for path, module in todo:
        hooks.append(module.register_forward_hook(record(path)))
        if isinstance(module, nn.Sequential):
            for n, child in module.named_children():
                hooks.append(child.register_forward_hook(record(f"{path}.{n}")))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, chans, example_size, example_size))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on an input size it does not take
        raise DyncnnError(f"cannot find the stage ends of {type(model).__name__}: a forward pass of a {chans}x"
                          f"{example_size}x{example_size} input failed ({e}); give the exit modules by name") from e
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    cands: list[tuple[str, int]] = []
    for path, module in todo:
        if path not in strides:
            continue
        inner = [(f"{path}.{n}", strides[f"{path}.{n}"]) for n, _ in module.named_children()
                 if f"{path}.{n}" in strides] if isinstance(module, nn.Sequential) else []
        if len({s for _, s in inner}) > 1 and not path.startswith("features."):
            cands += inner           # a container over several stages: its blocks are the trunk
        else:
            cands.append((path, strides[path]))
    picked = _pick(cands)
    if len(picked) < 2:
        raise DyncnnError(f"found {len(picked)} stage end(s) of {type(model).__name__} at output stride 8 or more on "
                          f"a {example_size}x{example_size} input, too few for exits; give the exit modules by name")
    return picked
