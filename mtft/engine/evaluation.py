"""Per-task validation loss on bounded, fixed batches (comparable from one evaluation to the next)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from mtft.core.dist import all_reduce_sum
from mtft.data.collator import TaskCollator
from mtft.data.mixture import TokenizedMixture
from mtft.data.packing import PackedCollator
from mtft.engine.forward import task_token_loss


def fixed_eval_rows(data: TokenizedMixture, per_task: int) -> list[int]:
    """The first `per_task` validation rows of every task (content-ordered, so the same each time)."""
    return [row for rows in data.val_rows for row in rows[:per_task]]


@torch.no_grad()
def task_losses(
    model: torch.nn.Module,
    data: TokenizedMixture,
    rows: list[int],
    collator: TaskCollator | PackedCollator,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss per task over `rows` of the validation set, and which tasks had tokens.
    Batches of `batch_size` rows, packed rows with a PackedCollator."""
    num_tasks = len(data.tasks)
    sums = torch.zeros(num_tasks, device=device)
    counts = torch.zeros(num_tasks, device=device)
    was_training = model.training
    model.eval()
    for batch in collator.batches(data.validation, rows, batch_size):
        batch = batch.to(device, non_blocking=True)
        with autocast():
            s, c = task_token_loss(model, batch, num_tasks)
        sums += s
        counts += c
    model.train(was_training)
    sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
    return sums / counts.clamp_min(1), counts > 0
