"""The run directory's contract, named once: the files a run writes and `mtft report` reads.

.hydra/config.yaml    the composed config (Hydra format)   metrics.jsonl   one row per task per logged step
summary.json          a `Summary`, written when it ends    checkpoints/    step-XXXXXXXX/ (see engine.checkpoint)
model/                the final model (or adapter)         train.log       the console log
run.lock              locked while a run uses the dir (see mtft.launch.claim)
eval.json             `mtft eval` (or trainer.eval_at_end): per-task loss, perplexity, generation metrics
eval_samples.jsonl    prompt, reference and prediction of each evaluated example
samples.jsonl         trainer.sample_interval: answers to fixed validation prompts during training
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HYDRA_DIR = ".hydra"
CONFIG = f"{HYDRA_DIR}/config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MODEL = "model"
LAUNCH_CONFIG = "launch_config.yaml"  # the resolved config a multi-process job's workers read
TRAIN_LOG = "train.log"
LOCK = "run.lock"
EVAL = "eval.json"
EVAL_SAMPLES = "eval_samples.jsonl"
SAMPLES = "samples.jsonl"


def rank_metrics(rank: int) -> str:
    """metrics.jsonl of a rank > 0 (`logger.all_ranks=true`)."""
    return f"metrics.rank{rank}.jsonl"


@dataclass
class RunSetup:
    """What a run trains, in what precision, on which engine and with what batch: logged once at the
    start (the run-start block) and kept in summary.json under `setup`."""

    parameters: int
    trainable: int
    trainable_dtype: str  # of the trainable weights the forward pass uses
    compute_dtype: str
    optimizer_state_dtype: str
    attention: str
    engine: str  # single process, DDP, DeepSpeed ZeRO-<stage>
    world_size: int
    batch_size: int  # sequences (packed rows with `packed`) per micro-batch per rank
    grad_accum: int
    global_batch: int  # sequences per optimizer step: batch_size x grad_accum x world_size
    global_batch_tokens: int  # expected tokens per step, at the mean training length
    global_batch_max_tokens: int  # at data.max_length
    lr: float  # the peak learning rate the schedule reaches
    scheduler: str
    warmup_steps: int
    max_steps: int
    packed: bool = False  # data.packing: batch sizes count packed rows of several examples


@dataclass
class Summary:
    """summary.json: what a finished run reached, per task, and what it cost."""

    balancer: str
    tasks: list[str]
    steps: int
    seed: int
    initial_val_loss: dict[str, float]
    final_val_loss: dict[str, float]
    best_val_loss: dict[str, float]
    train_tokens_per_s: float
    wall_s: float
    peak_rss_mb: float
    skipped_steps: int = 0
    peak_gpu_memory_mb: float | None = None  # torch.cuda.max_memory_allocated on this rank's GPU
    stopped_early: bool = False
    setup: RunSetup | None = None
    eval: dict[str, Any] | None = None  # trainer.eval_at_end: eval.json's per-task results and means

    def write(self, run_dir: Path) -> None:
        (run_dir / SUMMARY).write_text(json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False) + "\n")
