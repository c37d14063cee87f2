"""Prompts as the model saw them in training, and batched generation from them.

A prompt is the rendered conversation up to its last answer, tokenized by the training encoder
(`Encoder.prompt`), so the model is asked exactly as it was taught. Generation is `model.generate`
over batches of similar-length prompts, left-padded, with the KV cache, stopping at eos or at the
template's end-of-turn token; greedy unless a temperature is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from mtft.core.errors import MtftError
from mtft.data.encode import Encoder
from mtft.eval.config import EvalConfig


@dataclass
class Prompt:
    ids: list[int]
    reference: str | None = None  # the example's own answer (None for a user's prompt)
    end: str = ""  # the text that ends an answer (end-of-turn marker or eos token)


def conversation_prompts(encoder: Encoder, conversations: Sequence[dict]) -> list[Prompt]:
    """One prompt per conversation (rows with `roles` and `contents`, ending with an assistant turn)."""
    out = []
    for row in conversations:
        if row["roles"][-1] != "assistant":
            raise MtftError(
                "a task of plain text records has no prompt and answer to generate: drop its metrics "
                "(mtft eval still reports its loss and perplexity)"
            )
        ids, end = encoder.prompt(row["roles"], row["contents"])
        out.append(Prompt(ids, row["contents"][-1], end))
    return out


def stop_ids(tokenizer, prompts: Sequence[Prompt]) -> list[int]:
    """eos, and the first token of each end-of-turn marker (`<|im_end|>` for ChatML)."""
    ids = {tokenizer.eos_token_id}
    for end in {p.end.strip() for p in prompts} - {""}:
        first = tokenizer(end, add_special_tokens=False)["input_ids"][:1]
        ids.update(first)
    return sorted(ids)


def _generation_config(cfg: EvalConfig, max_new_tokens: int, stop: list[int], pad: int) -> GenerationConfig:
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=stop,
        pad_token_id=pad,
        use_cache=True,
        **(sampling if cfg.temperature > 0 else {"do_sample": False}),
    )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    cfg: EvalConfig,
    max_new_tokens: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[str]:
    """The answer to each prompt, decoded up to (not including) its stop token or end marker."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    new = max_new_tokens or cfg.max_new_tokens
    stop = stop_ids(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_cfg = _generation_config(cfg, new, stop, pad)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    keep = max(context - new, 1) if context else None  # the prompt's last tokens, so the answer fits
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))  # less padding per batch
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    if cfg.temperature > 0:
        torch.manual_seed(cfg.seed)
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start : start + cfg.batch_size]
        rows = [prompts[i].ids[-keep:] if keep else prompts[i].ids for i in chunk]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with autocast():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg)
        for i, ids in zip(chunk, out[:, width:].tolist(), strict=True):
            cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
            text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
            end = prompts[i].end.strip()
            answers[i] = text.split(end)[0] if end else text
    model.train(was_training)
    return answers
