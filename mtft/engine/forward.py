"""The model forward that yields per-task token losses, with the LM head applied only where a token is scored.

Only response tokens are learned, so most positions of a batch (prompt and padding, often well over
half) never reach the loss; yet a plain forward projects every position onto the vocabulary, and on
small-to-medium models that projection is a large share of the forward. transformers' own
`logits_to_keep` argument takes a boolean `(batch, length)` mask and returns logits for the kept
positions only, flattened to `(kept, vocab)`, with the model's own output processing (e.g. Gemma 2's
final-logit soft-capping) applied to them: so the lean forward is the model's forward, not a copy of it.

It is used only for architectures whose causal-LM forward is known to slice with that mask and do
nothing position-dependent afterwards (`LEAN_MODEL_TYPES`, every one of them checked against the full
forward in tests/test_forward.py), through PEFT LoRA wrappers (LoRA on `lm_head` included), DDP and
DeepSpeed, which pass the argument through. Anything else (another architecture, PEFT prompt learning,
a transformers without boolean `logits_to_keep`) takes the full forward: same losses, more work.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from mtft.data.batch import Batch
from mtft.engine.loss import scored_positions, scored_token_loss

# Causal LMs whose forward is `lm_head(slice_logits_to_keep(hidden, logits_to_keep))` followed only by
# element-wise ops (Gemma 2's soft-capping): each is tested lean == full.
LEAN_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "starcoder2"}
)


def task_token_loss(
    model: torch.nn.Module, batch: Batch, num_tasks: int, lean: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy and number of learned tokens, per task, of one batch.

    `lean=None` uses the lean head where `supports_lean_head(model)`; False forces the full forward.
    Differentiable when called with gradients enabled.
    """
    inputs = batch.model_inputs()
    scored = scored_positions(batch.labels)
    if lean is None:
        lean = supports_lean_head(model)
    logits = model(**inputs, logits_to_keep=scored).logits if lean else model(**inputs).logits[scored]
    return scored_token_loss(logits, batch.labels, batch.token_task_ids(), scored, num_tasks)


def supports_lean_head(model: torch.nn.Module) -> bool:
    """Whether `model` (bare, PEFT, DDP or DeepSpeed wrapped) takes the lean path (module docstring)."""
    inner: Any = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP, DeepSpeed
        inner = inner.module
    peft_config = getattr(inner, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False  # virtual tokens shift the positions the mask would name
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    return model_type in LEAN_MODEL_TYPES and _boolean_logits_to_keep()


@functools.cache
def _boolean_logits_to_keep() -> bool:
    """transformers slices hidden states by a boolean `logits_to_keep` mask (recent 5.x; not 4.x)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    hidden = torch.arange(4.0).reshape(1, 2, 2)
    try:
        kept = slice_logits_to_keep(hidden, torch.tensor([[False, True]]))
    except (TypeError, IndexError, RuntimeError):
        return False
    return kept.shape == (1, 2) and kept.tolist() == [[2.0, 3.0]]


def task_token_loss_by_task(
    model: torch.nn.Module, batch: Batch, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None] | None]:
    """`task_token_loss` with each task's rows in a forward of their own (`Balancer.per_task_rows`).

    Returns the same sums and counts, and `parts`: task i's sum as an autograd root of its own, whose
    graph covers task i's rows alone (None if the batch has none). `autograd.grad` of a part costs in
    proportion to that task's rows, so the gradients of all tasks together cost one backward of the
    batch whatever the number of tasks (the stacked `sums` would drag every task's graph along). Under
    DDP only the last forward prepares the gradient all-reduce (DDP allows one per backward). Rows that
    hold several tasks (packed rows) cannot be split by row: they take the one-forward path and
    `parts` is None.
    """
    by_task = batch.by_task()
    if by_task is None:
        return (*task_token_loss(model, batch, num_tasks), None)
    parts: list[torch.Tensor | None] = [None] * num_tasks
    counts = torch.zeros(num_tasks, device=batch.task_ids.device)
    for k, (task, part) in enumerate(by_task):
        ddp_defer = isinstance(model, DistributedDataParallel) and k < len(by_task) - 1
        with model.no_sync() if ddp_defer else contextlib.nullcontext():
            s, c = task_token_loss(model, part, num_tasks)
        parts[task] = s[task]
        counts += c
    zero = counts.new_zeros(())
    return torch.stack([zero if p is None else p for p in parts]), counts, parts
