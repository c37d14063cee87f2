"""Shared fixtures: one cache (codetasks, tiny model, tokenized data) per test session, and a CLI runner."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM

from mtft.data.mixture import Mixture, conversations
from mtft.data.sources import fingerprint
from mtft.models.config import TinyModelConfig
from mtft.recipe.config import TrainConfig, conf_dir, register_configs, to_typed

ROOT = Path(__file__).resolve().parent.parent
# The embedded default data's tasks, in their order (conf/data/codetasks.yaml).
CODETASKS = ["code_completion", "docstring_to_code", "code_to_docstring", "function_naming"]
# A Llama small enough to build and train in a second, for tests that need a real model.
SMALL = TinyModelConfig(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
)
# The sizes of the random transformers models that in-process tests build with `tiny_lm`.
TINY_LM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_lm(model_type: str, vocab_size: int, **config) -> torch.nn.Module:
    """A causal LM of a real transformers architecture (`llama`, `qwen2`, ...) with random weights
    (seed 0), built in milliseconds and in eval mode (no dropout: two forwards agree); `config`
    overrides the TINY_LM sizes or sets other fields of the architecture's config."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**TINY_LM, **config})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Isolated from ~/.cache so every CI run exercises the real first-build path once."""
    path = Path(os.environ.get("MTFT_TEST_CACHE") or tmp_path_factory.mktemp("mtft-cache"))
    return path


@pytest.fixture(scope="session")
def mtft_env(cache_dir: Path) -> dict[str, str]:
    """The environment CLI runs get: the session cache, and nothing that could reach the network."""
    return {**os.environ, "MTFT_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="session")
def run_mtft(mtft_env: dict[str, str]):
    """Run the real `mtft` CLI in a subprocess (as a user would) and return the completed process."""

    def run(
        *args: str,
        cwd: Path | None = None,
        check: bool = True,
        timeout: int = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """`env`: variables the child gets on top of the session's (a fake key, a trapped proxy)."""
        proc = subprocess.run(
            [sys.executable, "-m", "mtft", *args],
            cwd=cwd or ROOT,
            env={**mtft_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"mtft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return run


@pytest.fixture(scope="session")
def lora_run(run_mtft, tmp_path_factory) -> tuple[Path, str]:
    """A LoRA run of 4 steps with gradient checkpointing, its adapter saved, and its console output:
    shared by the PEFT and eval tests, which may add files to it (an export, eval results) but never
    change what training wrote."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    proc = run_mtft(
        "train", "peft=lora", "trainer.gradient_checkpointing=true", "trainer.max_steps=4",
        "trainer.eval_interval=4", "trainer.lr=1e-2", "trainer.eval_batches=1", "trainer.eval_batch_size=8",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    return run_dir, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def tiny_sweep(run_mtft, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A real sweep of 4-step runs, uniform and famo x seeds 1 and 2 (job dirs 0-3), two jobs at a
    time on Hydra's joblib launcher, each with samples every 2 steps, an eval at the end (3 examples
    a task) and TensorBoard; and its process. Shared by the report and eval tests, which read it (the
    report writes its report/ dir)."""
    sweep = tmp_path_factory.mktemp("sweep") / "sweep"
    proc = run_mtft(
        "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "balancer=uniform,famo", "seed=1,2",
        "trainer.max_steps=4", "trainer.eval_interval=2", "trainer.eval_batches=1", "trainer.eval_batch_size=16",
        "trainer.batch_size=8", "trainer.save_model=false", "trainer.eval_at_end=true", "eval.max_samples=3",
        "eval.max_new_tokens=12", "trainer.sample_interval=2", "eval.sample_prompts=1", "logger=tensorboard",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    return sweep, proc


def compose_train(overrides: list[str], config_dir: Path | None = None) -> TrainConfig:
    """The config `mtft train <overrides>` would run with, checked against the schema."""
    register_configs()
    with initialize_config_dir(str(config_dir or conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    typed = to_typed(cfg)
    assert isinstance(typed, TrainConfig)
    return typed


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_untimed_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timing column: what two runs of the same training must agree on."""
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in read_metrics(run_dir)]


def read_wandb_records(path: Path) -> list:
    """Decode a .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte chunk headers) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def mixture_from_records(train: dict[str, list[dict]], validation: dict[str, list[dict]]) -> Mixture:
    """A mixture of in-memory records (any format), fingerprinted by content, as files would give."""
    splits = [{t: conversations(records) for t, records in split.items()} for split in (train, validation)]
    fingerprints = {t: fingerprint(list(splits[0][t]["key"]), list(splits[1][t]["key"])) for t in train}
    return Mixture(list(train), splits[0], splits[1], fingerprints)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real SLURM cluster on this host for the session (tests/cluster/slurm.py: munged, slurmctld,
    slurmd n1 and n2, partition debug), stopped at the end; skips, with the reason, without SLURM."""
    import tempfile

    from cluster import slurm

    reason = slurm.skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    if len(str(root)) > slurm.MAX_ROOT_LEN:  # a long --basetemp: UNIX sockets need a short path
        root = Path(tempfile.mkdtemp(prefix="mtft-slurm-"))
    cluster = slurm.start(root)
    yield cluster
    cluster.stop()
