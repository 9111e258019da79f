"""Channel shuffle (ShuffleNet): interleave the channels of G groups so the next group conv mixes them.

Written with reshape/transpose rather than ``nn.ChannelShuffle`` so that it exports to plain ONNX
Reshape/Transpose and runs in every runtime.
"""
from __future__ import annotations

from torch import Tensor, nn


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(N, G*K, H, W) -> channels reordered as k*G + g, i.e. view (G, K), transpose to (K, G), flatten."""
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels cannot be split into {groups} groups")
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def channel_unshuffle(x: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`channel_shuffle` with the same ``groups``."""
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"channel_unshuffle: {c} channels cannot be split into {groups} groups")
    return x.reshape(n, c // groups, groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
