"""Task-aware batch sampling over a mixture, deterministic and shardable across ranks.

The sampler defines one global stream of example indices from the seed alone; rank r of W takes
the r-th slice of every global batch. Its position is a single counter, so resuming is exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from mtft.errors import MtftError

SAMPLING_RULES = ("proportional", "uniform", "temperature")


def task_probabilities(sizes: Sequence[int], rule: str, temperature: float = 1.0) -> torch.Tensor:
    """Probability of drawing each task: proportional n_i, uniform 1/T, or temperature n_i^(1/t)."""
    n = torch.tensor(sizes, dtype=torch.float64)
    if rule == "proportional":
        p = n
    elif rule == "uniform":
        p = torch.ones_like(n)
    elif rule == "temperature":
        if temperature <= 0:
            raise MtftError(f"data.temperature must be > 0, got {temperature}")
        p = n ** (1.0 / temperature)
    else:
        raise MtftError(f"unknown data.sampling '{rule}' (choose from {', '.join(SAMPLING_RULES)})")
    return p / p.sum()


class MixtureSampler:
    """Yields micro-batches (lists of dataset indices) for one rank, forever.

    `proportional` walks a fresh permutation of the whole mixture every epoch, so every example is
    seen once per epoch and the ranks' shards never overlap. `uniform`/`temperature` draw a task per
    position with the rule's probabilities, then the next example of that task's own permutation
    (re-shuffled each time the task is exhausted), so small tasks repeat and large ones are cut.
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
    ) -> None:
        self.task_ids = torch.as_tensor(task_ids, dtype=torch.long)
        self.num_tasks = int(self.task_ids.max()) + 1
        self.members = [torch.nonzero(self.task_ids == t).flatten() for t in range(self.num_tasks)]
        self.probs = task_probabilities([len(m) for m in self.members], rule, temperature)
        self.rule, self.batch_size, self.seed = rule, batch_size, seed
        self.rank, self.world_size, self.chunk = rank, world_size, chunk
        self.batches_done = 0

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)

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

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.world_size
        skip = self.batches_done * global_batch  # replay to the saved position
        buffer = torch.empty(0, dtype=torch.long)
        for chunk in self._global_stream():
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            buffer = torch.cat([buffer, chunk[skip:]])
            skip = 0
            while len(buffer) >= global_batch:
                batch, buffer = buffer[:global_batch], buffer[global_batch:]
                start = self.rank * self.batch_size
                self.batches_done += 1
                yield batch[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_done = int(state["batches_done"])
