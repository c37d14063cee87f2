"""How many processes a job runs and how they find each other."""

from __future__ import annotations

from dataclasses import dataclass

from mtft.core.errors import MtftError
from mtft.core.schema import Choice, at_least, choice


class DistBackend(Choice):
    auto = "auto"  # nccl on GPUs, gloo on CPUs
    nccl = "nccl"
    gloo = "gloo"


@dataclass
class DistributedConfig:
    """Processes per job. Under torchrun, `deepspeed` or a SLURM task the ranks come from the
    environment; otherwise `nproc_per_node > 1` makes `mtft train` start its own workers."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # host:port of the rendezvous when nnodes > 1
    backend: DistBackend = DistBackend.auto
    timeout_min: int = 30  # how long a collective may wait for a slow rank

    def __post_init__(self) -> None:
        self.backend = choice("distributed.backend", DistBackend, self.backend)
        at_least("distributed.nproc_per_node", self.nproc_per_node, 1)
        at_least("distributed.nnodes", self.nnodes, 1)
        at_least("distributed.timeout_min", self.timeout_min, 1)
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise MtftError(
                "distributed.nnodes > 1 needs distributed.rdzv_endpoint=HOST:PORT (the same on every node)"
            )
