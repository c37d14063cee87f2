"""The training micro-batches: a DataLoader over the sampler, and the position the loop has reached."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtft.data.batch import Batch
from mtft.data.sampler import MixtureSampler


class TrainBatches:
    """Collated micro-batches of `sampler` over `dataset` (a view that fetches what the sampler
    yields, examples or bins of them: mtft.data.batching picks both), forever, made by `num_workers`
    DataLoader processes ahead of the loop (0: in the loop's own process) and pinned for an
    asynchronous copy to the GPU.

    It is checkpointed in the sampler's place. Workers prefetch, so the sampler runs ahead of the
    batches trained on; the saved position is the batches handed to the loop. The DataLoader is made
    at the first batch, after a checkpoint is restored, and draws its worker seed from its own
    generator, never from torch's global RNG (a resumed run must see the same random numbers).
    """

    def __init__(
        self,
        dataset: Any,
        sampler: MixtureSampler,
        collate: Callable[[list[Any]], Batch],
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._batches: Iterator[Batch] | None = None
        self._start = self._taken = 0

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._start = self.sampler.batches_done
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=self.collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator(),
            )
            self._batches = iter(loader)
        batch = next(self._batches)
        self._taken += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "batches_done": self._start + self._taken
            if self._batches is not None
            else self.sampler.batches_done
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._batches is not None:
            raise RuntimeError("restore the position before the first batch is drawn")
        self.sampler.load_state_dict(state)
