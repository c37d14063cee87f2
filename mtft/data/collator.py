"""Batches of tokenized examples: padded inputs, labels (padding masked too), task ids."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

IGNORE_INDEX = -100


class TaskCollator:
    """Right-pads to the longest sequence (or a multiple of `pad_to_multiple_of`) in the batch."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        task_ids = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "task_ids": task_ids,
        }

    def batches(self, dataset: Any, rows: list[int], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """`rows` of `dataset` in order, `batch_size` a batch (evaluation)."""
        for i in range(0, len(rows), batch_size):
            yield self(dataset.__getitems__(rows[i : i + batch_size]))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a batch. A padded batch masks its padding; a packed one
    (mtft.data.packing) passes position ids and no mask, from which transformers builds per-example
    attention. No KV cache: it is useless in training, and with one transformers ignores packing."""
    keys = ("input_ids", "position_ids") if "position_ids" in batch else ("input_ids", "attention_mask")
    return {**{k: batch[k] for k in keys}, "use_cache": False}


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens of a batch, padded (attention mask) or packed (per-token task ids, -1 on padding)."""
    if "position_ids" in batch:
        return (batch["task_ids"] >= 0).sum()
    return batch["attention_mask"].sum()
