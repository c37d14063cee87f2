"""How many processes a job runs and how they find each other."""

from __future__ import annotations

from dataclasses import dataclass

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
    # host:port of the rendezvous when mtft starts the workers of nnodes > 1 nodes itself (under SLURM
    # or torchrun the launcher provides it)
    rdzv_endpoint: str | None = None
    backend: DistBackend = DistBackend.auto
    timeout_min: int = 30  # how long a collective may wait for a slow rank
    # SLURM: how often a job that a time limit (SIGUSR2) or preemption (SIGTERM) stopped puts itself
    # back in the queue after its checkpoint, and continues from it when it starts again (0: it exits
    # 75, to be resumed by hand). hydra/launcher=slurm's max_num_timeout follows it.
    max_requeues: int = 0

    def __post_init__(self) -> None:
        self.backend = choice("distributed.backend", DistBackend, self.backend)
        at_least("distributed.nproc_per_node", self.nproc_per_node, 1)
        at_least("distributed.nnodes", self.nnodes, 1)
        at_least("distributed.timeout_min", self.timeout_min, 1)
        at_least("distributed.max_requeues", self.max_requeues, 0)
