"""What every benchmark shares: the composed config, the tokenized codetasks data, fresh copies of the
tiny model, mtft's own Trainer run in-process with a timing sink, and robust statistics.

Everything is built with the recipe's own builders (`mtft.recipe.builders`, the code path of
`mtft train`), so the benchmarks measure what a user runs.
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
from transformers import PreTrainedTokenizerBase

from mtft.data.batching import Batching
from mtft.data.collator import TaskCollator
from mtft.data.mixture import TokenizedMixture
from mtft.data.packing import PackedCollator
from mtft.data.prepared import Data
from mtft.data.sampler import MixtureSampler, sequence_lengths
from mtft.loggers.base import Row
from mtft.recipe.builders import (
    build_backend,
    build_balancer,
    build_batching,
    build_data,
    build_model,
    build_sampler,
    build_tracker,
    build_trainer,
)
from mtft.recipe.config import TrainConfig, conf_dir, register_configs

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
    tokenizer: PreTrainedTokenizerBase
    lengths: list[int]

    @classmethod
    def load(cls, overrides: Sequence[str] = ()) -> Setup:
        cfg = compose_config(overrides)
        built = build_data(cfg)
        return cls(
            cfg, built.mixture, built.model_path, built.tokenizer, sequence_lengths(built.mixture.train)
        )

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def model(self) -> torch.nn.Module:
        """A fresh copy of the model, identical on every call (loaded from the same directory)."""
        torch.manual_seed(self.cfg.seed)
        return build_model(self.cfg, self.model_path, torch.device("cpu"))

    def config(
        self, batch_size: int | None = None, group_by_length: bool = False, packing: bool = False
    ) -> TrainConfig:
        """The run's config with another batch size, length grouping or packing."""
        trainer = dataclasses.replace(self.cfg.trainer, batch_size=batch_size or self.cfg.trainer.batch_size)
        data = dataclasses.replace(self.cfg.data, group_by_length=group_by_length, packing=packing)
        return dataclasses.replace(self.cfg, trainer=trainer, data=data)

    def sampler(
        self,
        batch_size: int | None = None,
        group_by_length: bool = False,
        task_ids: Sequence[int] | None = None,
        packing: bool = False,
    ) -> MixtureSampler:
        """The run's sampler; `task_ids` relabels the same examples (the synthetic T-task splits)."""
        ids = self.data.train_task_ids if task_ids is None else list(task_ids)
        cfg = self.config(batch_size, group_by_length, packing)
        return build_sampler(cfg, Batching(cfg.data, self.pad_token_id), ids, self.lengths)

    def collator(self, packing: bool = False) -> TaskCollator | PackedCollator:
        return Batching(self.config(packing=packing).data, self.pad_token_id).collate

    def step_tokens(self, steps: int, group_by_length: bool = False, packing: bool = False) -> list[int]:
        """Non-padding tokens of each of the first `steps` batches (the same batches every side trains on)."""
        it = iter(self.sampler(group_by_length=group_by_length, packing=packing))
        batches = [next(it) for _ in range(steps)]
        if packing:
            return [sum(self.lengths[i] for row in b for i in row) for b in batches]
        return [sum(self.lengths[i] for i in b) for b in batches]


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

    def state_dict(self) -> dict[str, Any]:
        return {}  # never resumed: a benchmark run is one uninterrupted fit

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to rewind."""

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
    packing: bool = False,
) -> Timing:
    """Train with mtft's own Trainer (metrics.jsonl written as in a real run) and time every step."""
    data = data or setup.data
    cfg = setup.config(batch_size, group_by_length, packing)
    cfg.trainer = dataclasses.replace(
        cfg.trainer,
        max_steps=steps,
        eval_batches=1,
        eval_batch_size=4,  # the step-0 and final evaluations are outside the timed steps; keep them short
        save_interval=None,
        log_interval=1,
        grad_accum=grad_accum,
    )
    if balancer_overrides:
        cfg.balancer = compose_config(list(balancer_overrides)).balancer
    balancer = build_balancer(cfg.balancer, data.tasks)
    model = setup.model()
    batching = build_batching(cfg, setup.pad_token_id, model)
    sampler = build_sampler(cfg, batching, data.train_task_ids, setup.lengths)
    timing = TimingSink()
    with tempfile.TemporaryDirectory(prefix="mtft-bench-") as tmp:
        run_dir = Path(tmp)
        tracker = build_tracker(cfg, run_dir, data.tasks, extra=[timing])
        backend = build_backend(cfg, model, torch.device("cpu"))
        built = Data(data, setup.tokenizer, setup.model_path)
        trainer = build_trainer(cfg, backend, built, batching, sampler, balancer, tracker, run_dir)
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
