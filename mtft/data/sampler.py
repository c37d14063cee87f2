"""Task-aware batch sampling over a mixture, deterministic and shardable across ranks.

The sampler defines one global stream of example indices from the seed alone; rank r of W takes
the r-th slice of every global batch. Its position is a single counter, so resuming is exact.

In `grouped` mode, the stream is reordered inside fixed windows ("mega-batches" of
`group_batches` global batches, as Hugging Face's `group_by_length` does) so that each batch holds
examples of similar length and pads less. The reordering is a function of the seed and the stream
position only, so determinism, the one-counter resume and rank sharding are unchanged, and it never
moves an example across an epoch boundary, so proportional sampling still sees every example once
per epoch.

In `packed` mode, the unit of a batch is a packed row (a bin of examples, mtft.data.packing) instead
of an example: each window of `packing_window` examples of the same stream is packed by
first-fit-decreasing and its bins shuffled, both functions of the seed and the window's position,
and rank r takes the r-th slice of every global batch of bins. The position is still one counter
(global batches handed out), so packing resumes exactly too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from enum import Enum
from typing import Any

import torch

from mtft.core.errors import MtftError
from mtft.data.packing import first_fit_decreasing


class BatchMode(Enum):
    """What a micro-batch holds: whole examples in stream order, whole examples of similar length
    (`data.group_by_length`), or packed rows of several examples (`data.packing`)."""

    plain = "plain"
    grouped = "grouped"
    packed = "packed"


def sequence_lengths(dataset: Any) -> list[int]:
    """Token count of every row (for the grouped and packed modes): read from the Arrow column of a
    Hugging Face dataset without decoding rows (~0.1 s for the codetasks mixture), or counted for a
    list of rows."""
    if hasattr(dataset, "with_format"):
        import pyarrow.compute as pc

        return pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()
    return [len(row["input_ids"]) for row in dataset]


def task_probabilities(sizes: Sequence[int], rule: str, temperature: float = 1.0) -> torch.Tensor:
    """Probability of drawing each task: proportional n_i, uniform 1/T, or temperature n_i^(1/t)."""
    n = torch.tensor(sizes, dtype=torch.float64)
    if rule == "proportional":
        p = n
    elif rule == "uniform":
        p = torch.ones_like(n)
    else:  # temperature (data.sampling is checked by the config)
        p = n ** (1.0 / temperature)
    return p / p.sum()


def _long_tensor(values: Sequence[int]) -> torch.Tensor:
    """Ids as a tensor. A Hugging Face dataset column (`dataset["task_id"]`) is read from its Arrow
    buffer: `torch.as_tensor` on it decodes row by row, seconds for the codetasks mixture."""
    source, name = getattr(values, "source", None), getattr(values, "column_name", None)
    if source is not None and name is not None and hasattr(source, "with_format"):
        column = source.with_format("arrow")[:][name]
        return torch.from_numpy(column.to_numpy(zero_copy_only=False).astype("int64"))
    return torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.long)


class MixtureSampler:
    """Yields micro-batches (lists of dataset indices) for one rank, forever.

    `proportional` walks a fresh permutation of the whole mixture every epoch, so every example is
    seen once per epoch and the ranks' shards never overlap. `uniform`/`temperature` draw a task per
    position with the rule's probabilities, then the next example of that task's own permutation
    (re-shuffled each time the task is exhausted), so small tasks repeat and large ones are cut.

    `mode=grouped` (needs `lengths`, one per example) sorts each window of `group_batches`
    global batches by length, longest first, then shuffles the order of the whole batches inside the
    window, so consecutive steps do not go from long to short.

    `mode=packed` (needs `lengths` and `max_length`) yields lists of bins: each micro-batch is
    `batch_size` packed rows of at most `max_length` tokens.
    """

    def __init__(
        self,
        task_ids: Sequence[int],
        batch_size: int,
        rule: str = "proportional",
        temperature: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        chunk: int = 8192,
        lengths: Sequence[int] | None = None,
        mode: BatchMode = BatchMode.plain,
        group_batches: int = 50,
        max_length: int | None = None,
        packing_window: int = 1000,
    ) -> None:
        self.task_ids = _long_tensor(task_ids)
        self.num_tasks = int(self.task_ids.max()) + 1
        self.members = [torch.nonzero(self.task_ids == t).flatten() for t in range(self.num_tasks)]
        self.probs = task_probabilities([len(m) for m in self.members], rule, temperature)
        self.rule, self.batch_size, self.seed = rule, batch_size, seed
        self.rank, self.world_size, self.chunk = rank, world_size, chunk
        self.batches_done = 0
        if mode is BatchMode.grouped and lengths is None:
            raise MtftError("data.group_by_length needs the length of every example")
        if mode is BatchMode.packed and (lengths is None or max_length is None):
            raise MtftError("data.packing needs the length of every example and data.max_length")
        if lengths is not None and len(lengths) != len(self.task_ids):
            raise MtftError(f"got {len(lengths)} lengths for {len(self.task_ids)} examples")
        if group_batches < 1:
            raise MtftError(f"data.group_batches must be >= 1, got {group_batches}")
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        self.mode, self.group_batches = mode, group_batches
        self.max_length, self.packing_window = max_length, packing_window

    def _generator(self, *key: int) -> torch.Generator:
        """A generator seeded from (seed, *key) by SHA-1, not Python's `hash`, whose value for a
        tuple is an implementation detail that may change between Python versions and platforms:
        the same seed must give the same batches everywhere, and across a resume."""
        text = ":".join(str(part) for part in (self.seed, *key))
        digest = hashlib.sha1(text.encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)

    def _global_stream(self) -> Iterator[torch.Tensor]:
        """Chunks of the global index stream, identical on every rank."""
        if self.rule == "proportional":
            epoch = 0
            while True:
                yield torch.randperm(len(self.task_ids), generator=self._generator(0, epoch))
                epoch += 1
        members = [m.tolist() for m in self.members]
        cursors = [0] * self.num_tasks
        epochs = [0] * self.num_tasks
        perms = [
            torch.randperm(len(m), generator=self._generator(1, t, 0)).tolist() for t, m in enumerate(members)
        ]
        c = 0
        while True:
            draws = torch.multinomial(
                self.probs, self.chunk, replacement=True, generator=self._generator(2, c)
            )
            out = []
            for t in draws.tolist():
                if cursors[t] == len(perms[t]):
                    epochs[t] += 1
                    perms[t] = torch.randperm(
                        len(perms[t]), generator=self._generator(1, t, epochs[t])
                    ).tolist()
                    cursors[t] = 0
                out.append(members[t][perms[t][cursors[t]]])
                cursors[t] += 1
            yield torch.tensor(out, dtype=torch.long)
            c += 1

    def _windows(self, window: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(stream position, indices) of the global stream cut into windows of `window` examples.
        Windows sit at fixed stream positions (multiples of the window size) and are also cut at
        chunk (epoch) boundaries, so an example never leaves its epoch."""
        pos = 0  # stream position of the chunk's first element
        for chunk in self._global_stream():
            start, end = pos, pos + len(chunk)
            while start < end:
                stop = min(end, (start // window + 1) * window)
                yield start, chunk[start - pos : stop - pos]
                start = stop
            pos = end

    def _grouped_stream(self) -> Iterator[list[int]]:
        """The global stream reordered by length inside windows of `group_batches` batches.

        Inside a window: sort by length, longest first (stable, so ties keep stream order), then
        permute the whole global batches that lie entirely inside the window, with a generator keyed
        by the window's start position.
        """
        assert self.lengths is not None
        global_batch = self.batch_size * self.world_size
        for start, seg in self._windows(global_batch * self.group_batches):
            stop = start + len(seg)
            seg = seg[torch.sort(self.lengths[seg], descending=True, stable=True).indices]
            first = -(-start // global_batch)  # whole batches inside [start, stop)
            last = stop // global_batch
            if last - first > 1:
                perm = torch.randperm(last - first, generator=self._generator(3, start)) + first
                slots = torch.arange(global_batch)
                src = (perm[:, None] * global_batch + slots).flatten() - start
                dst = (torch.arange(first, last)[:, None] * global_batch + slots).flatten() - start
                seg[dst] = seg.clone()[src]
            yield seg.tolist()

    def _packed_stream(self) -> Iterator[list[list[int]]]:
        """Bins (packed rows) of the global stream: first-fit-decreasing into rows of `max_length`
        tokens inside windows of `packing_window` examples, the window's bins in an order shuffled
        by a generator keyed by its start position (so rows are not sorted by length)."""
        assert self.lengths is not None and self.max_length is not None
        for start, seg in self._windows(self.packing_window):
            ids = seg.tolist()
            bins = first_fit_decreasing(self.lengths[seg].tolist(), self.max_length)
            order = torch.randperm(len(bins), generator=self._generator(4, start)).tolist()
            yield [[ids[j] for j in bins[k]] for k in order]

    def __iter__(self) -> Iterator[list[Any]]:
        """This rank's micro-batches: example indices, or bins of them in `packed` mode."""
        global_batch = self.batch_size * self.world_size
        skip = self.batches_done * global_batch  # replay to the saved position
        if self.mode is BatchMode.packed:
            stream: Iterator[list[Any]] = self._packed_stream()
        elif self.mode is BatchMode.grouped:
            stream = self._grouped_stream()
        else:
            stream = (chunk.tolist() for chunk in self._global_stream())
        buffer: list[Any] = []
        for chunk in stream:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            buffer = buffer + chunk[skip:]
            skip = 0
            start = self.rank * self.batch_size
            taken = 0
            while len(buffer) - taken >= global_batch:
                batch = buffer[taken : taken + global_batch]
                taken += global_batch
                self.batches_done += 1
                yield batch[start : start + self.batch_size]
            buffer = buffer[taken:]

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_done = int(state["batches_done"])
