"""The lean forward (LM head only at scored positions) gives the full forward's per-task losses and
gradients, on every architecture it is enabled for, under LoRA, and falls back where it is not."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model

from mtft.data.batch import Batch
from mtft.data.collator import TaskCollator
from mtft.engine.evaluation import task_losses
from mtft.engine.forward import LEAN_MODEL_TYPES, supports_lean_head, task_token_loss
from mtft.engine.loss import scored_positions
from tests.test_loss import random_batch

from conftest import tiny_lm

VOCAB, TASKS = 61, 4


def tiny(model_type: str, **extra) -> torch.nn.Module:
    return tiny_lm(model_type, VOCAB, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def head_rows(model: torch.nn.Module, batch: Batch, lean: bool | None) -> tuple[tuple, int]:
    """(sums, counts) of `task_token_loss` and how many positions the output head projected."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(out.reshape(-1, out.shape[-1]).shape[0])
    )
    try:
        result = task_token_loss(model, batch, TASKS, lean=lean)
    finally:
        hook.remove()
    return result, sum(seen)


def grads(model: torch.nn.Module, batch: Batch, lean: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    sums, counts = task_token_loss(model, batch, TASKS, lean=lean)
    (sums / counts.clamp_min(1)).sum().backward()
    return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_lean_equals_full(model: torch.nn.Module, batch: Batch) -> None:
    scored = int(scored_positions(batch.labels).sum())
    assert supports_lean_head(model)
    (lean, lean_rows), (full, full_rows) = head_rows(model, batch, None), head_rows(model, batch, False)
    assert lean_rows == scored < full_rows == batch.input_ids.numel()  # the lean path was taken
    torch.testing.assert_close(lean[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean[1], full[1])
    assert lean[1][TASKS - 1] == 0 and lean[1].sum() == scored  # the absent task stays absent
    (_, g_lean), (_, g_full) = grads(model, batch, True), grads(model, batch, False)
    assert g_lean.keys() == g_full.keys() and g_lean
    for name in g_full:
        torch.testing.assert_close(g_lean[name], g_full[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", sorted(LEAN_MODEL_TYPES))
def test_lean_head_equals_full_forward(model_type):
    # Gemma 2 with final-logit soft-capping: the model's own forward applies it to the kept logits.
    extra = {"final_logit_softcapping": 3.0} if model_type == "gemma2" else {}
    _, batch = random_batch(vocab=VOCAB)
    assert_lean_equals_full(tiny(model_type, **extra), batch)


def test_lean_head_under_lora_including_the_output_head():
    _, batch = random_batch(seed=2, vocab=VOCAB)
    targets = ["q_proj", "v_proj", "lm_head"]
    model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    assert_lean_equals_full(model, batch)


def test_other_architectures_and_prompt_learning_take_the_full_forward():
    _, batch = random_batch(seed=3, vocab=VOCAB)
    opt = tiny("opt", ffn_dim=64, word_embed_proj_dim=32)
    assert not supports_lean_head(opt)
    (sums, counts), rows = head_rows(opt, batch, None)
    assert rows == batch.input_ids.numel()
    torch.testing.assert_close(sums, head_rows(opt, batch, False)[0][0])
    prefix = get_peft_model(tiny("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert not supports_lean_head(prefix)


def test_wrapped_models_are_looked_through():
    class Wrapper(torch.nn.Module):  # what DDP and DeepSpeed's engine look like from here
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    assert supports_lean_head(Wrapper(tiny("llama")))
    assert not supports_lean_head(Wrapper(tiny("opt", ffn_dim=64, word_embed_proj_dim=32)))


def test_evaluation_uses_the_lean_forward_with_the_full_losses():
    _, batch = random_batch(seed=4, vocab=VOCAB)
    rows = [
        {"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist(), "task_id": int(t)}
        for ids, lab, m, t in zip(
            batch.input_ids, batch.labels, batch.attention_mask, batch.task_ids, strict=True
        )
    ]
    validation = SimpleNamespace(__getitems__=lambda idx: [rows[i] for i in idx])
    data = SimpleNamespace(tasks=[f"t{i}" for i in range(TASKS)], validation=validation)
    model = tiny("llama")
    means, present = task_losses(
        model, data, list(range(len(rows))), TaskCollator(0), 4, torch.device("cpu"), nullcontext
    )
    with torch.no_grad():
        sums, counts = task_token_loss(model, batch, TASKS, lean=False)
    torch.testing.assert_close(means, sums / counts.clamp_min(1), rtol=1e-5, atol=1e-5)
    assert present.tolist() == [True, True, True, False]
