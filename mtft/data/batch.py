"""The typed micro-batch the data side hands the engine: padded rows of one example each, or packed
rows of several. Each kind knows its model inputs, its token count and whether it splits by task,
so no caller learns how a batch was made by looking at its keys."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

PAD_TASK = -1  # the task id of padding positions in packed rows: no task

B = TypeVar("B", bound="Batch")


@dataclass(eq=False)
class Batch(ABC):
    """`(rows, length)` token ids and labels (IGNORE_INDEX where nothing is learned), and task ids."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor

    @abstractmethod
    def model_inputs(self) -> dict[str, Any]:
        """The model's keyword arguments. No KV cache: it is useless in training, and with one
        transformers ignores packing."""

    @abstractmethod
    def num_tokens(self) -> torch.Tensor:
        """Non-padding tokens (a 0-d tensor, summed without a host sync)."""

    @abstractmethod
    def token_task_ids(self) -> torch.Tensor:
        """The task of every position, `(rows, length)`: what the per-task loss sums over."""

    @abstractmethod
    def by_task(self) -> list[tuple[int, PaddedBatch]] | None:
        """Each present task's rows as a batch of their own (`Balancer.per_task_rows`), or None when
        rows hold several tasks and cannot be split by row."""

    def to(self: B, device: torch.device, non_blocking: bool = False) -> B:
        """On `device`; `non_blocking` lets the copy from pinned memory overlap the GPU's work."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: B) -> B:
        """Page-locked copies, for an asynchronous copy to the GPU (the DataLoader's `pin_memory` calls it)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self: B, fn: Callable[[torch.Tensor], torch.Tensor]) -> B:
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


@dataclass(eq=False)
class PaddedBatch(Batch):
    """Whole examples, right-padded; `task_ids` is per row `(rows,)`."""

    attention_mask: torch.Tensor

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}

    def num_tokens(self) -> torch.Tensor:
        return self.attention_mask.sum()

    def token_task_ids(self) -> torch.Tensor:
        return self.task_ids[:, None].expand_as(self.input_ids)

    def by_task(self) -> list[tuple[int, PaddedBatch]]:
        """Trimmed to each part's longest row (right padding), in task order."""
        parts = []
        for task in self.task_ids.unique().tolist():
            rows = self.task_ids == task
            length = int(self.attention_mask[rows].sum(1).max())
            parts.append(
                (
                    task,
                    PaddedBatch(
                        self.input_ids[rows][:, :length],
                        self.labels[rows][:, :length],
                        self.task_ids[rows],
                        self.attention_mask[rows][:, :length],
                    ),
                )
            )
        return parts


@dataclass(eq=False)
class PackedBatch(Batch):
    """Rows of several examples (mtft.data.packing): `task_ids` is per token `(rows, length)`, PAD_TASK
    on padding, and position ids restart per example; no attention mask is passed, so transformers
    builds per-example attention from the position ids."""

    position_ids: torch.Tensor

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}

    def num_tokens(self) -> torch.Tensor:
        return (self.task_ids != PAD_TASK).sum()

    def token_task_ids(self) -> torch.Tensor:
        return self.task_ids

    def by_task(self) -> None:
        return None
