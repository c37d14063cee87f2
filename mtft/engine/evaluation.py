"""Per-task validation loss on bounded, fixed batches (comparable from one evaluation to the next)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

from mtft.core.dist import all_reduce_sum
from mtft.data.mixture import TokenizedMixture
from mtft.engine.loss import per_task_token_loss


def fixed_eval_rows(data: TokenizedMixture, per_task: int) -> list[int]:
    """The first `per_task` validation rows of every task (content-ordered, so the same each time)."""
    return [row for rows in data.val_rows for row in rows[:per_task]]


def stratified_probe_rows(data: TokenizedMixture, per_task: int) -> list[int]:
    """The last `per_task` validation rows of every task: a stratified probe, the same rows each time
    (apart from the evaluation's first rows wherever a task has enough)."""
    return [row for rows in data.val_rows for row in rows[-per_task:]]


def random_eval_rows(data: TokenizedMixture, n: int, generator: torch.Generator) -> list[int]:
    """`n` validation rows drawn at random over the whole mixture (a mixed batch, as CoBa samples)."""
    total = len(data.validation)
    return torch.randint(total, (n,), generator=generator).tolist()


def _batches(rows: list[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(rows), batch_size):
        yield rows[i : i + batch_size]


@torch.no_grad()
def task_losses(
    model: torch.nn.Module,
    data: TokenizedMixture,
    rows: list[int],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss per task over `rows` of the validation set, and which tasks had tokens."""
    num_tasks = len(data.tasks)
    sums = torch.zeros(num_tasks, device=device)
    counts = torch.zeros(num_tasks, device=device)
    was_training = model.training
    model.eval()
    for chunk in _batches(rows, batch_size):
        batch = {k: v.to(device) for k, v in collate(data.validation.__getitems__(chunk)).items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, c = per_task_token_loss(logits, batch["labels"], batch["task_ids"], num_tasks)
        sums += s
        counts += c
    model.train(was_training)
    sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
    return sums / counts.clamp_min(1), counts > 0
