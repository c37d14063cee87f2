"""What every benchmark shares: the composed config, the tokenized codetasks data, fresh copies of the
tiny model, mtft's own Trainer run in-process with a timing sink, and robust statistics.

Everything is built with mtft's own functions (the same code path as `mtft train`), so the benchmarks
measure what a user runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtft.data.collator import TaskCollator
from mtft.data.mixture import TokenizedMixture, build_mixture, tokenize_mixture
from mtft.data.sampler import MixtureSampler, sequence_lengths
from mtft.engine.backend import build_backend
from mtft.engine.loop import Trainer
from mtft.loggers.base import Row, Tracker
from mtft.loggers.jsonl import JsonlSink
from mtft.models.loading import load_model, load_tokenizer, resolve_path
from mtft.recipe.config import TrainConfig, conf_dir, register_configs
from mtft.recipe.finetune import build_balancer

ROOT = Path(__file__).resolve().parent.parent
register_configs()


def compose_config(overrides: Sequence[str] = ()) -> TrainConfig:
    """The typed config `mtft train <overrides>` would run with."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


@dataclass
class Setup:
    """The data and model path of the default run (tiny model + codetasks), built once per process."""

    cfg: TrainConfig
    data: TokenizedMixture
    model_path: str
    pad_token_id: int
    lengths: list[int]

    @classmethod
    def load(cls, overrides: Sequence[str] = ()) -> Setup:
        cfg = compose_config(overrides)
        cache_dir = Path(cfg.cache_dir).expanduser()
        mixture = build_mixture(cfg.data, cache_dir)
        path = resolve_path(cfg.model, cache_dir, mixture.corpus)
        tokenizer = load_tokenizer(path, cfg.model)
        data = tokenize_mixture(
            mixture, tokenizer, cfg.data.max_length, cache_dir, cfg.data.truncation, cfg.model.prompt_format
        )
        return cls(cfg, data, path, tokenizer.pad_token_id, sequence_lengths(data.train))

    def model(self) -> torch.nn.Module:
        """A fresh copy of the model, identical on every call (loaded from the same directory)."""
        torch.manual_seed(self.cfg.seed)
        return load_model(self.model_path, self.cfg.model, self.cfg.peft)

    def sampler(
        self,
        batch_size: int | None = None,
        group_by_length: bool = False,
        task_ids: Sequence[int] | None = None,
    ) -> MixtureSampler:
        """The run's sampler; `task_ids` relabels the same examples (the synthetic T-task splits)."""
        return MixtureSampler(
            self.data.train_task_ids if task_ids is None else task_ids,
            batch_size or self.cfg.trainer.batch_size,
            self.cfg.data.sampling,
            self.cfg.data.temperature,
            seed=self.cfg.seed,
            lengths=self.lengths,
            group_by_length=group_by_length,
            group_batches=self.cfg.data.group_batches,
        )

    def collator(self) -> TaskCollator:
        return TaskCollator(self.pad_token_id)

    def step_tokens(self, steps: int, group_by_length: bool = False) -> list[int]:
        """Non-padding tokens of each of the first `steps` batches (the same batches every side trains on)."""
        it = iter(self.sampler(group_by_length=group_by_length))
        return [sum(self.lengths[i] for i in next(it)) for _ in range(steps)]


class TimingSink:
    """A tracker sink that stamps the time each train step's `all` row arrives (after the step and its
    logging), so mtft is timed on its whole loop: data, forward/backward, balancer, logging."""

    def __init__(self) -> None:
        self.stamps: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def write(self, rows: list[Row]) -> None:
        now = time.perf_counter()
        for row in rows:
            if row["split"] == "train" and row["task"] == "all":
                self.stamps[row["step"]] = now
                self.tokens[row["step"]] = int(row["tokens"])

    def close(self) -> None:
        pass


@dataclass
class Timing:
    """Step-end timestamps of one run; the first `warmup` steps are excluded from every figure."""

    stamps: list[float]  # stamps[k] = end of step k+1
    tokens: list[int]  # non-padding tokens of each step
    warmup: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.stamps[-1] - self.stamps[self.warmup - 1]

    @property
    def measured_tokens(self) -> int:
        return sum(self.tokens[self.warmup : len(self.stamps)])

    @property
    def tokens_per_s(self) -> float:
        return self.measured_tokens / self.seconds

    @property
    def step_times(self) -> list[float]:
        s = self.stamps
        return [s[k] - s[k - 1] for k in range(self.warmup, len(s))]

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times)


def run_mtft(
    setup: Setup,
    steps: int,
    warmup: int,
    data: TokenizedMixture | None = None,
    balancer_overrides: Sequence[str] = (),
    group_by_length: bool = False,
    batch_size: int | None = None,
    grad_accum: int = 1,
) -> Timing:
    """Train with mtft's own Trainer (metrics.jsonl written as in a real run) and time every step."""
    data = data or setup.data
    cfg = compose_config(list(balancer_overrides)) if balancer_overrides else setup.cfg
    trainer_cfg = dataclasses.replace(
        setup.cfg.trainer,
        max_steps=steps,
        eval_batches=1,
        eval_batch_size=4,  # the step-0 and final evaluations are outside the timed steps; keep them short
        save_interval=None,
        log_interval=1,
        batch_size=batch_size or setup.cfg.trainer.batch_size,
        grad_accum=grad_accum,
    )
    balancer = build_balancer(cfg.balancer, data.tasks)
    sampler = setup.sampler(trainer_cfg.batch_size, group_by_length, data.train_task_ids)
    timing = TimingSink()
    with tempfile.TemporaryDirectory(prefix="mtft-bench-") as tmp:
        run_dir = Path(tmp)
        tracker = Tracker([JsonlSink(run_dir / "metrics.jsonl"), timing])
        backend = build_backend(setup.model(), trainer_cfg, None, torch.device("cpu"))
        trainer = Trainer(
            trainer_cfg, backend, data, setup.collator(), sampler, balancer, tracker, run_dir, setup.cfg.seed
        )
        try:
            trainer.fit()
        finally:
            tracker.close()
    steps_done = sorted(timing.stamps)
    return Timing([timing.stamps[s] for s in steps_done], [timing.tokens[s] for s in steps_done], warmup)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def quiet() -> None:
    """Keep library chatter (mtft's own log lines, HF warnings) out of the benchmark output."""
    logging.getLogger("mtft").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, threads, library versions, load."""
    import psutil
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
