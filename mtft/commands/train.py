"""`mtft train`: the Hydra application. Data, model and engine libraries wait until a run really
starts, so `--help`, `--cfg job` and config errors need only Hydra and torch (the balancers' schemas)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtft.commands.exits import USAGE_ERROR, fail
from mtft.core.errors import Interrupted, MtftError, config_error_message
from mtft.launch import slurm
from mtft.launch.claim import claim_run_dir, leave_run_dir, write_hydra_files
from mtft.launch.process_group import (
    await_claim,
    export_slurm_env,
    join_launched_job,
    join_process_group,
    share_claim,
)
from mtft.recipe.config import TrainConfig, conf_dir, register_configs, to_typed
from mtft.recipe.validate import validate

log = logging.getLogger("mtft")

# Set once the task function runs: an error before it is Hydra's config composition (see `run`).
task_started = False

register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    global task_started
    task_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # Rank 0 (or the only process) claims the run dir for the job; the other ranks of a launched job
    # run under its claim, and mtft's own workers under their parent's. A task of Hydra's submitit
    # launcher starts here, not in `run`: its rank comes from SLURM's variables first.
    export_slurm_env()
    first = int(os.environ.get("RANK", "0")) == 0
    if not first:  # rank 0 logs for the job; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    started = False
    hint = f". Continue with the same command plus: trainer.resume=auto hydra.run.dir={run_dir}"
    try:
        typed = to_typed(cfg)
        validate(typed)  # the cross-section rules, before any data, model or engine is built
        if slurm.restarts() and not typed.trainer.resume:
            typed.trainer.resume = "auto"  # a requeued SLURM job continues its own run
            log.info("SLURM started this job again (restart %d): trainer.resume=auto", slurm.restarts())
        with _claimed(run_dir, typed, first):
            resume_from = _resume_point(run_dir, typed)
            started = True
            if first:  # the dir is ours and the config can run: .hydra/ now records it
                write_hydra_files(run_dir, cfg, HydraConfig.instance().cfg)
            _run(typed, cfg, run_dir, resume_from)
    except Interrupted as e:
        if _requeue(typed, hydra_cfg):
            hint = f"; SLURM job {os.environ['SLURM_JOB_ID']} is requeued and continues from it by itself"
        sys.exit(fail(e, logged=True, resume_hint=hint))
    except Exception as e:
        if not started and isinstance(e, MtftError):
            leave_run_dir(run_dir)  # refused before the run began: the run dir gets nothing
        sys.exit(fail(e, logged=True, resume_hint=hint))


@contextmanager
def _claimed(run_dir: Path, cfg: TrainConfig, first: bool) -> Iterator[None]:
    """Rank 0 (or the only process) holds the run dir while the body runs and tells the job's other
    ranks whether it could; they wait for its word, and its refusal ends them too (exit 2 each)."""
    if not first:
        await_claim()
        yield
        return
    with ExitStack() as claim:
        try:
            claim.enter_context(claim_run_dir(run_dir, cfg.trainer.resume, cfg.distributed.nnodes > 1))
        except MtftError as e:
            share_claim(str(e))
            raise
        share_claim(None)
        yield


def _requeue(cfg: TrainConfig, hydra_cfg: DictConfig) -> bool:
    """After a signal's checkpoint, put a SLURM job with requeues left (`distributed.max_requeues`, or
    `hydra.launcher.max_num_timeout`) back in the queue: rank 0 asks, every rank waits for it, so no
    rank's exit ends the job first (SLURM_KILL_BAD_EXIT)."""
    from mtft.core.dist import barrier, rank

    # The launcher's own setting when a user gave it (its default interpolates the job's config).
    launcher = OmegaConf.select(hydra_cfg, "launcher.max_num_timeout", throw_on_resolution_failure=False)
    limit = max(cfg.distributed.max_requeues, launcher if isinstance(launcher, int) else 0)
    if not slurm.can_requeue(limit):
        return False
    requeued = slurm.requeue() if rank() == 0 else True
    barrier()
    return requeued


def _resume_point(run_dir: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, checked against the config of this job's world size."""
    from mtft.launch.process_group import launched_world_size
    from mtft.recipe.resume import resume_point

    dist = cfg.distributed
    world = launched_world_size() if "RANK" in os.environ else dist.nproc_per_node * dist.nnodes
    return resume_point(run_dir, cfg, world)


def _run(typed: TrainConfig, cfg: DictConfig, run_dir: Path, resume_from: Path | None) -> None:
    dist = typed.distributed
    # A rank of a launched job (torchrun, deepspeed, srun, submitit) joins its group here, with
    # the configured backend and timeout; a single process joins nothing.
    join_process_group(dist.backend, dist.timeout_min)
    if "RANK" not in os.environ and (dist.nproc_per_node > 1 or dist.nnodes > 1):
        from mtft.launch.workers import launch_workers

        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["trainer"]["resume"] = resume_from and str(resume_from)  # type: ignore[index]  # checked here
        launch_workers(dist, OmegaConf.to_yaml(resolved), run_dir, "mtft.commands.worker")
    else:
        from mtft.recipe.finetune import train

        train(typed, run_dir, resume_from)


def run(args: list[str]) -> int:
    """`mtft train ARGS`: join a launched job's ranks, then run the Hydra app. A config Hydra cannot
    compose (unknown key, bad override or value) is a user error like any other: one `error:` line and
    exit code 2, not Hydra's exit 1."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    join_launched_job()
    sys.argv = [f"{sys.argv[0]} train", *args]  # Hydra parses sys.argv
    user_wants_trace = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing and exiting 1
    try:
        main()
    except Exception as e:
        if task_started or user_wants_trace or isinstance(e, BrokenPipeError):
            raise
        if type(e).__module__.startswith("submitit"):  # a job of hydra/launcher=slurm failed
            print(f"error: {_job_error(e)}", file=sys.stderr)
            return USAGE_ERROR
        # Before the task starts only Hydra runs, and some of its composition failures are bare
        # asserts (`+deepspeed.extra.x=1` while deepspeed=none): still the user's overrides.
        if isinstance(e, HydraException | OmegaConfBaseException):
            message = config_error_message(e)
        elif isinstance(e, OSError):  # Hydra creating the run dir: a read-only or full file system
            message = f"cannot create the run dir: {e.strerror}: {e.filename}"
        else:
            message = f"the overrides could not be applied: {e!r}"
        print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _job_error(error: Exception) -> str:
    """A failed SLURM job's reason: its own `error:` line when mtft refused it, else raise `error`."""
    found = [line.removeprefix("error: ") for line in str(error).splitlines() if line.startswith("error: ")]
    if not found:
        raise error
    return f"SLURM job failed: {found[-1].strip()}"
