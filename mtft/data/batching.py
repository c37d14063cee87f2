"""How training examples become micro-batches, decided once from `data.*`: the sampler's mode (plain,
length-grouped or packed), the dataset view the DataLoader reads and the collator that makes typed
batches (mtft.data.batch) always agree, because they all come from this one object."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from mtft.data.collator import TaskCollator
from mtft.data.config import DataConfig
from mtft.data.loader import TrainBatches
from mtft.data.packing import PackedCollator, PackedRows, first_fit_decreasing
from mtft.data.sampler import BatchMode, MixtureSampler


class Batching:
    """The batching of one run: `data.packing` and `data.group_by_length` are read here and nowhere else."""

    def __init__(self, cfg: DataConfig, pad_token_id: int) -> None:
        if cfg.packing:
            self.mode = BatchMode.packed
        else:
            self.mode = BatchMode.grouped if cfg.group_by_length else BatchMode.plain
        self.collate: TaskCollator | PackedCollator = (
            PackedCollator(pad_token_id, cfg.max_length) if self.packed else TaskCollator(pad_token_id)
        )
        self.max_length, self.packing_window = cfg.max_length, cfg.packing_window
        self.group_batches, self.num_workers = cfg.group_batches, cfg.num_workers
        self.rule, self.temperature = cfg.sampling, cfg.temperature

    @property
    def packed(self) -> bool:
        """Rows hold several examples (the model must keep them apart; batch sizes count rows)."""
        return self.mode is BatchMode.packed

    def sampler(
        self,
        task_ids: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        lengths: Sequence[int] | None = None,
    ) -> MixtureSampler:
        """This rank's share of the mixture's batches; `lengths` (of every example) are needed unless plain."""
        return MixtureSampler(
            task_ids,
            batch_size,
            self.rule,
            self.temperature,
            seed=seed,
            rank=rank,
            world_size=world_size,
            lengths=None if self.mode is BatchMode.plain else lengths,
            mode=self.mode,
            group_batches=self.group_batches,
            max_length=self.max_length,
            packing_window=self.packing_window,
        )

    def loader(self, dataset: Any, sampler: MixtureSampler, pin_memory: bool = False) -> TrainBatches:
        """The training batches of `sampler` (made by this object) over `dataset`, read whole bins at a
        time when packed."""
        view = PackedRows(dataset) if self.packed else dataset
        return TrainBatches(view, sampler, self.collate, self.num_workers, pin_memory)

    def row_tokens(self, lengths: Sequence[int]) -> float:
        """Mean tokens per row of a batch, for the run-start block: an example's, or a packed row's
        on a sample spread over the mixture (`lengths`: every example's token count)."""
        if not lengths:
            return 0.0
        if not self.packed:
            return statistics.fmean(lengths)
        sample = list(lengths[:: max(1, len(lengths) // self.packing_window)])
        return sum(sample) / len(first_fit_decreasing(sample, self.max_length))
