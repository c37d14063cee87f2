"""Throughput: useful (non-padding) training tokens per second of mtft's loop against a minimal
hand-written PyTorch loop and the Hugging Face `Trainer`, on the same model, batches and optimizer.

The sides run in one process, one after another, in a rotating order, several times; each side's
figure is the median over repetitions, and each ratio the median of the per-repetition ratios (the
sides of one repetition ran back to back, so they saw the same machine load).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import PrinterCallback, TrainerCallback, TrainingArguments
from transformers import Trainer as HFTrainer

from bench.common import Setup, Timing, median, run_mtft
from mtft.data.batch import Batch
from mtft.data.collator import IGNORE_INDEX
from mtft.data.packing import PackedRows
from mtft.engine.backend import build_optimizer, build_scheduler

SIDES = ("bare", "hf", "mtft", "mtft_grouped", "bare_packed", "hf_packed", "mtft_packed")
PACKED = ("bare_packed", "hf_packed", "mtft_packed")  # packed rows of the same bins on every side
LABELS = {
    "bare": "bare PyTorch loop",
    "hf": "Hugging Face Trainer",
    "mtft": "mtft",
    "mtft_grouped": "mtft, data.group_by_length=true",
    "bare_packed": "bare PyTorch loop, packed",
    "hf_packed": "Hugging Face Trainer, packed (padding-free)",
    "mtft_packed": "mtft, data.packing=true",
}


def _loader(setup: Setup, with_task_ids: bool, packing: bool = False) -> DataLoader:
    """The mtft sampler's batches, collated by mtft's collator (task ids dropped for plain LM losses).
    With `packing`, packed rows (position ids, no attention mask) of the same sampler's bins."""
    collate = setup.collator(packing)

    def plain(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(rows)
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name != "task_ids"}

    dataset = PackedRows(setup.data.train) if packing else setup.data.train
    return DataLoader(
        dataset, batch_sampler=setup.sampler(packing=packing), collate_fn=collate if with_task_ids else plain
    )


def _optimizer_and_schedule(model: torch.nn.Module, setup: Setup, steps: int) -> tuple[Any, Any]:
    """mtft's own AdamW and LR schedule, for a run of `steps` steps: every loop gets the same."""
    cfg = dataclasses.replace(setup.cfg.trainer, max_steps=steps)
    optimizer = build_optimizer(model, cfg)
    return optimizer, build_scheduler(optimizer, cfg)


def run_bare(setup: Setup, steps: int, warmup: int, packing: bool = False) -> Timing:
    """The minimal loop: forward, token cross-entropy, backward, clip, AdamW step, LR schedule."""
    cfg = setup.cfg.trainer
    model = setup.model()
    optimizer, scheduler = _optimizer_and_schedule(model, setup, steps)
    batches: Iterator[Batch] = iter(_loader(setup, with_task_ids=True, packing=packing))
    model.train()
    stamps, tokens = [], []
    for _ in range(steps):
        batch = next(batches)
        logits = model(**batch.model_inputs()).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        tokens.append(int(batch.num_tokens()))
    return Timing(stamps, tokens, warmup)


class _StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())


class _SameBatchesTrainer(HFTrainer):
    """HF Trainer fed mtft's batches (its documented `get_train_dataloader` hook), so both see the same data."""

    def __init__(self, *args: Any, loader_fn: Callable[[], DataLoader], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loader_fn = loader_fn

    def get_train_dataloader(self) -> DataLoader:
        return self._loader_fn()


def run_hf(setup: Setup, steps: int, warmup: int, packing: bool = False) -> Timing:
    """transformers.Trainer with the same optimizer object, schedule, clipping and batches. Packed
    batches reach it as TRL's `padding_free` / `DataCollatorWithFlattening` batches do: position ids
    restarting per example, no attention mask (the Trainer turns the model's KV cache off)."""
    cfg = setup.cfg.trainer
    model = setup.model()
    optimizer, scheduler = _optimizer_and_schedule(model, setup, steps)
    clock = _StepClock()
    with tempfile.TemporaryDirectory(prefix="mtft-bench-hf-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm or 0.0,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=setup.cfg.seed,
        )
        trainer = _SameBatchesTrainer(
            model=model,
            args=args,
            optimizers=(optimizer, scheduler),
            callbacks=[clock],
            loader_fn=lambda: _loader(setup, with_task_ids=False, packing=packing),
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        trainer.train()
    return Timing(clock.stamps, setup.step_tokens(steps, packing=packing), warmup)


def run_side(side: str, setup: Setup, steps: int, warmup: int) -> Timing:
    packing = side in PACKED
    if side.startswith("bare"):
        return run_bare(setup, steps, warmup, packing)
    if side.startswith("hf"):
        return run_hf(setup, steps, warmup, packing)
    if side == "mtft_grouped":
        return run_mtft(setup, steps, warmup, group_by_length=True)
    if side.startswith("mtft"):
        return run_mtft(setup, steps, warmup, packing=packing)
    raise ValueError(side)


def padding_waste(setup: Setup, batches: int, group_by_length: bool) -> dict[str, float]:
    """Share of the padded batch that is padding, over the first `batches` batches of the stream."""
    it = iter(setup.sampler(group_by_length=group_by_length))
    real = padded = 0
    for _ in range(batches):
        lengths = [setup.lengths[i] for i in next(it)]
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
    return {"real_tokens": real, "padded_tokens": padded, "waste": 1 - real / padded}


def packed_waste(setup: Setup) -> dict[str, float]:
    """Share of the packed rows (of `data.max_length` tokens) that is padding, over one epoch of examples."""
    it = iter(setup.sampler(packing=True))
    real = rows = examples = 0
    while examples < len(setup.lengths):
        for row in next(it):
            real += sum(setup.lengths[i] for i in row)
            examples += len(row)
            rows += 1
    padded = rows * setup.cfg.data.max_length
    return {"real_tokens": real, "padded_tokens": padded, "waste": 1 - real / padded, "rows": rows}


def run(
    setup: Setup, reps: int, steps: int, warmup: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """All sides, `reps` times in rotating order; medians and paired ratios."""
    expected = {False: setup.step_tokens(steps), True: setup.step_tokens(steps, packing=True)}
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
    for rep in range(reps):
        order = SIDES[rep % len(SIDES) :] + SIDES[: rep % len(SIDES)]
        for side in order:
            t = run_side(side, setup, steps, warmup)
            if side != "mtft_grouped" and t.tokens != expected[side in PACKED]:
                raise RuntimeError(f"{side} did not train on the same batches as the others")
            results[side].append(
                {"tokens_per_s": t.tokens_per_s, "median_step_s": t.median_step_s, "seconds": t.seconds}
            )
            log(
                f"  rep {rep + 1}/{reps} {side:13s} {t.tokens_per_s:8.0f} tokens/s  median step {t.median_step_s * 1000:6.1f} ms"
            )
    summary: dict[str, Any] = {"reps": reps, "steps": steps, "warmup": warmup, "sides": {}, "ratios": {}}
    for side in SIDES:
        summary["sides"][side] = {
            "tokens_per_s": median([r["tokens_per_s"] for r in results[side]]),
            "median_step_s": median([r["median_step_s"] for r in results[side]]),
            "tokens_per_s_all": [r["tokens_per_s"] for r in results[side]],
        }
    for a, b in (
        ("mtft", "bare"),
        ("mtft", "hf"),
        ("hf", "bare"),
        ("mtft_grouped", "mtft"),
        ("mtft_grouped", "bare"),
        ("mtft_packed", "mtft"),
        ("mtft_packed", "mtft_grouped"),
        ("mtft_packed", "bare_packed"),
        ("mtft_packed", "hf_packed"),
        ("hf_packed", "bare_packed"),
    ):
        summary["ratios"][f"{a}/{b}"] = median(
            [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(results[a], results[b], strict=True)]
        )
    epoch_batches = len(setup.lengths) // setup.cfg.trainer.batch_size
    summary["padding"] = {
        "plain": padding_waste(setup, epoch_batches, False),
        "grouped": padding_waste(setup, epoch_batches, True),
        "packed": packed_waste(setup),
        "batches": epoch_batches,
    }
    return summary
