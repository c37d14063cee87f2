"""The balancer interface: how a multitask loss is weighted, step by step.

A balancer sees only per-task losses (and, if it asks, the model's shared parameters); it never
touches data or the backend. The trainer drives it:

    setup(model)                          once, before training
    plan(max_steps)                       once, before training (and before a checkpoint is restored)
    observe_val(0, losses, present)       the initial per-task validation losses
    every optimizer step t:
        combine(TaskLosses) -> loss       per micro-batch; the trainer calls backward on the result
        observe_step(t, TaskLosses)       after the update (the same batch re-evaluated if
                                          `recompute_after_step`, else the step's own losses)
        probe_rows(t, ...) -> rows | None   the validation rows it wants losses of after step t
        observe_val(t, losses, present)   when it wanted rows: their losses, without gradients

It is usable without a model: feed `observe_*` per-task losses and read `weights()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mtft.core.errors import MtftError


def check_task_names(key: str, named: Any, tasks: Sequence[str]) -> None:
    """A balancer option keyed by task (weights, loss floors) may only name tasks of the mixture."""
    unknown = sorted(set(named) - set(tasks))
    if unknown:
        raise MtftError(f"{key} names unknown task(s) {unknown}; tasks: {list(tasks)}")


@dataclass
class TaskLosses:
    """Per-task losses of one (micro-)batch.

    `local` is differentiable: this process's token-loss sum divided by the token count over all
    ranks, so summing it over ranks gives the global per-task mean. `mean` is that global mean,
    detached and identical on every rank; `present` marks tasks with tokens anywhere in the batch.
    """

    local: torch.Tensor
    mean: torch.Tensor
    present: torch.Tensor
    # With `Balancer.per_task_rows`: task i's `local` as an autograd root of its own, over its rows
    # alone (None where this rank has none), for per-task gradients that do not cost the whole batch.
    separate: list[torch.Tensor | None] | None = None

    @classmethod
    def from_values(cls, values: Sequence[float], present: Sequence[bool] | None = None) -> TaskLosses:
        """Losses given as plain numbers (one process, no autograd): for standalone use and tests."""
        mean = torch.as_tensor(values, dtype=torch.float32)
        mask = torch.ones_like(mean, dtype=torch.bool) if present is None else torch.as_tensor(present)
        return cls(local=mean.clone(), mean=mean, present=mask)


class Balancer(ABC):
    """One weight per task. Subclasses implement `weights()` and whichever hooks they need."""

    recompute_after_step: bool = False
    needs_parameters: bool = False  # takes gradients of whole model parameters (not with ZeRO-3)
    # Each task's rows in a forward of their own (same losses and model gradient), handed over as
    # `TaskLosses.separate`: per-task gradients then cost each task's rows, not the whole batch each.
    per_task_rows: bool = False

    # The dataclass of the balancer's options (its YAML's schema); the constructor takes its fields.
    config_class: ClassVar[type]

    def __init__(self, tasks: Sequence[str]) -> None:
        if not tasks:
            raise ValueError("a balancer needs at least one task")
        self.tasks = list(tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @abstractmethod
    def weights(self) -> torch.Tensor:
        """Current weight of each task, shape (T,), detached: what `combine` applies and what is logged."""

    def combine(self, losses: TaskLosses) -> torch.Tensor:
        """The loss to backpropagate: `sum_i w_i L_i / sum_{i present} w_i` over tasks present."""
        w = self.weights().to(losses.local.device, losses.local.dtype) * losses.present
        return (w * losses.local).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)

    def setup(self, model: torch.nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once before training; balancers that need model parameters take them here."""

    def plan(self, max_steps: int) -> None:  # noqa: B027 - optional hook
        """Called once before training with the run's length, for settings chosen from it."""

    def observe_step(self, step: int, losses: TaskLosses) -> None:  # noqa: B027 - optional hook
        """Called after optimizer step `step` with detached per-task training losses."""

    def probe_rows(
        self, step: int, val_rows: Sequence[Sequence[int]], batch_rows: int, generator: torch.Generator
    ) -> list[int] | None:
        """The validation rows whose per-task losses `observe_val(step, ...)` is to see after step
        `step`, or None (the default): no probe. `val_rows` holds each task's rows (together, all of
        them); `batch_rows` is one global training micro-batch; `generator`, checkpointed by the
        trainer, draws random rows."""
        return None

    def observe_val(self, step: int, losses: torch.Tensor, present: torch.Tensor) -> None:  # noqa: B027
        """Called with per-task validation losses: at step 0 (full) and after the steps it probes."""

    def diagnostics(self) -> dict[str, float]:
        """Extra per-step values worth logging (e.g. `rcs/<task>`); empty by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore what `state_dict` returned, so a resumed run continues exactly."""
