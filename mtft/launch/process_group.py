"""Joining a job's process group: one way for every launcher.

Ranks come from the environment, whoever started the processes: torchrun, the `deepspeed`
launcher, `mtft train distributed.nproc_per_node=N` (torchrun's elastic agent, see
`mtft.launch.workers`), or SLURM (`srun`, Hydra's submitit launcher), whose variables are
translated here. Every one of them ends in `join_process_group(backend, timeout_min)` with the
composed config's `distributed.backend` and `distributed.timeout_min`, which creates the group once.

Under torchrun, `deepspeed` or `srun`, every rank runs `mtft train` itself, and the ranks must agree
on rank 0's clock before Hydra resolves `${now:...}` in the run dir (ranks started seconds apart
would otherwise create several timestamped run dirs), that is before the config, and so the backend,
is known. `join_launched_job` therefore only meets the other ranks at the job's store (the TCP
key-value store on MASTER_ADDR:MASTER_PORT that `init_process_group` would create itself) and reads
rank 0's time from it; the process group is created on that same store after composing.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import time
from typing import Any

from mtft.launch.config import DistBackend

log = logging.getLogger("mtft")

CLOCK_KEY = "mtft/run_clock"
CLAIM_KEY, CLAIM_READ_KEY = "mtft/claim", "mtft/claim_read"  # rank 0's refusal ("": none), its readers
# How long a refusing rank 0 keeps the store up for the other ranks to read why (they start together).
CLAIM_READ_TIMEOUT_S = 120
# The store is met before the config (and its timeout) is known: torch's own default until then.
STORE_TIMEOUT = datetime.timedelta(minutes=30)

_store: Any = None  # the job's store once this rank has met the others (torch.distributed.Store)


def launched_world_size() -> int:
    """Processes in this job according to the environment (before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _job_store() -> Any:
    """This job's store, created once per process exactly as `init_process_group("env://")` would
    (rank 0 hosts it, or torchrun's agent already does), so every launcher works unchanged."""
    global _store
    if _store is None:
        from torch.distributed.rendezvous import rendezvous

        _store, _, _ = next(rendezvous("env://", timeout=STORE_TIMEOUT))
    return _store


def join_process_group(backend: DistBackend = DistBackend.auto, timeout_min: int = 30) -> None:
    """Join the job's process group with the configured backend and collective timeout, once.

    A single process (no launcher, or the parent of mtft's own workers) joins nothing and imports
    no torch; a task of a multi-task SLURM step first turns SLURM's variables into torchrun's.
    """
    if "SLURM_PROCID" in os.environ:
        export_slurm_env()
    if "RANK" not in os.environ or launched_world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    from mtft.core.dist import device_for_rank

    if dist.is_initialized():
        return
    name = str(backend)
    if backend == DistBackend.auto:
        name = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    store = _job_store()
    store.set_timeout(timeout)
    device_for_rank()
    rank, world_size = int(os.environ["RANK"]), launched_world_size()
    dist.init_process_group(name, store=store, rank=rank, world_size=world_size, timeout=timeout)
    log.info(
        "joined the process group as rank %d of %d: backend %s, timeout %d min",
        rank,
        world_size,
        dist.get_backend(),
        timeout_min,
    )


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


def join_launched_job() -> None:
    """In a rank of an externally launched job (torchrun, deepspeed, srun): meet the other ranks and
    agree on rank 0's clock before Hydra runs. The process group itself waits for the config
    (`join_process_group`). A plain single-process run returns at once, without importing torch."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return
    export_slurm_env()
    if launched_world_size() > 1:
        agree_on_run_clock()


def agree_on_run_clock() -> None:
    """Make Hydra's `now` resolver return rank 0's start time on every rank, read from the store.

    Hydra registers `now` itself when it starts (`hydra.core.utils.setup_globals`), so the clock it
    reads, `hydra.core.utils.datetime`, is what is replaced here.
    """
    import hydra.core.utils as hydra_utils

    store = _job_store()
    if int(os.environ["RANK"]) == 0:
        store.set(CLOCK_KEY, datetime.datetime.now().isoformat())
    agreed = datetime.datetime.fromisoformat(store.get(CLOCK_KEY).decode())  # waits for rank 0

    class RankZeroClock(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return agreed

    hydra_utils.datetime = RankZeroClock  # type: ignore[attr-defined]


def share_claim(refusal: str | None) -> None:
    """Rank 0 of a launched job: tell the other ranks whether it claimed the run dir (`refusal`: why
    not). A refusing rank 0 waits until every rank has read it (its process hosts the store), so the
    whole job ends at once, every rank with the refusal's exit code."""
    if "RANK" not in os.environ or launched_world_size() == 1:
        return
    store = _job_store()
    store.set(CLAIM_KEY, refusal or "")
    if refusal is not None:
        deadline = time.monotonic() + CLAIM_READ_TIMEOUT_S
        while store.add(CLAIM_READ_KEY, 0) < launched_world_size() - 1 and time.monotonic() < deadline:
            time.sleep(0.1)


def await_claim() -> None:
    """Another rank of a launched job: wait for rank 0's claim of the run dir; its refusal is this
    rank's too (an MtftError with the same message)."""
    if "RANK" not in os.environ or launched_world_size() == 1:
        return
    store = _job_store()
    refusal = store.get(CLAIM_KEY).decode()  # waits for rank 0
    store.add(CLAIM_READ_KEY, 1)
    if refusal:
        from mtft.core.errors import MtftError

        raise MtftError(refusal)
