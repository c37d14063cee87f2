"""Through a real SLURM scheduler: the session's cluster (tests/cluster/slurm.py, nodes n1 and n2 on
this host, partition debug). Multi-process jobs are checked against one process with the same
global batch, as tests/test_distributed.py checks torchrun. Skipped, with the reason, without SLURM."""

from __future__ import annotations

import fcntl
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster.slurm import ACTIVE
from test_distributed import COMMON, PER_RANK, assert_ranks_agree_and_match
from test_resume import assert_same_run, spawn, trained_to

from conftest import ROOT

pytestmark = pytest.mark.slow

# srun's line for a task that ended badly while the job goes on: "srun: error: n1: task 0: Exited
# with exit code 2".
TASK_FAILED = re.compile(r"srun: error: \S+: tasks? [\d,-]+: Exited with exit code [1-9]")
# Once a task has failed, the job must end within this (issue 25: "ends the whole job promptly").
FAILED_JOB_GRACE_S = 15


@pytest.fixture(scope="module")
def single(run_mtft, tmp_path_factory) -> Path:
    """The one-process run the jobs must match (as test_distributed's)."""
    run_dir = tmp_path_factory.mktemp("single") / "single"
    run_mtft("train", *COMMON, "trainer.batch_size=16", f"hydra.run.dir={run_dir}")
    return run_dir


def test_cluster_runs_a_job_across_both_nodes_and_records_exit_codes(slurm_cluster, tmp_path: Path) -> None:
    assert slurm_cluster.node_states() == {"n1": "idle", "n2": "idle"}
    # Both "nodes" are this host (`hostname` says so twice): slurmd's node name tells them apart.
    out = slurm_cluster.run("srun", "-N2", "-n2", "--label", "sh", "-c", "echo $SLURMD_NODENAME").stdout
    assert sorted(out.splitlines()) == ["0: n1", "1: n2"]
    # A finished job's exit code stays on record: the controller's and the completion log's (sacct).
    job_id = slurm_cluster.sbatch("#!/bin/sh\nexit 3\n", f"--output={tmp_path / 'job.out'}", "--time=1")
    job = slurm_cluster.wait(job_id, timeout=60)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "3:0")
    sacct = slurm_cluster.run("sacct", "-o", "JobID,State,ExitCode", "--parsable2", "-j", job_id).stdout
    assert f"{job_id}|FAILED|3:0" in sacct.splitlines()


def srun_job(
    cluster, nodes: int, tasks: int, args: list[str], mtft_env, tmp_path: Path
) -> tuple[dict[str, str], Path]:
    """A user's own batch script of `nodes` nodes running `srun mtft train ARGS` as `tasks` tasks, from
    `tmp_path`, with a timestamped run dir (named down to the microsecond); the finished job and its
    one run dir."""
    train = [sys.executable, "-m", "mtft", "train", *args, "hydra.run.dir=outputs/${now:%H-%M-%S-%f}"]
    script = f"#!/bin/sh\nexec srun -N{nodes} -n{tasks} {shlex.join(train)}\n"
    out = tmp_path / "job.out"
    options = [f"--nodes={nodes}", f"--ntasks={tasks}", "--time=5", f"--chdir={tmp_path}", f"--output={out}"]
    job_id = cluster.sbatch(script, *options, env=mtft_env)
    job = cluster.wait(job_id, timeout=420)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), out.read_text()[-3000:]
    (run_dir,) = (tmp_path / "outputs").iterdir()  # the ranks agreed on rank 0's clock
    return job, run_dir


def test_srun_across_two_nodes_in_a_batch_script_matches_one_process(
    slurm_cluster, single: Path, mtft_env, tmp_path: Path
) -> None:
    """`srun -N2 -n2 mtft train ...`, one task on each node: the tasks become the ranks of one DDP job
    (MASTER_ADDR n1), in one run dir."""
    job, run_dir = srun_job(slurm_cluster, 2, 2, PER_RANK, mtft_env, tmp_path)
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2"
    assert_ranks_agree_and_match(run_dir, single)
    assert "joined the process group as rank 0 of 2" in (run_dir / "train.log").read_text()


def test_deepspeed_zero2_on_one_node_of_two_tasks_matches_one_process(
    slurm_cluster, single: Path, mtft_env, tmp_path: Path
) -> None:
    """`srun -N1 -n2 mtft train deepspeed=zero2 ...`: the two tasks of one node are a ZeRO-2 job."""
    job, run_dir = srun_job(slurm_cluster, 1, 2, [*PER_RANK, "deepspeed=zero2"], mtft_env, tmp_path)
    assert job["NumNodes"] == "1"
    assert_ranks_agree_and_match(run_dir, single)
    assert "engine: DeepSpeed ZeRO-2, world size 2" in (run_dir / "train.log").read_text()


def test_slurm_launcher_sweep_of_two_node_jobs_matches_one_process(
    slurm_cluster, single: Path, mtft_env, tmp_path: Path
) -> None:
    """`mtft train -m hydra/launcher=slurm ...`: a sweep of two jobs, each 2 nodes x 1 task (submitit
    runs the task function in each), on the CPU partition (no GPUs asked for), within a 5-minute time
    limit; failed at once if a task fails while its job goes on (the deadlock of issue 25: a refused
    task, its peer waiting for it in the store)."""
    sweep = tmp_path / "sweep"
    log = tmp_path / "mtft.log"
    args = [
        "train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "distributed.nnodes=2",
        # Two jobs (their results must not depend on what differs), side by side: a CPU of each node each.
        "trainer.save_model=true,false", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5",
        # SIGUSR2 comes signal_delay_s (and up to a minute more) before the time limit: the default
        # 120 s would send it at once, and a loaded machine needs ~90 s for this run.
        "hydra.launcher.signal_delay_s=30", *PER_RANK, f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    with log.open("w") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mtft", *args],
            cwd=ROOT,
            env={**mtft_env, **slurm_cluster.env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline, failed_at = time.monotonic() + 330, None
    try:
        while proc.poll() is None:
            if failed_at is None and any(
                TASK_FAILED.search(err.read_text(errors="replace"))
                for err in sweep.glob(".submitit/*/*_log.err")
            ):
                failed_at = time.monotonic()
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + FAILED_JOB_GRACE_S):
                why = (
                    f"a task of the job failed and the job still runs {FAILED_JOB_GRACE_S} s later"
                    if failed_at is not None
                    else "the sweep did not end within 330 s"
                )
                errors = "".join(
                    f"\n--- {p}\n{p.read_text()[-1500:]}" for p in sweep.glob(".submitit/*/*.err")
                )
                pytest.fail(why + errors)
            time.sleep(0.5)
        assert proc.returncode == 0, log.read_text()[-3000:]
        jobs = sorted(sweep.glob(".submitit/[0-9]*_[0-9]*"))  # one dir per job of the array: ID_INDEX
        assert len(jobs) == 2
        for job_dir in jobs:  # submitit returns once every task sent its result; the job ends next
            job = slurm_cluster.wait(job_dir.name, timeout=30)
            assert (job["JobState"], job["ExitCode"], job["NumNodes"]) == ("COMPLETED", "0:0", "2")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for job_dir in sweep.glob(".submitit/[0-9]*"):
            slurm_cluster.run("scancel", job_dir.name, check=False)
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0",
        "1",
        "multirun.yaml",
    ]
    for job in ("0", "1"):
        assert_ranks_agree_and_match(sweep / job, single)


# Long enough for a signal to land mid-training (the run is checked to have stopped before its end).
REQUEUE = [*COMMON[:3], "trainer.max_steps=40", "trainer.eval_interval=10", "trainer.save_interval=20"]
REQUEUE += ["trainer.eval_batches=1", "trainer.eval_batch_size=8", "trainer.batch_size=4"]
STOPPED = re.compile(r"stopped at step (\d+); checkpoint saved to \S+; SLURM job (\d+) is requeued")


@pytest.fixture(scope="module")
def uninterrupted(run_mtft, tmp_path_factory) -> Path:
    """The run every requeued job must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_mtft("train", *REQUEUE, f"hydra.run.dir={run_dir}")
    return run_dir


def signal_mid_training(cluster, job_id: str, run_dir: Path, signame: str, proc=None) -> None:
    """Deliver `signame` to the job's tasks (`scancel --signal`) once its run has trained 3 steps."""
    deadline = time.monotonic() + 240
    while not trained_to(run_dir, 3)():
        assert proc is None or proc.poll() is None, "the sweep ended before the signal"
        assert cluster.job(job_id)["JobState"] in ACTIVE, cluster.job(job_id)
        assert time.monotonic() < deadline, "the job did not reach step 3 in 240 s"
        time.sleep(0.1)
    cluster.run("scancel", f"--signal={signame}", job_id)


def assert_requeued_once_and_same(cluster, job_id: str, run_dir: Path, signame: str, reference: Path) -> None:
    """The job stopped mid-training on the signal, requeued itself, came back and finished: the same
    metrics rows and final weights as the uninterrupted run."""
    job = cluster.wait(job_id, timeout=300)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), cluster.logs()
    log = (run_dir / "train.log").read_text()
    assert f"{signame} received" in log
    (stop,) = STOPPED.findall(log)
    assert int(stop[0]) < 40 and stop[1] == job_id
    assert "SLURM started this job again (restart 1): trainer.resume=auto" in log
    assert_same_run(run_dir, reference)


def test_a_time_limit_signal_requeues_a_launcher_job_that_continues_exactly(
    slurm_cluster, uninterrupted: Path, mtft_env, tmp_path: Path
) -> None:
    """hydra/launcher=slurm with distributed.max_requeues=1: SIGUSR2 (what SLURM sends
    signal_delay_s before the time limit) during training; the sweep command waits through the
    requeue and returns as if nothing happened."""
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug"]
    args += ["distributed.max_requeues=1", *REQUEUE, f"hydra.sweep.dir={sweep}"]
    proc = spawn({**mtft_env, **slurm_cluster.env}, *args)
    try:
        deadline = time.monotonic() + 120
        while not (jobs := list(sweep.glob(".submitit/[0-9]*"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        job_id = jobs[0].name
        signal_mid_training(slurm_cluster, job_id, sweep / "0", "USR2", proc)
        _, err = proc.communicate(timeout=360)
        assert proc.returncode == 0, err[-3000:]
        assert_requeued_once_and_same(slurm_cluster, job_id, sweep / "0", "SIGUSR2", uninterrupted)
    finally:
        if proc.poll() is None:
            proc.kill()
        for job_dir in sweep.glob(".submitit/[0-9]*"):
            slurm_cluster.run("scancel", job_dir.name, check=False)


def test_preemption_requeues_a_batch_script_job_that_continues_exactly(
    slurm_cluster, uninterrupted: Path, mtft_env, tmp_path: Path
) -> None:
    """A user's batch script (`srun mtft train ... distributed.max_requeues=1`) preempted: SIGTERM
    during training, the job requeues itself and its second start resumes the same run dir."""
    run_dir = tmp_path / "run"
    train = [sys.executable, "-m", "mtft", "train", *REQUEUE, "distributed.max_requeues=1"]
    script = f"#!/bin/sh\nexec srun {shlex.join([*train, f'hydra.run.dir={run_dir}'])}\n"
    job_id = slurm_cluster.sbatch(
        script, "--ntasks=1", "--time=5", f"--chdir={ROOT}", f"--output={tmp_path / 'job.out'}", env=mtft_env
    )
    try:
        signal_mid_training(slurm_cluster, job_id, run_dir, "TERM")
        assert_requeued_once_and_same(slurm_cluster, job_id, run_dir, "SIGTERM", uninterrupted)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)


def test_a_refused_launcher_job_ends_at_once_with_exit_2_and_leaves_the_run_alone(
    slurm_cluster, uninterrupted: Path, mtft_env, tmp_path: Path
) -> None:
    """A 2-task job whose run dir another run holds: rank 0 is refused (exit 2) and the job ends
    with it at once (its peer does not wait for it); the other run's files stay as they were."""
    sweep = tmp_path / "sweep"
    shutil.copytree(uninterrupted, sweep / "0")
    before = {p: p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file()}
    args = ["train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug"]
    args += ["distributed.nproc_per_node=2", *REQUEUE, "trainer.resume=auto", f"hydra.sweep.dir={sweep}"]
    with open(sweep / "0" / "run.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "mtft", *args], cwd=ROOT, env={**mtft_env, **slurm_cluster.env},
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        elapsed = time.monotonic() - start
    (job_dir,) = sweep.glob(".submitit/[0-9]*")
    job = slurm_cluster.wait(job_dir.name, timeout=30)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), proc.stderr[-3000:]  # both tasks: 2
    assert proc.returncode == 2 and elapsed < 90, (elapsed, proc.stderr[-3000:])
    assert (
        proc.stderr.splitlines()[-1].startswith("error: SLURM job failed: ")
        and "is in use" in proc.stderr.splitlines()[-1]
    )
    assert {p: p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file()} == before


# mtft with the first checkpoint write from step 3 on held for a few seconds before it is published (and
# a marker file written), so a second signal lands in the middle of it.
STALL_FROM_STEP_3 = """
import pathlib, sys, time
import mtft.engine.checkpoint as checkpoint
from mtft.commands.cli import main
marker, args = pathlib.Path(sys.argv[1]), sys.argv[2:]
fsync = checkpoint._fsync_dir
def stalled(path):
    if path.name.startswith(".tmp-step-") and int(path.name[-8:]) >= 3 and not marker.exists():
        marker.write_text("writing")
        time.sleep(5)
    fsync(path)
checkpoint._fsync_dir = stalled
sys.argv = ["mtft", *args]
sys.exit(main())
"""


def test_a_second_signal_during_the_checkpoint_write_leaves_a_resumable_run(
    slurm_cluster, uninterrupted: Path, mtft_env, tmp_path: Path
) -> None:
    """SIGTERM, then SIGTERM again while a checkpoint is being written: the job ends without
    publishing that checkpoint, and the same script with trainer.resume=auto continues from the one
    before to the uninterrupted run's rows and weights."""
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    args = [
        "train",
        *REQUEUE,
        "trainer.save_interval=2",
        "distributed.max_requeues=1",
        f"hydra.run.dir={run_dir}",
    ]

    def submit(*extra: str) -> str:
        command = [sys.executable, "-c", STALL_FROM_STEP_3, str(marker), *args, *extra]
        script = f"#!/bin/sh\nexec srun {shlex.join(command)}\n"
        options = ["--ntasks=1", "--time=5", f"--chdir={ROOT}", f"--output={tmp_path / 'job.out'}"]
        return slurm_cluster.sbatch(script, *options, env=mtft_env)

    job_id = submit()
    try:
        signal_mid_training(slurm_cluster, job_id, run_dir, "TERM")
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()[-3000:]
            time.sleep(0.05)
        slurm_cluster.run("scancel", "--signal=TERM", job_id)
        job = slurm_cluster.wait(job_id, timeout=120)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    assert job["JobState"] != "COMPLETED" and job["Restarts"] == "0", job
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved and saved[-1] == "step-00000002", saved  # the one being written was never published
    job = slurm_cluster.wait(submit("trainer.resume=auto"), timeout=300)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (tmp_path / "job.out").read_text()[
        -3000:
    ]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert_same_run(run_dir, uninterrupted)
