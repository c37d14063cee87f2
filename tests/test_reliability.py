"""The NaN guard, early stopping and the catalogue of bad inputs: clear messages, nothing damaged."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtft.balancers.uniform import Uniform
from mtft.core.errors import MtftError
from mtft.data.config import DataConfig, TaskConfig
from mtft.data.mixture import Mixture, build_mixture, tokenize_mixture
from mtft.data.prepared import Data
from mtft.engine.backend import autocast_for
from mtft.engine.config import TrainerConfig
from mtft.engine.loop import Trainer
from mtft.loggers.config import LoggerConfig
from mtft.models.config import ModelConfig
from mtft.models.loading import load_tokenizer
from mtft.models.tiny import train_tokenizer
from mtft.recipe.builders import build_backend, build_batching, build_sampler, build_tracker, build_trainer
from mtft.recipe.config import TrainConfig

from conftest import ROOT, mixture_from_records, read_metrics, tiny_lm

TEXTS = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 3, vocab_size=300)


def small_mixture() -> Mixture:
    ex = [{"prompt": f"# task {i}\n", "response": t} for i, t in enumerate(TEXTS)]
    return mixture_from_records({"a": ex[:30], "b": ex[10:]}, {"a": ex[30:], "b": ex[:10]})


class NaNAt(torch.nn.Module):
    """A model whose training forward passes return NaN logits at the given (1-based) calls."""

    def __init__(self, model: torch.nn.Module, calls: set[int]) -> None:
        super().__init__()
        self.model, self.calls, self.n = model, calls, 0

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        if self.training:
            self.n += 1
            if self.n in self.calls:
                out.logits = out.logits * float("nan")
        return out


def make_trainer(tokenizer, run_dir: Path, nan_calls: set[int], **cfg) -> tuple[Trainer, torch.nn.Module]:
    model = tiny_lm("llama", len(tokenizer), num_hidden_layers=1)
    data = Data(tokenize_mixture(small_mixture(), tokenizer, 64), tokenizer, model_path="")
    train_cfg = TrainConfig(
        trainer=TrainerConfig(
            batch_size=4, eval_batches=1, eval_batch_size=8, warmup_steps=0, save_interval=None, **cfg
        ),
        data=DataConfig(source="files"),
        logger=LoggerConfig(progress=False),
    )
    balancer = Uniform(data.tasks)
    backend = build_backend(train_cfg, NaNAt(model, nan_calls), torch.device("cpu"))
    batching = build_batching(train_cfg, tokenizer.pad_token_id, model)
    sampler = build_sampler(train_cfg, batching, data.mixture.train_task_ids)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = build_tracker(train_cfg, run_dir, data.tasks)
    return build_trainer(train_cfg, backend, data, batching, sampler, balancer, tracker, run_dir), model


def test_nonfinite_loss_skips_the_update_and_is_logged(tokenizer, tmp_path):
    trainer, model = make_trainer(tokenizer, tmp_path, nan_calls={3}, max_steps=5, eval_interval=5)
    result = trainer.fit()
    trainer.tracker.close()
    assert result.skipped_steps == 1 and result.steps == 5
    rows = {(r["step"], r["task"]): r for r in read_metrics(tmp_path) if r["split"] == "train"}
    assert rows[(3, "all")]["skipped"] is True and rows[(3, "all")]["loss"] is None
    assert all(rows[(s, "all")].get("skipped") is None for s in (1, 2, 4, 5))
    assert all(p.isfinite().all() for p in model.parameters())


def test_too_many_nonfinite_steps_stop_with_a_message(tokenizer, tmp_path):
    trainer, _ = make_trainer(
        tokenizer, tmp_path, nan_calls={2, 3, 4}, max_steps=6, eval_interval=6, max_nonfinite_steps=2
    )
    with pytest.raises(MtftError, match=r"non-finite loss of task\(s\) a, b at step 4, 3 steps in a row"):
        trainer.fit()
    trainer.tracker.close()
    assert [r["step"] for r in read_metrics(tmp_path) if r["task"] == "all" and r["split"] == "train"] == [
        1,
        2,
        3,
        4,
    ]


def test_skipped_update_leaves_weights_untouched(tokenizer, tmp_path):
    """A run with a NaN at step 2 ends where a run that never saw batch 2's update would: step 2 changes nothing."""
    a, model_a = make_trainer(tokenizer, tmp_path / "a", nan_calls={2}, max_steps=2, eval_interval=2)
    a.fit()
    b, model_b = make_trainer(tokenizer, tmp_path / "b", nan_calls=set(), max_steps=1, eval_interval=1)
    b.fit()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_micro_batches_read_nothing_back_to_the_host(tokenizer, tmp_path, monkeypatch, grad_accum):
    """The loop's own host reads of tensors (item, tolist, bool, float, int) happen once per optimizer
    step, whatever the accumulation: on a GPU each one would stall the launch queue."""
    trainer, _ = make_trainer(tokenizer, tmp_path, nan_calls=set(), max_steps=1, grad_accum=grad_accum)
    reads, counting = [], [False]

    def counting_reads(name: str):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if counting[0]:
                reads.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting_reads(name))
    model_forward = trainer.model.forward

    def forward(**kwargs):  # the model's own (transformers') code is not the loop's
        counting[0] = False
        try:
            return model_forward(**kwargs)
        finally:
            counting[0] = True

    def batches():  # nor is the data pipeline's, which reads CPU tensors in its own processes
        while True:
            counting[0] = False
            batch = next(trainer.batches)
            counting[0] = True
            yield batch

    monkeypatch.setattr(trainer.model, "forward", forward)
    stats = trainer._accumulate(batches())
    counting[0] = False
    assert reads == ["tolist"]
    assert stats.tokens > 0 and math.isfinite(stats.loss) and not stats.bad_tasks


@pytest.mark.parametrize("nan_call", [1, 2])
def test_a_nonfinite_micro_batch_skips_the_accumulated_update(tokenizer, tmp_path, nan_call):
    trainer, model = make_trainer(tokenizer, tmp_path, nan_calls={nan_call}, max_steps=2, grad_accum=2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = trainer._accumulate(trainer.batches)
    assert stats.bad_tasks and trainer.backend.step(skip=bool(stats.bad_tasks))[0] is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_early_stopping_on_mean_validation_loss(tokenizer, tmp_path):
    trainer, _ = make_trainer(
        tokenizer,
        tmp_path,
        nan_calls=set(),
        max_steps=20,
        eval_interval=2,
        lr=1e-12,
        early_stopping_patience=2,
        early_stopping_min_delta=1e-4,
    )
    result = trainer.fit()
    assert result.stopped_early and result.steps == 4  # lr ~ 0: no evaluation after step 0 improves


def test_bf16_where_unsupported_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(MtftError, match="does not support bfloat16"):
        autocast_for("bf16", torch.device("cuda"))
    with pytest.raises(MtftError, match=r"trainer.precision must be one of \[fp32, bf16\], got 'fp16x'"):
        TrainerConfig(precision="fp16x")


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer, tmp_path, caplog):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO):
        loaded = load_tokenizer(str(tmp_path), ModelConfig())
    assert loaded.pad_token_id == loaded.eos_token_id
    assert "no pad token: using eos" in caplog.text


def test_too_long_examples_truncate_or_error(tokenizer):
    long = mixture_from_records(
        {"a": [{"prompt": "x " * 50, "response": "y " * 50}]}, {"a": [{"prompt": "p", "response": "r"}]}
    )
    data = tokenize_mixture(long, tokenizer, 32)
    assert data.truncated == [1] and len(data.train[0]["input_ids"]) == 32
    with pytest.raises(MtftError, match=r"longer than data.max_length=32 tokens \(a: 1\)"):
        tokenize_mixture(long, tokenizer, 32, truncation="error")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "", "response": "r"}, r"message 1 \(user\): empty content"),
        ({"prompt": "p", "response": "  "}, r"message 2 \(assistant\): empty content"),
        ({"text": ""}, "empty text"),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            "record has no 'prompt' field; this file's format is prompt_response",
        ),
        (
            {"prompt": "p", "response": "r", "task": "other"},
            "record is for task 'other' but this file belongs to task 'qa'",
        ),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "ok"}) + "\n" + json.dumps(record) + "\n")
    cfg = DataConfig(source="files", tasks={"qa": TaskConfig(train=[str(path)], validation=[str(path)])})
    with pytest.raises(MtftError, match=rf"qa\.jsonl:2: {message}"):
        build_mixture(cfg, tmp_path)


def test_duplicated_task_names_are_refused(run_mtft, tmp_path):
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "dup.yaml").write_text(
        "source: jsonl\ntasks:\n  qa:\n    train: [a.jsonl]\n  qa:\n    train: [b.jsonl]\n"
    )
    proc = run_mtft("train", "--config-dir", str(tmp_path / "conf"), "data=dup", check=False)
    assert proc.returncode != 0 and "duplicate key" in (proc.stderr + proc.stdout).lower()


@pytest.mark.slow
def test_bad_input_on_resume_damages_nothing(run_mtft, tmp_path):
    """A run that fails on bad input while resuming leaves its checkpoints and metrics exactly as they were."""
    run_dir = tmp_path / "run"
    args = [
        "trainer.max_steps=2",
        "trainer.save_interval=1",
        "trainer.eval_interval=2",
        "trainer.eval_batches=1",
        "trainer.eval_batch_size=8",
        "trainer.batch_size=4",
        f"hydra.run.dir={run_dir}",
    ]
    run_mtft("train", *args)
    files = {
        p: p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }
    for bad in (
        ["trainer.max_steps=4", "data.max_length=100000"],
        ["trainer.max_steps=4", "data.truncation=error"],
    ):
        proc = run_mtft("train", *args, *bad, "trainer.resume=auto", check=False)
        assert proc.returncode == 2, proc.stderr
        assert {p: p.read_bytes() for p in files} == files


@pytest.mark.slow
def test_secrets_never_reach_the_run_dir(mtft_env, tmp_path):
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secretTOKENvalue42"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtft",
            "train",
            "trainer.max_steps=1",
            "trainer.eval_interval=1",
            "trainer.eval_batches=1",
            "trainer.eval_batch_size=8",
            "trainer.batch_size=4",
            f"hydra.run.dir={run_dir}",
        ],
        env={**mtft_env, **secrets},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for path in [p for p in run_dir.rglob("*") if p.is_file()]:
        content = path.read_bytes()
        assert not any(v.encode() in content for v in secrets.values()), path
    assert not any(v in proc.stdout + proc.stderr for v in secrets.values())


@pytest.mark.slow
def test_nonfinite_guard_through_the_cli_with_the_console_sink(run_mtft, tmp_path):
    """The user's path: the real command with its default sinks (metrics.jsonl and the console, off a
    terminal here). An absurd learning rate makes every update after the first non-finite: each is
    skipped with a warning and a logged row, and the run stops after `max_nonfinite_steps` with exit 2."""
    run_dir = tmp_path / "run"
    proc = run_mtft(
        "train",
        "trainer.lr=1e30",
        "trainer.max_grad_norm=null",
        "trainer.warmup_steps=0",
        "trainer.scheduler=constant",
        "trainer.max_steps=12",
        "trainer.max_nonfinite_steps=2",
        "trainer.batch_size=8",
        "trainer.eval_batches=1",
        "trainer.eval_batch_size=8",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("update skipped") == 3
    assert (
        "error: non-finite gradient at step 4, 3 steps in a row (trainer.max_nonfinite_steps=2)"
        in proc.stderr
    )
    skipped = [r for r in read_metrics(run_dir) if r["task"] == "all" and r.get("skipped")]
    assert [r["step"] for r in skipped] == [2, 3, 4] and all(r["loss"] is None for r in skipped)


# --- a full disk and a read-only file system (small tmpfs mounts; they need root) -------------------

SHORT_RUN = [
    "trainer.max_steps=4",
    "trainer.save_interval=2",
    "trainer.eval_interval=2",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=8",
    "trainer.batch_size=4",
]


@pytest.fixture
def small_fs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs of that size; unmounted after the test."""
    mounted = []

    def mount(size: str, *options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = ",".join([f"size={size}", *options])
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
        ).returncode:
            pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.slow
def test_a_full_disk_says_so_in_one_line_and_the_run_resumes(run_mtft, small_fs):
    """The step-2 checkpoint does not fit in 3 MB: exit 74 naming the file; with room made, the
    same command plus trainer.resume=auto trains to the end."""
    run_dir = small_fs("3m") / "run"
    proc = run_mtft("train", *SHORT_RUN, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 74, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: No space left on device: {run_dir}/checkpoints/.tmp-step-00000002/")
    assert "Traceback" not in proc.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(run_dir.parent)], check=True)
    run_mtft("train", *SHORT_RUN, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_read_only_file_system_says_so_in_one_line(run_mtft, small_fs):
    fs = small_fs("1m", "ro")
    proc = run_mtft("train", *SHORT_RUN, f"hydra.run.dir={fs}/run", check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: cannot create the run dir: Read-only file system: {fs}/run\n"
