"""The training loop and its engine: optimization, evaluation and checkpoint cadence, DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerConfig:
    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch on each process
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    scheduler: str = "cosine"  # any name transformers.get_scheduler accepts
    warmup_steps: int = 20
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    eval_interval: int = 50
    eval_batches: int = 2  # validation batches per task at each evaluation (bounded cost)
    eval_batch_size: int = 32
    log_interval: int = 1  # train rows in metrics.jsonl every N steps
    save_model: bool = True
    save_interval: int | None = 100  # checkpoint every N steps (and always at the end); null: end only
    keep_checkpoints: int = 2  # the last K checkpoints are kept, plus the best by mean validation loss
    resume: str | None = None  # auto (latest checkpoint in the run dir) | a checkpoint directory
    max_nonfinite_steps: int = 3  # consecutive skipped (NaN/inf) updates tolerated before stopping
    early_stopping_patience: int | None = None  # stop after N evaluations without improvement
    early_stopping_min_delta: float = 0.0
    # Recompute activations in the backward pass (non-reentrant): less memory, ~30% more compute.
    gradient_checkpointing: bool = False


@dataclass
class DeepSpeedConfig:
    """A DeepSpeed engine. The JSON DeepSpeed reads is generated from this and the trainer config, so
    batch size, accumulation, clipping and precision can never disagree between the two."""

    stage: int = 2  # ZeRO stage: 0 (plain data parallel), 1, 2 or 3
    offload_optimizer: bool = False  # optimizer states (and the step) on the CPU
    offload_param: bool = False  # ZeRO-3 only: parameters on the CPU between uses
    # Your own DeepSpeed JSON instead (relative to where you run mtft). Keys mtft derives from the
    # trainer config may be left out or "auto"; a value that disagrees with the trainer is an error.
    config_file: str | None = None
    # Extra keys merged into the generated JSON, e.g. {zero_optimization: {overlap_comm: true}}.
    extra: dict[str, Any] = field(default_factory=dict)
