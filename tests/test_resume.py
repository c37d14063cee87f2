"""Killed, preempted and resumed runs end exactly where an uninterrupted run ends (bitwise on CPU)."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics

ARGS = [
    "trainer.max_steps=6",
    "trainer.save_interval=2",
    "trainer.eval_interval=2",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=8",
    "trainer.batch_size=4",
    "trainer.keep_checkpoints=5",
]
BALANCERS = {
    "uniform": ["balancer=uniform"],
    "coba": ["balancer=coba", "balancer.warmup_steps=2", "balancer.history_length=3"],
}
TIMING = {"tokens_per_s"}

# Runs mtft with checkpoint saving of step 4 stalled after its files are written but before the
# rename that publishes it, so the test can SIGKILL the process in the middle of a checkpoint write.
STALL_IN_SAVE = """
import pathlib, sys, time
import mtft.engine.checkpoint as checkpoint
from mtft.commands.cli import main
marker, args = pathlib.Path(sys.argv[1]), sys.argv[2:]
fsync = checkpoint._fsync_dir
def stalled(path):
    if path.name.startswith(".tmp-step-00000004"):
        marker.write_text("writing")
        time.sleep(600)
    fsync(path)
checkpoint._fsync_dir = stalled
sys.argv = ["mtft", *args]
sys.exit(main())
"""

# Runs mtft with the final model save stalled for a few seconds once it has begun, so a signal
# arrives in the middle of it.
STALL_IN_FINAL_SAVE = """
import pathlib, sys, time
import mtft.engine.backend as backend
from mtft.commands.cli import main
marker, args = pathlib.Path(sys.argv[1]), sys.argv[2:]
save = backend.save_pretrained
def stalled(module, directory):
    marker.write_text("saving")
    time.sleep(3)
    save(module, directory)
backend.save_pretrained = stalled
sys.argv = ["mtft", *args]
sys.exit(main())
"""


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(run_dir)]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert comparable(run_dir) == comparable(reference)
    ours, theirs = (
        load_file(run_dir / "model" / "model.safetensors"),
        load_file(reference / "model" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def spawn(env: dict, *args: str, code: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "mtft", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended early ({proc.returncode}): {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def trained_to(run_dir: Path, step: int):
    def reached() -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and f'"step": {step}, "split": "train", "task": "all"' in path.read_text()

    return reached


@pytest.fixture(scope="module")
def reference(run_mtft, tmp_path_factory):
    """One uninterrupted run per balancer, the ground truth every interrupted run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    for name, args in BALANCERS.items():
        run_mtft("train", *args, *ARGS, f"hydra.run.dir={root / name}")
    return root


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_bitwise_identical(run_mtft, mtft_env, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn(mtft_env, "train", *BALANCERS["uniform"], *ARGS, f"hydra.run.dir={run_dir}")
    wait_for(trained_to(run_dir, 3), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    run_mtft("train", *BALANCERS["uniform"], *ARGS, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert_same_run(run_dir, reference / "uniform")


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(run_mtft, mtft_env, reference, tmp_path):
    """A run held inside its step-4 checkpoint write (its files stand still) holds its dir: a second
    run, resuming or not, is refused with exit 2 at once and writes nothing there. Killed in that
    write, the run resumes from step 2 and ends exactly where the uninterrupted run ends."""
    run_dir, marker = tmp_path / "run", tmp_path / "in-save"
    args = ["train", *BALANCERS["uniform"], *ARGS, f"hydra.run.dir={run_dir}"]
    proc = spawn(mtft_env, str(marker), *args, code=STALL_IN_SAVE)
    try:
        wait_for(marker.exists, proc)
        before = snapshot(run_dir)
        assert run_dir / ".hydra" / "config.yaml" in before and run_dir / "metrics.jsonl" in before
        for extra in (["trainer.resume=auto"], ["trainer.lr=1e-4"]):
            second = run_mtft(*args, "trainer.max_steps=8", *extra, check=False)
            assert second.returncode == 2, second.stderr
            assert f"error: {run_dir} is in use by another run" in second.stderr
            assert "Traceback" not in second.stderr
            assert snapshot(run_dir) == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    assert any(p.name.startswith(".tmp-step-00000004") for p in checkpoints.iterdir())  # the torn write
    run_mtft(*args, "trainer.resume=auto")
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
    assert_same_run(run_dir, reference / "uniform")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_resumable(run_mtft, mtft_env, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *BALANCERS["coba"], *ARGS, "trainer.save_interval=100", f"hydra.run.dir={run_dir}"]
    proc = spawn(mtft_env, *args)
    wait_for(trained_to(run_dir, 3), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGTERM received" in err and "trainer.resume=auto" in err
    saved = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-")
    run_mtft(*args, "trainer.resume=auto")
    assert_same_run(run_dir, reference / "coba")


@pytest.mark.slow
def test_sigterm_during_the_final_save_finishes_it_and_exits_resumable(
    run_mtft, mtft_env, reference, tmp_path
):
    run_dir, marker = tmp_path / "run", tmp_path / "in-final-save"
    args = ["train", *BALANCERS["uniform"], *ARGS, f"hydra.run.dir={run_dir}"]
    proc = spawn(mtft_env, str(marker), *args, code=STALL_IN_FINAL_SAVE)
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGTERM received: finishing the final save, then stopping" in err
    assert "stopped at step 6" in err and "trainer.resume=auto" in err
    assert_same_run(run_dir, reference / "uniform")  # the save was finished, not torn
    run_mtft(*args, "trainer.resume=auto")  # nothing left to train: saves again and ends
    assert_same_run(run_dir, reference / "uniform")


@pytest.mark.slow
def test_resumed_tensorboard_run_and_samples_hold_each_step_once(run_mtft, tmp_path):
    """A TensorBoard run with in-training samples, cut back to its step-2 checkpoint and resumed:
    every scalar series has each step once, with the values of the uninterrupted run (the replayed
    steps 3-6 are purged), and samples.jsonl is the uninterrupted run's, byte for byte."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    args = ["train", *BALANCERS["uniform"], *ARGS, "logger=tensorboard", "trainer.sample_interval=2"]
    args.append("eval.sample_prompts=1")
    full = tmp_path / "full"
    run_mtft(*args, f"hydra.run.dir={full}")
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-0000000[46]", "model", "summary.json"))
    run_mtft(*args, "trainer.resume=auto", f"hydra.run.dir={resumed}")
    ours, theirs = scalars(resumed), scalars(full)
    assert ours.keys() == theirs.keys() and "train/loss" in ours
    for tag, series in ours.items():
        steps = [step for step, _ in series]
        assert steps == sorted(set(steps)), tag
        if tag != "train/tokens_per_s":  # timing differs between runs
            assert series == theirs[tag], tag
    samples = (resumed / "samples.jsonl").read_text()
    assert samples == (full / "samples.jsonl").read_text()
    assert [json.loads(line)["step"] for line in samples.splitlines()][::4] == [2, 4, 6]


def test_resume_path_that_is_not_a_checkpoint(run_mtft, tmp_path):
    proc = run_mtft("train", f"trainer.resume={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "no checkpoint there" in proc.stderr


def snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_rerun_into_a_finished_run_dir_changes_nothing(run_mtft, reference):
    run_dir = reference / "uniform"
    before = snapshot(run_dir)
    proc = run_mtft(
        "train", *BALANCERS["uniform"], *ARGS, "trainer.lr=1e-4", f"hydra.run.dir={run_dir}", check=False
    )
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr
    assert snapshot(run_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("trainer.lr=1e-4", "trainer.lr (0.002 -> 0.0001)"),
        ("trainer.batch_size=2", "trainer.batch_size (4 -> 2)"),
        ("seed=1", "seed (0 -> 1)"),
        ("trainer.max_steps=4", "trainer.max_steps=4 is below step 6 of the checkpoint"),
    ],
)
def test_resume_refuses_what_it_cannot_honour(run_mtft, reference, tmp_path, change, named):
    """A resumed run that would silently train something else is refused in one line, exit 2, and
    the run dir (its .hydra/config.yaml included) is left as it was."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "uniform", run_dir)
    before = snapshot(run_dir)
    args = ["train", *BALANCERS["uniform"], *ARGS, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    proc = run_mtft(*args, change, check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert named in line and "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_resume_applies_a_longer_run(run_mtft, reference, tmp_path):
    """max_steps upward (with other cadence settings) is applied, and .hydra/config.yaml says so; an
    empty meta.json in an older checkpoint does not stop the later saves."""
    import yaml

    run_dir = tmp_path / "run"
    shutil.copytree(reference / "uniform", run_dir)
    (run_dir / "checkpoints" / "step-00000002" / "meta.json").write_text("")
    args = [*BALANCERS["uniform"], *ARGS, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    run_mtft("train", *args, "trainer.max_steps=8", "trainer.log_interval=2")
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train" and r["task"] == "all"]
    assert steps == [1, 2, 3, 4, 5, 6, 8]
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["trainer"]["max_steps"] == 8
    assert json.loads((run_dir / "checkpoints" / "step-00000008" / "meta.json").read_text())["step"] == 8


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(run_mtft, reference, tmp_path):
    """One flipped byte in the newest state.pt: the run resumes from the previous checkpoint with a
    warning, and still ends exactly where the uninterrupted run ends."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "uniform", run_dir)
    state = run_dir / "checkpoints" / "step-00000006" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(data)
    proc = run_mtft("train", *BALANCERS["uniform"], *ARGS, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert "step-00000006 is damaged (state.pt does not match its checksum)" in proc.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000004'} at step 4" in proc.stderr
    assert_same_run(run_dir, reference / "uniform")


def test_metrics_shorter_than_the_checkpoint_says_is_an_error(tmp_path):
    from mtft.core.errors import MtftError
    from mtft.loggers.jsonl import JsonlSink

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    with pytest.raises(
        MtftError, match=r"shorter \(12 bytes\) than the checkpoint's record of it \(40 bytes\)"
    ):
        JsonlSink(path).load_state_dict({"offset": 40})
    assert path.read_bytes() == b'{"step": 1}\n'


@pytest.mark.slow
def test_killing_the_parent_of_workers_kills_the_workers(mtft_env, tmp_path):
    """kill -9 of the `mtft train` that started 2 workers: neither keeps training."""
    import psutil

    run_dir = tmp_path / "run"
    args = [*ARGS, "trainer.max_steps=1000", "distributed.nproc_per_node=2", f"hydra.run.dir={run_dir}"]
    proc = spawn(mtft_env, "train", *args)
    wait_for(trained_to(run_dir, 1), proc)
    workers = [
        p for p in psutil.Process(proc.pid).children() if "mtft.commands.worker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_its_own_exit_code(mtft_env, tmp_path):
    """kill -9 of one worker (what the out-of-memory killer does): the job exits 128 + 9 and names the
    rank, distinct from bad input (2) and a resumable stop (75)."""
    import psutil

    run_dir = tmp_path / "run"
    args = [*ARGS, "trainer.max_steps=1000", "distributed.nproc_per_node=2", f"hydra.run.dir={run_dir}"]
    proc = spawn(mtft_env, "train", *args)
    wait_for(trained_to(run_dir, 3), proc)
    (worker,) = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "mtft.commands.worker" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"
    ]
    worker.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGKILL, err
    assert "error: worker rank 1 was killed by SIGKILL (out of memory?" in err
    assert "step-00000002 (trainer.resume=auto)" in err
