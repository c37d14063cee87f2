"""The training loop and its engine: optimization, evaluation and checkpoint cadence, DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtft.core.errors import MtftError
from mtft.core.schema import Choice, at_least, choice, in_unit_interval, positive, require


class Precision(Choice):
    """The compute dtype. fp16 is refused: it would need a loss scaler, and bf16 has float32's range
    (so needs none) on every GPU that can train a real model (Ampere and newer)."""

    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16; trainable weights and optimizer states stay float32


class Scheduler(Choice):
    """The `transformers.get_scheduler` names that need nothing beyond warmup and total steps."""

    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    inverse_sqrt = "inverse_sqrt"


@dataclass
class TrainerConfig:
    max_steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate of AdamW
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    scheduler: Scheduler = Scheduler.cosine  # learning-rate schedule after the warmup
    warmup_steps: int = 20  # linear warmup from 0 to `lr`
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; null: no clipping
    precision: Precision = Precision.fp32
    # Without DeepSpeed, trainable weights (and so AdamW's states) are kept in float32 even when the
    # model loads in bf16: a bf16 weight cannot take an update below ~1/256 of itself. true: train
    # them in bf16 anyway (half the memory of the trainable weights and states; small updates are lost).
    pure_bf16: bool = False
    eval_interval: int = 50  # evaluate every N steps (and at the end)
    eval_batches: int = 2  # validation batches per task at each evaluation (bounded cost)
    eval_batch_size: int = 32
    log_interval: int = 1  # train rows in metrics.jsonl every N steps
    save_model: bool = True  # write the final model to <run dir>/model
    save_interval: int | None = 100  # checkpoint every N steps (and always at the end); null: end only
    keep_checkpoints: int = 2  # the last K checkpoints are kept, plus the best by mean validation loss
    resume: str | None = None  # auto (latest checkpoint in the run dir) | a checkpoint directory
    max_nonfinite_steps: int = 3  # consecutive skipped (NaN/inf) updates tolerated before stopping
    early_stopping_patience: int | None = None  # stop after N evaluations without improvement
    early_stopping_min_delta: float = 0.0  # the least drop of the mean validation loss that counts
    # Recompute activations in the backward pass (non-reentrant): less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # torch.compile the model (TorchDynamo + Inductor; the first steps compile). Not with DeepSpeed.
    compile: bool = False
    # Generate for `eval.sample_prompts` fixed validation prompts per task every N steps and log them
    # (console, samples.jsonl, W&B table, TensorBoard text); null: never.
    sample_interval: int | None = None
    eval_at_end: bool = False  # run `mtft eval` on the final model and record its metrics in summary.json

    def __post_init__(self) -> None:
        self.scheduler = choice("trainer.scheduler", Scheduler, self.scheduler)
        self.precision = choice("trainer.precision", Precision, self.precision)
        for key in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            at_least(f"trainer.{key}", getattr(self, key), 1)
        for key in ("eval_batch_size", "log_interval", "keep_checkpoints", "max_nonfinite_steps"):
            at_least(f"trainer.{key}", getattr(self, key), 1)
        positive("trainer.lr", self.lr)
        at_least("trainer.weight_decay", self.weight_decay, 0)
        in_unit_interval("trainer.adam_beta1", self.adam_beta1)
        in_unit_interval("trainer.adam_beta2", self.adam_beta2)
        at_least("trainer.warmup_steps", self.warmup_steps, 0)
        if self.max_grad_norm is not None:
            positive("trainer.max_grad_norm", self.max_grad_norm)
        if self.save_interval is not None:
            at_least("trainer.save_interval", self.save_interval, 1)
        if self.early_stopping_patience is not None:
            at_least("trainer.early_stopping_patience", self.early_stopping_patience, 1)
        at_least("trainer.early_stopping_min_delta", self.early_stopping_min_delta, 0)
        if self.sample_interval is not None:
            at_least("trainer.sample_interval", self.sample_interval, 1)
        require(self.resume != "", "trainer.resume", "auto, a checkpoint directory or null", self.resume)


@dataclass
class DeepSpeedConfig:
    """A DeepSpeed engine. The JSON DeepSpeed reads is generated from this and the trainer config, so
    batch size, accumulation, clipping and precision can never disagree between the two."""

    stage: int = 2  # ZeRO stage: 0 (plain data parallel), 1, 2 or 3
    offload_optimizer: bool = False  # optimizer states (and the step) on the CPU; ZeRO stage >= 1
    offload_param: bool = False  # ZeRO-3 only: parameters on the CPU between uses
    # Your own DeepSpeed JSON instead (relative to where you run mtft). Keys mtft derives from the
    # trainer config may be left out or "auto"; a value that disagrees with the trainer is an error.
    config_file: str | None = None
    # Extra keys merged into the generated JSON, e.g. {zero_optimization: {overlap_comm: true}}.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.stage in (0, 1, 2, 3), "deepspeed.stage", "0, 1, 2 or 3", self.stage)
        if self.offload_param and self.stage != 3:
            raise MtftError(
                "deepspeed.offload_param needs deepspeed.stage=3 (parameters are sharded only in ZeRO-3)"
            )
        if self.offload_optimizer and self.stage == 0:
            raise MtftError("deepspeed.offload_optimizer needs a ZeRO stage >= 1")
