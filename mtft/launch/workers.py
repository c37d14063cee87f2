"""Starting the processes of one multi-process job.

`mtft train distributed.nproc_per_node=N` (also each job of a `-m` sweep) runs the Hydra job in one
parent process, which writes the resolved config into the run dir and starts N workers with
torchrun's elastic agent (`torch.distributed.launcher`); each worker (`python -m mtft.commands.worker`,
named by the caller) trains as one rank. The parent holds the run dir's lock (mtft.launch.claim) for
them, and each worker dies with the parent (PR_SET_PDEATHSIG, see mtft.commands.worker), so no worker
outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from mtft.core.errors import Interrupted, MtftError, StorageError, WorkerKilled
from mtft.core.jsonfile import write_atomic
from mtft.core.rundir import CHECKPOINTS, LAUNCH_CONFIG
from mtft.launch.config import DistributedConfig
from mtft.loggers.context import HYDRA_CONTEXT_ENV, hydra_context

log = logging.getLogger("mtft")


def launch_workers(dist: DistributedConfig, resolved_yaml: str, run_dir: Path, worker: str) -> None:
    """Run the job as `nproc_per_node` x `nnodes` processes of `python -m WORKER CONFIG RUN_DIR PARENT_PID`
    and wait for them.

    A worker's MtftError (exit 2) or resumable stop (exit 75) becomes the parent's, so `mtft train`
    exits the same way whether it ran one process or many.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from mtft.engine.checkpoint import checkpoint_dirs

    if dist.nnodes > 1 and not dist.rdzv_endpoint:
        raise MtftError(
            "distributed.nnodes > 1 needs distributed.rdzv_endpoint=HOST:PORT (the same on every node)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / LAUNCH_CONFIG
    write_atomic(config_path, resolved_yaml)  # the other nodes' agents write the same file
    launch = launch_config(dist, run_dir.name)
    log.info(
        "starting %d worker process(es) per node on %d node(s); run dir %s",
        dist.nproc_per_node,
        dist.nnodes,
        run_dir,
    )
    os.environ[HYDRA_CONTEXT_ENV] = json.dumps(hydra_context())  # the workers name their W&B run
    try:
        elastic_launch(launch, sys.executable)("-m", worker, str(config_path), str(run_dir), str(os.getpid()))
    except SignalException as e:
        # SIGTERM/SIGINT to this parent: the agent passed it on to the workers and waited while
        # they saved a checkpoint and stopped.
        saved = checkpoint_dirs(run_dir / CHECKPOINTS)
        if not saved:
            raise MtftError(f"stopped by {e.sigval.name} before the first checkpoint") from None
        raise Interrupted(int(saved[-1].name.removeprefix("step-")), str(saved[-1])) from None
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        saved = checkpoint_dirs(run_dir / CHECKPOINTS)
        if codes == {Interrupted.exit_code} and saved:
            raise Interrupted(int(saved[-1].name.removeprefix("step-")), str(saved[-1])) from None
        # Killed by a signal; SIGTERM is what the agent stops the survivors with after the cause.
        killed = sorted(
            (-f.exitcode == signal.SIGTERM, f.timestamp, rank, -f.exitcode)
            for rank, f in e.failures.items()
            if f.exitcode < 0
        )
        if killed:
            _, _, rank, signum = killed[0]
            hint = (
                f"the last checkpoint is {saved[-1]} (trainer.resume=auto)" if saved else "no checkpoint yet"
            )
            raise WorkerKilled(rank, signum, hint) from None
        if StorageError.exit_code in codes:
            raise StorageError("a worker could not write a file; see its message above") from None
        raise MtftError(
            f"worker process(es) failed with exit code(s) {sorted(codes)}; see their messages above"
        ) from None


def launch_config(dist: DistributedConfig, name: str) -> Any:
    """torchrun's launch settings for `dist` (a `LaunchConfig`); `name` identifies a multi-node job."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=dist.nnodes,
        max_nodes=dist.nnodes,
        nproc_per_node=dist.nproc_per_node,
        # One node: a private rendezvous on a free local port, as `torchrun --standalone` does.
        run_id=str(uuid.uuid4()) if dist.nnodes == 1 else f"mtft-{name}",
        rdzv_backend="c10d",
        rdzv_endpoint=dist.rdzv_endpoint or "localhost:0",
        max_restarts=0,
        monitor_interval=1,
    )


def launch_command(dist: DistributedConfig, args: list[str], name: str) -> None:
    """Run `python ARGS` as the `dist` job's ranks (RANK, WORLD_SIZE... set) and wait for them; a
    rank's failure is one MtftError. For commands other than training (`mtft eval`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(launch_config(dist, name), sys.executable)(*args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        raise MtftError(
            f"worker process(es) failed with exit code(s) {codes}; see their messages above"
        ) from None
