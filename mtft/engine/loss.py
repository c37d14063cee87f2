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


def scored_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_tasks: torch.Tensor,
    scored: torch.Tensor,
    num_tasks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy and number of learned tokens, per task, from the `(scored, vocab)`
    logits of the scored positions (`scored_positions(labels)`, row-major); `token_tasks` is the task
    of every position's input, `(batch, length)`.

    The mean loss of task i is `sums[i] / counts[i]`: a token mean over all learned tokens of task i.
    Returning sums and counts (not means) lets ranks and micro-batches be added exactly. Only learned
    positions go through the softmax: prompt and padding cost nothing here.
    """
    targets = torch.roll(labels, -1, dims=1)[scored]
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    tasks = token_tasks[scored]
    zeros = torch.zeros(num_tasks, dtype=token_loss.dtype, device=logits.device)
    return zeros.index_add(0, tasks, token_loss), zeros.index_add(0, tasks, torch.ones_like(token_loss))
