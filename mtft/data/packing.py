"""Sequence packing: several examples per row, each attending only to itself.

Examples are grouped into bins of at most `max_length` tokens by first-fit-decreasing. A packed row
concatenates its bin's examples; position ids restart at 0 for every example and no attention mask
is passed, so transformers builds block-causal attention from the position ids (sdpa and eager
masks in `masking_utils`, flash-attention-2's varlen kernel on GPU). The first label of every
example is masked: in a row of its own no position predicts it, and in a packed row the position
before it belongs to the previous example. Task ids are per token (-1 on padding), so per-task
losses stay exact whatever a row holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mtft.data.batch import PAD_TASK, PackedBatch
from mtft.data.collator import IGNORE_INDEX


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of positions into `lengths`, each summing to at most `capacity`: the longest item
    first (ties in order), each into the first bin with room. Deterministic."""
    sizes = np.asarray(lengths, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > capacity:
        raise ValueError(f"an item of {int(sizes.max())} tokens does not fit a row of {capacity}")
    room = np.zeros(len(sizes), dtype=np.int64)  # never more bins than items
    bins: list[list[int]] = []
    for i in np.argsort(-sizes, kind="stable").tolist():
        n = int(sizes[i])
        j = int(np.argmax(room[: len(bins)] >= n)) if bins else 0
        if not bins or room[j] < n:
            j = len(bins)
            bins.append([])
            room[j] = capacity
        bins[j].append(i)
        room[j] -= n
    return bins


class PackedRows:
    """A dataset view the DataLoader fetches whole bins from: `__getitems__(bins)` returns each bin's
    rows (one read of the underlying dataset per batch)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, bins: list[list[int]]) -> list[list[dict]]:
        rows = self.dataset.__getitems__([i for b in bins for i in b])
        out, k = [], 0
        for b in bins:
            out.append(rows[k : k + len(b)])
            k += len(b)
        return out


class PackedCollator:
    """Bins of examples -> packed rows, right-padded to `max_length`: rows are nearly full anyway, and
    one shape for every batch spares torch.compile and the GPU's allocator a new shape per step."""

    def __init__(self, pad_token_id: int, max_length: int) -> None:
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, bins: list[list[dict]]) -> PackedBatch:
        length = self.max_length
        shape = (len(bins), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        task_ids = torch.full(shape, PAD_TASK, dtype=torch.long)
        # Padding is one more "example" per row, so it attends only to itself.
        position_ids = torch.arange(length).repeat(len(bins), 1)
        for i, rows in enumerate(bins):
            start = 0
            for row in rows:
                n = len(row["input_ids"])
                end = start + n
                input_ids[i, start:end] = torch.as_tensor(row["input_ids"], dtype=torch.long)
                labels[i, start + 1 : end] = torch.as_tensor(row["labels"][1:], dtype=torch.long)
                task_ids[i, start:end] = row["task_id"]
                position_ids[i, start:end] = torch.arange(n)
                start = end
            position_ids[i, start:] = torch.arange(length - start)
        return PackedBatch(input_ids, labels, task_ids, position_ids)

    def batches(self, dataset: Any, rows: list[int], batch_size: int) -> Iterator[PackedBatch]:
        """`rows` of `dataset` packed (first-fit-decreasing over all of them), `batch_size` rows a batch."""
        records = dataset.__getitems__(rows) if rows else []
        bins = first_fit_decreasing([len(r["input_ids"]) for r in records], self.max_length)
        for i in range(0, len(bins), batch_size):
            yield self([[records[j] for j in b] for b in bins[i : i + batch_size]])
