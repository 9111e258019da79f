"""Distributed data parallel through ``torchrun`` (gloo on CPU, nccl on GPU), nothing home-made.

``torchrun --nproc_per_node=2 -m dyncnn.cli train ...`` sets RANK / WORLD_SIZE / MASTER_ADDR; the trainer calls
:func:`init_from_env` and wraps the model in DistributedDataParallel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment; a single process when there is none.

    NCCL when the processes train on CUDA (``device_type="cuda"``, one GPU per process), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        device_type = device_type or os.environ.get("DYNCNN_DEVICE", "cpu")
        backend = "nccl" if torch.cuda.is_available() and device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_main_process() -> bool:
    """True unless this is a process of rank > 0 in an initialised process group (the one that should print)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
