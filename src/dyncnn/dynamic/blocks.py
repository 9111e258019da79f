"""What the dynamic mechanisms need to know about a residual block, published by the block itself.

Channel gating (:mod:`dyncnn.dynamic.width`) slices a block's hidden channels and spatial sparsity
(:mod:`dyncnn.dynamic.spatial`) runs its branch on chosen pixels only. Both need the same description of a block:
its branch as a list of conv-norm-act units and how the branch output meets the shortcut. Blocks in
:mod:`dyncnn.models` (ResNet's ``ResidualBlock``, MobileNet's ``InvertedResidual``) implement this protocol, in the
spirit of timm's ``feature_info``: the runtime reads the metadata and never imports a model class. A block of
another library takes part by implementing the same few members.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class ResidualBranchBlock(Protocol):
    """``forward(x) == merge(x, branch(x))`` where ``branch`` runs :meth:`branch_units` in order (and, unless
    ``plain_branch``, other layers between them, e.g. squeeze-excitation)."""

    def branch_units(self) -> list[nn.Module]:
        """The branch's conv-norm-act units (``nn.Sequential(conv, norm[, act])``) in order, no identities."""
        ...

    def merge(self, x: Tensor, out: Tensor) -> Tensor:
        """The block's output from its input ``x`` and its branch output ``out`` (same ops as ``forward``)."""
        ...

    @property
    def identity_skip(self) -> bool:
        """The input is added to the branch output unchanged (no projection, no stride)."""
        ...

    @property
    def plain_branch(self) -> bool:
        """The branch is exactly :meth:`branch_units` in sequence (no squeeze-excitation or other layers)."""
        ...

    @property
    def post_act(self) -> nn.Module | None:
        """The activation applied after the addition, or None."""
        ...

    @property
    def channel_gateable(self) -> bool:
        """The hidden channels (outputs of every unit but the last) may be sliced per sample: the branch is
        plain and has a hidden layer of its own."""
        ...
