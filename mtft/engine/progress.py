"""What the training loop records: the run's result and progress, checkpointed with the model, and
one optimizer step's statistics."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from mtft.data.batch import Batch


class DataclassState:
    """`state_dict`/`load_state_dict` for a dataclass of plain values: its fields, as they are."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, state[f.name])


@dataclass
class TrainResult(DataclassState):
    steps: int = 0  # optimizer steps taken (fewer than max_steps after early stopping)
    val_history: dict[int, list[float]] = field(default_factory=dict)  # step -> loss per task
    train_tokens: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    stopped_early: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


@dataclass
class Progress(DataclassState):
    """What the loop carries from step to step beyond the model: checkpointed with it."""

    streak: int = 0  # consecutive non-finite steps
    best_val: float = math.inf  # for early stopping
    evals_without_improvement: int = 0


@dataclass
class StepStats:
    """One optimizer step's per-task loss sums and token counts (over ranks and micro-batches)."""

    sums: torch.Tensor
    counts: torch.Tensor
    loss: float = 0.0  # the combined (balanced) loss
    tokens: int = 0  # non-padding tokens
    bad_tasks: set[str] = field(default_factory=set)  # tasks whose loss was not finite
    last_batch: Batch | None = None  # the last micro-batch, for a balancer that recomputes its losses
    applied: bool = True  # False: the update was skipped (a non-finite loss or gradient)
    grad_norm: float = math.nan  # before clipping; NaN where the engine does not report it
    seconds: float = 0.0  # the step's wall time, balancer and probe included

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    @property
    def mean(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)
