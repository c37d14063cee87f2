"""Per-task loss in one vectorised pass over the batch (no Python loop over samples)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtft.data.collator import IGNORE_INDEX


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """`(batch, length)` bool: positions whose *next* token is learned, i.e. whose logits are scored."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored


def token_tasks(task_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """The task of every scored position, in `scored`'s row-major order. `task_ids` is per row `(batch,)`
    or per token `(batch, length)` (rows holding several examples): the task of the position's input."""
    if task_ids.dim() == 1:
        return task_ids[:, None].expand_as(scored)[scored]
    return task_ids[scored]


def scored_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, scored: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task cross-entropy sums and token counts from the `(scored, vocab)` logits of the scored
    positions (`scored_positions(labels)`, row-major)."""
    targets = torch.roll(labels, -1, dims=1)[scored]
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    tasks = token_tasks(task_ids, scored)
    zeros = torch.zeros(num_tasks, dtype=token_loss.dtype, device=logits.device)
    return zeros.index_add(0, tasks, token_loss), zeros.index_add(0, tasks, torch.ones_like(token_loss))


def per_task_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy and number of learned tokens, per task, from `(batch, length, vocab)` logits.

    The mean loss of task i is `sums[i] / counts[i]`: a token mean over all unmasked tokens of task
    i's sequences. Returning sums and counts (not means) lets ranks and micro-batches be added exactly.
    Only learned positions go through the softmax: prompt and padding cost nothing here. `task_ids`
    is per row `(batch,)`, or per token `(batch, length)` for packed rows holding several examples.
    """
    scored = scored_positions(labels)
    return scored_token_loss(logits[scored], labels, task_ids, scored, num_tasks)
