"""Several processes share each meta-batch (``torchrun --nproc_per_node K -m smat.train``).

With world size K, process r runs tasks r·B/K … (r+1)·B/K − 1 of every
meta-batch of B tasks; DDP averages the gradients, so the update equals one
process's on all B tasks up to floating point. Task b draws the same mask
noise and Gumbel noise whichever process runs it: both are keyed by b's
global index.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment; a plain run is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(value, world: World) -> list:
    if not world.active:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, world: World):
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DDP, its gradients averaged over the processes. Buffers (θ_pre: N floats) are equal on
    every process and never change, so they are not re-broadcast before every forward. torch ≥ 2.14 spells
    this ``forward_sync_buffers=False`` and warns about the older ``broadcast_buffers``."""
    sync = ({"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
            else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **sync)
