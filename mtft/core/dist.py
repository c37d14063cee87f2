"""The few collective operations mtft needs, and this process's rank and device; all are no-ops
in a single process. Joining the process group is `mtft.launch.process_group`'s job."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone so autograd graphs are untouched)."""
    if world_size() == 1:
        return tensor.detach().clone()
    # NCCL reduces only GPU tensors; gloo any CPU tensor.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building the cache), the other ranks after it (reading it)."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def device_for_rank() -> torch.device:
    """This rank's accelerator (CUDA device LOCAL_RANK) or the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def gather_shards(items: list) -> list:
    """Every rank's `items` (rank r holding elements r, r+W, r+2W, ... of a list), reassembled in order."""
    if world_size() == 1:
        return list(items)
    shards: list = [None] * world_size()
    dist.all_gather_object(shards, items)
    out = []
    for i in range(max(map(len, shards))):
        out += [shard[i] for shard in shards if i < len(shard)]
    return out
