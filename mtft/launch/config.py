"""How many processes a job runs and how they find each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistributedConfig:
    """Processes per job. Under torchrun, `deepspeed` or a SLURM task the ranks come from the
    environment; otherwise `nproc_per_node > 1` makes `mtft train` start its own workers."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # host:port of the rendezvous when nnodes > 1
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo
    timeout_min: int = 30  # how long a collective may wait for a slow rank
