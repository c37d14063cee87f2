"""SLURM's side of a job: what a `hydra/launcher=slurm` job asks for, and requeueing a stopped job.

The submitting process asks `sinfo` what the partition's nodes have, so the defaults fit the cluster:
GPUs only where the nodes have them (and the job will use CUDA), and no more CPUs per task than a node
can give its tasks. Without `sinfo` (no SLURM on this machine, e.g. `--cfg job`) the defaults are the
ones for a GPU partition: a GPU and 8 CPUs per task.

A job stopped by its time limit or a preemption has saved a checkpoint; with requeues left, it puts
itself back in the queue (`scontrol requeue`: the same job id, its batch script run again) and, when it
starts again, continues from that checkpoint (`SLURM_RESTART_COUNT` > 0 means `trainer.resume=auto`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess

from omegaconf import OmegaConf

from mtft.launch.config import DistBackend

log = logging.getLogger("mtft")

MAX_CPUS_PER_TASK = 8  # data loading and tokenization workers per rank; more rarely helps


@functools.cache
def partition_nodes(partition: str | None) -> tuple[tuple[str, int], ...]:
    """(generic resources, CPUs) of each node group of `partition` (the default one if None), as
    `sinfo` reports them, asked once per process (both resolvers read it); () when SLURM's client tools
    are not here or the partition is unknown."""
    if shutil.which("sinfo") is None:
        return ()
    args = ["sinfo", "--noheader", "--format=%G|%c", *(["--partition", partition] if partition else [])]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    nodes = []
    for line in out.splitlines():
        gres, _, cpus = line.partition("|")
        if cpus.strip().isdigit():
            nodes.append((gres.strip(), int(cpus)))
    return tuple(nodes)


def gpus_per_node(partition: str | None, tasks_per_node: int, backend: str) -> int:
    """One GPU per task where the job will use CUDA: `distributed.backend=nccl`, or `auto` on a
    partition whose nodes have GPUs (or whose nodes cannot be read); none for gloo or a CPU partition."""
    if backend == DistBackend.gloo:
        return 0
    nodes = partition_nodes(partition)
    if backend == DistBackend.auto and nodes and not any("gpu" in gres for gres, _ in nodes):
        return 0
    return tasks_per_node


def cpus_per_task(partition: str | None, tasks_per_node: int) -> int:
    """`MAX_CPUS_PER_TASK`, or what the partition's smallest node can give each of its tasks."""
    nodes = partition_nodes(partition)
    if not nodes:
        return MAX_CPUS_PER_TASK
    return max(1, min(MAX_CPUS_PER_TASK, min(cpus for _, cpus in nodes) // tasks_per_node))


def register_resolvers() -> None:
    """`${mtft.slurm_gpus:...}` and `${mtft.slurm_cpus:...}` for mtft/conf/hydra/launcher/slurm.yaml."""
    for name, resolver in (("mtft.slurm_gpus", gpus_per_node), ("mtft.slurm_cpus", cpus_per_task)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def restarts() -> int:
    """How many times SLURM has started this job again (requeued); 0 outside SLURM."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def can_requeue(limit: int) -> bool:
    """Whether this process is part of a SLURM job that has requeued itself fewer than `limit` times."""
    return "SLURM_JOB_ID" in os.environ and restarts() < limit


def requeue() -> bool:
    """Put this SLURM job back in the queue (`scontrol requeue`); False, with a warning, where SLURM
    refuses (a job started by `srun` alone has no batch script to run again, or `--no-requeue`)."""
    job = os.environ["SLURM_JOB_ID"]
    try:
        subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=True)
    except subprocess.CalledProcessError as e:
        log.warning("could not requeue SLURM job %s: %s", job, e.stderr.strip() or e)
        return False
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not requeue SLURM job %s: %s", job, e)
        return False
    return True
