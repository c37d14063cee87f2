"""Per-task loss in one vectorised pass over the batch (no Python loop over samples)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtft.data.collator import IGNORE_INDEX


def per_task_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy and number of learned tokens, per task.

    The mean loss of task i is `sums[i] / counts[i]`: a token mean over all unmasked tokens of task
    i's sequences. Returning sums and counts (not means) lets ranks and micro-batches be added exactly.
    Only learned positions go through the softmax: prompt and padding cost nothing here. `task_ids`
    is per row `(batch,)`, or per token `(batch, length)` for packed rows holding several examples.
    """
    shift_labels = labels[:, 1:]
    learned = shift_labels != IGNORE_INDEX
    token_loss = F.cross_entropy(logits[:, :-1, :][learned].float(), shift_labels[learned], reduction="none")
    if task_ids.dim() == 2:  # the task of the predicting position (an example's own, see mtft.data.packing)
        token_task = task_ids[:, :-1][learned]
    else:
        token_task = task_ids[learned.nonzero(as_tuple=True)[0]]
    sums = torch.zeros(num_tasks, dtype=token_loss.dtype, device=logits.device).scatter_add(
        0, token_task, token_loss
    )
    counts = torch.zeros(num_tasks, dtype=token_loss.dtype, device=logits.device).scatter_add(
        0, token_task, torch.ones_like(token_loss)
    )
    return sums, counts
