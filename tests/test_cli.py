"""The `mtft` command as a user runs it: help, config composition and the clear errors (those of
bad overrides: test_config.py and test_bad_values.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_mtft_help_lists_commands(run_mtft):
    out = run_mtft("--help").stdout
    assert "train" in out and "usage: mtft" in out


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(mtft_env, args):
    """`mtft --help | head -1`: the reader is gone before mtft writes (its end of the pipe is closed
    here first, so the outcome does not depend on timing); no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mtft", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            env=mtft_env,
            text=True,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_unknown_command(run_mtft):
    proc = run_mtft("trian", check=False)
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_train_help_lists_groups_and_options(run_mtft):
    out = run_mtft("train", "--help").stdout
    for line in (
        "balancer: coba, coba_reference, coba_tiny, famo, gradnorm, uniform",
        "data: codetasks, codetasks_scaled, codetasks_skewed, files",
        "model: codellama_13b, codellama_13b_instruct, deepseek_coder_6_7b, deepseek_coder_6_7b_instruct, hf,",
        "deepspeed: file, none, zero1, zero2, zero3, zero3_offload",
        "peft: lora, none, qlora",
    ):
        assert line in out


def test_cfg_job_prints_composed_config(run_mtft):
    out = run_mtft("train", "--cfg", "job", "trainer.max_steps=7", "seed=3").stdout
    assert "max_steps: 7" in out and "seed: 3" in out and "_target_: mtft.balancers.uniform.Uniform" in out


def jsonl_args(train: Path, val: Path | None = None) -> list[str]:
    args = ["data=files", f"+data.tasks.qa.train=[{train}]"]
    if val is not None:
        args.append(f"+data.tasks.qa.validation=[{val}]")
    return args


@pytest.mark.parametrize(
    "lines, expect",
    [
        (None, "data.tasks.qa.train: no such file or directory: {train}"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": oops}'], "{train}:2: malformed JSON"),
        ([], "{train}: no records (the file is empty)"),
    ],
)
def test_data_errors_are_clear(run_mtft, tmp_path, lines, expect):
    train = tmp_path / "qa.jsonl"
    val = tmp_path / "qa_val.jsonl"
    val.write_text('{"prompt": "a", "response": "b"}\n')
    if lines is not None:
        train.write_text("".join(line + "\n" for line in lines))
    proc = run_mtft("train", *jsonl_args(train, val), f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert expect.format(train=train) in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_empty_validation_set_error(run_mtft, tmp_path):
    train = tmp_path / "qa.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    val = tmp_path / "qa_val.jsonl"
    val.write_text("\n")
    proc = run_mtft("train", *jsonl_args(train, val), f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and f"{val}: no records (the file is empty)" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_jsonl_tasks_train_end_to_end(run_mtft, tmp_path):
    for name, n in (("sql", 120), ("chat", 60)):
        rows = [{"prompt": f"{name} question {i}?", "response": f" answer {i % 7}"} for i in range(n)]
        rows += [{"text": f"{name} free text number {i}"} for i in range(n // 4)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    run_mtft(
        "train",
        "data=files",
        f"+data.tasks.sql.train=[{tmp_path / 'sql.jsonl'}]",
        f"+data.tasks.chat.train=[{tmp_path / 'chat.jsonl'}]",
        "+data.tasks.chat.val_fraction=0.2",
        "model.build.vocab_size=400",
        "trainer.max_steps=6",
        "trainer.eval_interval=3",
        "trainer.batch_size=4",
        f"hydra.run.dir={run_dir}",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tasks"] == ["sql", "chat"]
    assert set(summary["final_val_loss"]) == {"sql", "chat"}


def test_existing_run_dir_is_never_overwritten(run_mtft, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    proc = run_mtft("train", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_plain_run_never_wakes_deepspeed(run_mtft, tmp_path):
    """`deepspeed=none` (the default): building the embedded model (a size no other test builds) and
    saving the final model must not import DeepSpeed, whose accelerator detection would print."""
    proc = run_mtft(
        "train", "model.build.hidden_size=64", "model.build.intermediate_size=128", "trainer.max_steps=1",
        "trainer.eval_interval=1", "trainer.eval_batches=1", "trainer.eval_batch_size=8",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "accelerator" not in proc.stderr.lower(), proc.stderr
