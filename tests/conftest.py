"""Shared fixtures: one cache (codetasks, tiny model, tokenized data) per test session, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mtft.models.config import TinyModelConfig
from mtft.recipe.config import TrainConfig, conf_dir, register_configs, to_typed

ROOT = Path(__file__).resolve().parent.parent
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
        *args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "mtft", *args],
            cwd=cwd or ROOT,
            env=mtft_env,
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
