"""Joining a job's process group: one way for every launcher.

Ranks come from the environment, whoever started the processes: torchrun, the `deepspeed`
launcher, `mtft train distributed.nproc_per_node=N` (torchrun's elastic agent, see
`mtft.launch.workers`), or SLURM (`srun`, Hydra's submitit launcher), whose variables are
translated here. Under torchrun, `deepspeed` or SLURM, where every rank runs `mtft train` itself,
`agree_on_run_clock` makes the ranks resolve `${now:...}` in the run dir to rank 0's time, so
ranks started seconds apart never create several timestamped run dirs.
"""

from __future__ import annotations

import datetime
import os
import random


def launched_world_size() -> int:
    """Processes in this job according to the environment (before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(backend: str = "auto", timeout_min: int = 30) -> None:
    """Join the job's process group from the environment (env://), once."""
    import torch
    import torch.distributed as dist

    from mtft.core.dist import device_for_rank

    if launched_world_size() == 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"distributed.backend must be auto, nccl or gloo, got '{backend}'")
    device_for_rank()
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))


def export_slurm_env() -> bool:
    """Under a multi-task SLURM step (srun, submitit), set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT from SLURM's variables, as torchrun would have. Returns whether it did."""
    # Only srun (which submitit uses) sets SLURM_STEP_NUM_TASKS: a batch script running one
    # `mtft train` in an allocation of many tasks must not wait for ranks that never start.
    ntasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if ntasks < 2 or "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return False
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()
    # The same port on every task of a job, chosen from the job id unless the user sets MASTER_PORT.
    port = os.environ.get("MASTER_PORT") or str(random.Random(job.job_id).randint(20000, 60000))
    os.environ.update(
        {
            "RANK": str(job.global_rank),
            "WORLD_SIZE": str(ntasks),
            "LOCAL_RANK": str(job.local_rank),
            "LOCAL_WORLD_SIZE": str(ntasks // max(job.num_nodes, 1)),
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": port,
        }
    )
    return True


def join_launched_job(argv: list[str]) -> list[str]:
    """In a rank of an externally launched job (torchrun, deepspeed, srun/submitit): join the
    process group before Hydra runs, and return the Hydra overrides that keep ranks together.
    A plain single-process run returns at once, without importing torch."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return argv
    from mtft.core.dist import rank

    export_slurm_env()
    if launched_world_size() == 1:
        return argv
    init_process_group(os.environ.get("MTFT_DIST_BACKEND", "auto"))
    agree_on_run_clock()
    # Rank 0 writes .hydra/ and logs for the job; the others only warn.
    return (
        argv if rank() == 0 else [*argv, "hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING"]
    )


def agree_on_run_clock() -> None:
    """Make Hydra's `now` resolver return rank 0's start time on every rank.

    Hydra registers `now` itself when it starts (`hydra.core.utils.setup_globals`), so the clock it
    reads, `hydra.core.utils.datetime`, is what is replaced here.
    """
    import hydra.core.utils as hydra_utils

    from mtft.core.dist import broadcast_object

    agreed = broadcast_object(datetime.datetime.now())

    class RankZeroClock(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return agreed

    hydra_utils.datetime = RankZeroClock  # type: ignore[attr-defined]
