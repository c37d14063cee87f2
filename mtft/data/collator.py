"""Padded batches of whole examples: inputs, labels (padding masked too), task ids, attention mask."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mtft.data.batch import PaddedBatch

IGNORE_INDEX = -100


class TaskCollator:
    """Right-pads to the longest sequence in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> PaddedBatch:
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        task_ids = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)
        return PaddedBatch(input_ids, labels, task_ids, attention_mask)

    def batches(self, dataset: Any, rows: list[int], batch_size: int) -> Iterator[PaddedBatch]:
        """`rows` of `dataset` in order, `batch_size` a batch (evaluation)."""
        for i in range(0, len(rows), batch_size):
            yield self(dataset.__getitems__(rows[i : i + batch_size]))
