"""Two ranks on the CPU (gloo): DDP, DeepSpeed ZeRO-2/3, torchrun, two node agents and multirun sweeps
of multi-process jobs, all checked against one process with the same global batch."""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtft.core.errors import MtftError
from mtft.engine.config import DeepSpeedConfig, TrainerConfig
from mtft.engine.deepspeed_json import deepspeed_json

from conftest import read_metrics, read_untimed_metrics, read_wandb_records

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [
    "balancer=coba",
    "balancer.warmup_steps=2",
    "balancer.history_length=3",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_interval=3",
    "trainer.save_interval=3",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=8",
]
PER_RANK = [*COMMON, "trainer.batch_size=8", "logger.all_ranks=true"]  # 2 ranks x 8 = the global 16
# The packed rows' stream does not depend on the world size: 2 ranks x 4 rows train on the same rows
# as 1 x 8, so the curves (CoBa's packed probe included) match the one-process run's.
PACKED = [*COMMON, "data.packing=true"]
PACKED_PER_RANK = [*PACKED, "trainer.batch_size=4", "logger.all_ranks=true"]
ZERO2 = [*PACKED_PER_RANK, "deepspeed=zero2", "distributed.nproc_per_node=2"]
# Same global batch, different summation order: losses agree to float32 rounding, far inside this.
REL_TOL = 1e-4
# CoBa's weights are a softmax over slopes of short loss histories, which amplifies those rounding
# differences (about 1.3e-4 relative at step 6 with the sampler's current streams).
WEIGHT_REL_TOL = 1e-3
# Every launcher ends in one join with the configured backend and collective timeout (not the defaults).
BACKEND = ["distributed.backend=gloo", "distributed.timeout_min=7"]
JOINED = "joined the process group as rank 0 of 2: backend gloo, timeout 7 min"


def train_rows(run_dir: Path, name: str = "metrics.jsonl") -> dict[tuple[int, str], dict]:
    rows = (json.loads(line) for line in (run_dir / name).read_text().splitlines())
    return {(r["step"], r["task"]): r for r in rows if r["split"] == "train"}


def assert_ranks_agree_and_match(run_dir: Path, single: Path) -> None:
    """Rank 1 applied rank 0's weights at every step; the curves match the one-process run."""
    rank0, rank1 = train_rows(run_dir), train_rows(run_dir, "metrics.rank1.jsonl")
    weights0 = {k: r["weight"] for k, r in rank0.items() if "weight" in r}
    assert len(weights0) == 4 * STEPS
    assert weights0 == {k: r["weight"] for k, r in rank1.items() if "weight" in r}
    reference = train_rows(single)
    assert rank0.keys() == reference.keys()
    for key, row in reference.items():
        if row["loss"] is not None:
            assert math.isclose(rank0[key]["loss"], row["loss"], rel_tol=REL_TOL), key
        if "weight" in row:
            assert math.isclose(rank0[key]["weight"], row["weight"], rel_tol=WEIGHT_REL_TOL), key
    val = {(r["step"], r["task"]): r["loss"] for r in read_metrics(run_dir) if r["split"] == "val"}
    val_ref = {(r["step"], r["task"]): r["loss"] for r in read_metrics(single) if r["split"] == "val"}
    assert val.keys() == val_ref.keys()
    assert all(math.isclose(val[k], val_ref[k], rel_tol=REL_TOL) for k in val)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS


@pytest.fixture(scope="module")
def single(run_mtft, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dist") / "single"
    run_mtft("train", *COMMON, "trainer.batch_size=16", f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def single_packed(run_mtft, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dist") / "single_packed"
    run_mtft("train", *PACKED, "trainer.batch_size=8", f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def zero2(run_mtft, tmp_path_factory) -> Path:
    """DeepSpeed ZeRO-2 on two ranks, on packed rows."""
    run_dir = tmp_path_factory.mktemp("dist") / "zero2"
    run_mtft("train", *ZERO2, f"hydra.run.dir={run_dir}")
    return run_dir


def test_deepspeed_zero2_matches_one_process(zero2: Path, single_packed: Path) -> None:
    assert_ranks_agree_and_match(zero2, single_packed)
    assert (zero2 / "checkpoints" / "step-00000006" / "deepspeed").is_dir()  # DeepSpeed's own format
    assert (zero2 / "model" / "model.safetensors").is_file()


def test_deepspeed_resume_continues_exactly(zero2: Path, run_mtft, mtft_env, tmp_path: Path) -> None:
    """A copy of the ZeRO-2 run cut back to its step-3 checkpoint, resumed: the same rows and weights."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(zero2, run_dir, ignore=shutil.ignore_patterns("step-00000006", "model", "summary.json"))
    run_mtft("train", *ZERO2, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert read_untimed_metrics(run_dir) == read_untimed_metrics(zero2)
    ours, theirs = (
        load_file(run_dir / "model" / "model.safetensors"),
        load_file(zero2 / "model" / "model.safetensors"),
    )
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_packing_on_two_ddp_ranks_matches_one_process(single_packed: Path, run_mtft, tmp_path) -> None:
    """DDP on packed rows: the ranks agree, and match the one-process run (see PACKED)."""
    run_dir = tmp_path / "packed"
    run_mtft("train", *PACKED_PER_RANK, "distributed.nproc_per_node=2", f"hydra.run.dir={run_dir}")
    assert_ranks_agree_and_match(run_dir, single_packed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_under_torchrun_shares_one_run_dir(single: Path, mtft_env, tmp_path: Path) -> None:
    """Every rank runs Hydra itself, with Hydra's default timestamped run dir: one dir for the job.
    Ranks meet before Hydra (for the run clock) but create the group after it, from the config."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "mtft", "train", *PER_RANK, *BACKEND, "deepspeed=zero3",
        ],
        cwd=tmp_path, env=mtft_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (day,) = (tmp_path / "outputs").iterdir()
    (run_dir,) = day.iterdir()
    assert_ranks_agree_and_match(run_dir, single)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert JOINED in (run_dir / "train.log").read_text()
    # ZeRO-3 shards were gathered into one ordinary model directory.
    assert load_file(run_dir / "model" / "model.safetensors")["model.embed_tokens.weight"].shape[0] > 0


def test_two_node_agents_without_slurm_match_one_node(single: Path, mtft_env, tmp_path: Path) -> None:
    """Two `mtft train distributed.nnodes=2` agents, as on two nodes with a shared file system (the
    same run dir), meet at one rendezvous endpoint: one 2-rank job, equal to the one-process run."""
    endpoint = f"127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "run"
    args = [*PER_RANK, *BACKEND, "distributed.nnodes=2", f"distributed.rdzv_endpoint={endpoint}"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mtft", "train", *args, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
            env=mtft_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert_ranks_agree_and_match(run_dir, single)


def test_multirun_of_multiprocess_jobs(run_mtft, tmp_path: Path) -> None:
    """Each sweep job is its own 2-process group; one dir per job and no stray timestamped dirs;
    the W&B runs, started by the workers, are named and grouped as a one-process sweep's."""
    sweep = tmp_path / "sweep"
    run_mtft(
        "train", "-m", "balancer=uniform,coba", "distributed.nproc_per_node=2", "trainer.max_steps=3",
        "trainer.eval_interval=3", "trainer.eval_batches=1", "trainer.eval_batch_size=8", "trainer.batch_size=4",
        "trainer.save_model=false", "logger=wandb", "logger.wandb.mode=offline", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )  # fmt: skip
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, balancer in zip(jobs, ["uniform", "coba"], strict=True):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["balancer"] == balancer and summary["steps"] == 3
        (wandb_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        (run,) = [r.run for r in read_wandb_records(wandb_file) if r.WhichOneof("record_type") == "run"]
        assert run.run_group == str(sweep) and run.display_name == f"{balancer} seed=0"
        assert list(run.tags) == [f"balancer={balancer}", "data=codetasks"]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_gradnorm_with_deepspeed_is_refused(run_mtft, tmp_path: Path) -> None:
    proc = run_mtft(
        "train", "balancer=gradnorm", "deepspeed=zero3", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "which DeepSpeed's ZeRO gradient hooks do not allow" in proc.stderr


def test_deepspeed_json_takes_the_trainer_values(tmp_path: Path) -> None:
    trainer = TrainerConfig(batch_size=8, grad_accum=4, max_grad_norm=0.5, precision="bf16")
    ds = deepspeed_json(DeepSpeedConfig(stage=3, offload_optimizer=True, offload_param=True), trainer)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["stage3_gather_16bit_weights_on_model_save"]

    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}))
    ds = deepspeed_json(DeepSpeedConfig(config_file=str(own), extra={"zero_optimization": {"a": 1}}), trainer)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["zero_optimization"] == {"stage": 1, "a": 1}

    own.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(MtftError, match=r"gradient_accumulation_steps=2 but the trainer config says 4"):
        deepspeed_json(DeepSpeedConfig(config_file=str(own)), trainer)
    with pytest.raises(MtftError, match="no such file"):
        deepspeed_json(DeepSpeedConfig(config_file=str(tmp_path / "missing.json")), trainer)
    with pytest.raises(MtftError, match="offload_param needs deepspeed.stage=3"):
        deepspeed_json(DeepSpeedConfig(stage=2, offload_param=True), trainer)


def test_slurm_launcher_composes(run_mtft) -> None:
    """One task per GPU and the nodes of the job come from `distributed`, so they cannot disagree."""
    proc = run_mtft(
        "train", "hydra/launcher=slurm", "distributed.nproc_per_node=8", "distributed.nnodes=2",
        "--cfg", "all", "--resolve",
    )  # fmt: skip
    launcher = proc.stdout[proc.stdout.index("launcher:") :]
    assert "SlurmLauncher" in launcher and "tasks_per_node: 8" in launcher and "nodes: 2" in launcher
    assert "gpus_per_node: 8" in launcher


def test_lora_gradnorm_under_ddp_resumes_exactly(run_mtft, tmp_path: Path) -> None:
    """DDP + LoRA + GradNorm on mtft's own workers (joined with the configured backend and timeout):
    ranks agree, and a resume from the step-2 checkpoint (adapters only, the frozen base comes from
    the model) ends with the same rows and the same adapter."""
    args = [
        "peft=lora", "balancer=gradnorm", "distributed.nproc_per_node=2", *BACKEND, "trainer.max_steps=4",
        "trainer.eval_interval=2", "trainer.save_interval=2", "trainer.eval_batches=1", "trainer.eval_batch_size=8",
        "trainer.batch_size=4", "logger.all_ranks=true",
    ]  # fmt: skip
    full = tmp_path / "full"
    run_mtft("train", *args, f"hydra.run.dir={full}")
    assert JOINED in (full / "train.log").read_text()
    rank0, rank1 = train_rows(full), train_rows(full, "metrics.rank1.jsonl")
    assert {k: r["weight"] for k, r in rank0.items() if "weight" in r} == {
        k: r["weight"] for k, r in rank1.items() if "weight" in r
    }
    state = torch.load(full / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert state["backend"]["model"] and all("lora_" in name for name in state["backend"]["model"])

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-00000004", "model", "summary.json"))
    run_mtft("train", *args, "trainer.resume=auto", f"hydra.run.dir={resumed}")
    assert read_untimed_metrics(resumed) == read_untimed_metrics(full)
    # Rank 1's own file is cut back to the checkpoint too: the replayed steps appear once.
    lines = [(d / "metrics.rank1.jsonl").read_text().splitlines() for d in (resumed, full)]
    assert (
        len(lines[0]) == len(lines[1]) and train_rows(resumed, "metrics.rank1.jsonl").keys() == rank1.keys()
    )
    ours = load_file(resumed / "model" / "adapter_model.safetensors")
    theirs = load_file(full / "model" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (
            "qwen7b_lora_zero3_coba_slurm",
            ["stage: 3", "name_or_path: Qwen/Qwen2.5-7B-Instruct", "nnodes: 2", "r: 16"],
        ),
        ("single_node_8gpu", ["stage: 2", "name_or_path: Qwen/Qwen2.5-0.5B", "nproc_per_node: 1"]),
    ],
)
def test_scale_out_experiments_compose(run_mtft, tmp_path: Path, recipe: str, expected: list[str]) -> None:
    """The experiments compose offline (nothing downloads until a run starts), from any directory."""
    job = run_mtft("train", f"experiment={recipe}", "--cfg", "job", cwd=tmp_path).stdout
    assert all(line in job for line in expected), job


def test_sigterm_to_a_multiprocess_job_checkpoints_and_exits_resumable(mtft_env, tmp_path: Path) -> None:
    """SLURM preemption of `mtft train distributed.nproc_per_node=2`: the parent passes SIGTERM on,
    the workers save a checkpoint, and the job exits 75."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mtft", "train", "distributed.nproc_per_node=2", "trainer.max_steps=500",
            "trainer.eval_interval=500", "trainer.save_interval=500", "trainer.eval_batches=1",
            "trainer.eval_batch_size=8", "trainer.batch_size=4", f"hydra.run.dir={run_dir}",
        ],
        env=mtft_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"step": 3,' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    step = int(checkpoint.name.removeprefix("step-"))
    assert 3 <= step < 500 and {"rank0.pt", "rank1.pt", "state.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert "trainer.resume=auto" in err


def test_a_bad_backend_is_one_line_under_torchrun_too(mtft_env, tmp_path: Path) -> None:
    """Checked when the config is composed, before any rank joins a group: an error line per rank."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "mtft", "train", "distributed.backend=mpi", f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path, env=mtft_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert (
        "error: distributed.backend: Invalid value 'mpi', expected one of [auto, nccl, gloo]" in proc.stderr
    )
    # torchrun itself reports the failed children with a traceback of its own; the ranks do not.
    assert "ValueError" not in proc.stderr and "process_group.py" not in proc.stderr
