"""Inference-time rewrites that keep a model's outputs and decisions: BatchNorm folded into the convolution before
it, and channels-last (NHWC) memory for the weights.

``optimize_for_inference(model)`` is the eager counterpart of what ONNX Runtime and XNNPACK do when they load a
graph. On a CPU, oneDNN's convolutions run fastest on channels-last tensors (depthwise ones most of all), and a
folded BatchNorm is one elementwise pass less per convolution, which counts at batch 1. The model keeps its class,
its ``infer`` and its MAC ledger (a folded convolution has the same multiply-accumulates; the bias add is not a
MAC), so a dynamic model makes the same decisions afterwards. Only eval-mode models are rewritten: folding
freezes the running statistics.

Where a pair is folded:
- in an ``nn.Sequential`` (``ConvNormAct`` and every torchvision conv-BN-act unit), a convolution followed by a
  BatchNorm2d, where the order of the children is the order they run;
- in a ``torch.fx.GraphModule`` (backbones cut at exits by ``dynamic.split``), a convolution whose only user is
  a BatchNorm2d, read from the graph.
Pre-activation pairs (BN before the convolution, DenseNet) and modules that call their children in their own
order are left alone: nothing is folded unless the graph or the container says what runs after what.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import DyncnnError


def _plain_conv(m: nn.Module) -> bool:
    """A convolution whose forward is Conv2d's (subclasses that only change the constructor qualify)."""
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def _foldable_bn(bn: nn.Module, conv: nn.Module) -> bool:
    """An eval BatchNorm2d with running statistics over the convolution's outputs (a submodule left in training
    mode inside an eval model normalises with batch statistics: not foldable)."""
    return (type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == conv.out_channels and not bn.training and not conv.training)


def _fold_sequential(seq: nn.Sequential, shared: set[int]) -> int:
    names = list(seq._modules)
    folded = 0
    for a, b in zip(names, names[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if _plain_conv(conv) and _foldable_bn(bn, conv) and id(conv) not in shared and id(bn) not in shared:
            seq._modules[a] = fuse_conv_bn_eval(conv, bn)
            seq._modules[b] = nn.Identity()
            folded += 1
    return folded


def _fold_graph(gm: GraphModule, shared: set[int]) -> int:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        conv, bn = modules[prev.target], modules[node.target]
        if calls[prev.target] != 1 or calls[node.target] != 1 or id(conv) in shared or id(bn) in shared:
            continue                                   # a module called twice: folding would change the other call
        if not (_plain_conv(conv) and _foldable_bn(bn, conv)):
            continue
        _set_submodule(gm, prev.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval BatchNorm2d into the convolution that feeds it, in place; returns the number of pairs
    folded. See the module docstring for where pairs are found."""
    if model.training:
        raise DyncnnError("fold_batchnorm needs an eval-mode model (it freezes BatchNorm's running statistics): "
                          "call model.eval() first")
    seen: set[int] = set()
    shared: set[int] = set()                           # modules registered in two places (tied weights)
    for _, m in model.named_modules(remove_duplicate=False):
        (shared if id(m) in seen else seen).add(id(m))
    folded = 0
    for m in list(model.modules()):
        if isinstance(m, GraphModule):
            folded += _fold_graph(m, shared)
        elif isinstance(m, nn.Sequential):
            folded += _fold_sequential(m, shared)
    return folded


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True,
                           inplace: bool = False) -> nn.Module:
    """The model with BatchNorm folded into its convolutions and its weights in channels-last memory, for eager
    inference on a CPU (a copy unless ``inplace``). Inputs need no conversion: a convolution with channels-last
    weights returns channels-last activations. The model must be in eval mode; training it afterwards is not
    supported (its BatchNorms are gone)."""
    if model.training:
        raise DyncnnError("optimize_for_inference needs an eval-mode model: call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    if fold_bn:
        fold_batchnorm(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _nhwc(t: Tensor) -> bool:
    """A 4-d tensor laid out channels-last (and not also plain contiguous, as a 1-channel or 1x1 map is)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def take_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(0, index)`` in ``t``'s memory layout: a channels-last batch gives channels-last rows
    (``index_select`` alone returns NCHW, and every convolution after it would convert back)."""
    if _nhwc(t):
        return t.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return t.index_select(0, index)


def put_rows(into: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``into.index_copy_(0, index, rows)``, copying contiguous NHWC rows when ``into`` is channels-last."""
    if _nhwc(into):
        into.permute(0, 2, 3, 1).index_copy_(0, index, rows.permute(0, 2, 3, 1))
        return into
    return into.index_copy_(0, index, rows)


def empty_rows(like: Tensor, n: int) -> Tensor:
    """An uninitialised batch of ``n`` rows shaped like ``like``'s, in its memory layout."""
    fmt = torch.channels_last if _nhwc(like) else torch.contiguous_format
    return torch.empty((n,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device, memory_format=fmt)
