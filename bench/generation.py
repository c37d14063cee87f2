"""Generation throughput: `mtft eval`'s batched generation (left-padded prompts, KV cache) against
generating for one prompt at a time, on the same prompts with the same model and settings.

Prompts are the codetasks validation prompts exactly as `mtft eval` builds them (the tokens before the
first learned one), spread over the four tasks; the model is the untrained tiny Llama, so answers run to
`max_new_tokens` and both sides do the same work. Greedy answers are checked to be identical.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import Setup
from mtft.data.collator import IGNORE_INDEX
from mtft.eval.config import EvalConfig
from mtft.eval.generate import Prompt, generate


def prompts(setup: Setup, n: int) -> list[Prompt]:
    """The first n / T validation prompts of each of the T tasks."""
    data, out = setup.data, []
    for rows in data.val_rows:
        for row in data.validation.select(rows[: n // len(data.val_rows)]):
            first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
            out.append(Prompt(row["input_ids"][:first]))
    return out


def run(
    setup: Setup, n: int, max_new_tokens: int, batch_size: int, reps: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    model = setup.model().eval()
    asked = prompts(setup, n)
    sides = {"batched": batch_size, "single": 1}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    answers: dict[str, list[str]] = {}
    for rep in range(reps):
        for side in sorted(sides, reverse=rep % 2 == 1):  # alternate which side goes first
            cfg = EvalConfig(batch_size=sides[side], max_new_tokens=max_new_tokens)
            t0 = time.perf_counter()
            answers[side] = generate(model, setup.tokenizer, asked, cfg)
            seconds[side].append(time.perf_counter() - t0)
            log(f"generation rep {rep + 1}/{reps}, {side}: {seconds[side][-1]:.2f} s")
    if answers["batched"] != answers["single"]:
        raise AssertionError("batched and one-at-a-time greedy generation gave different answers")
    tokens = sum(len(setup.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers["single"])
    ratios = [s / b for b, s in zip(seconds["batched"], seconds["single"], strict=True)]
    return {
        "prompts": len(asked),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "reps": reps,
        "answer_tokens": tokens,
        "tokens_per_s": {side: tokens / statistics.median(s) for side, s in seconds.items()},
        "ratio": statistics.median(ratios),
        "threads": torch.get_num_threads(),
    }


def render(g: dict[str, Any]) -> str:
    tps = g["tokens_per_s"]
    return "\n".join(
        [
            "| generation | answer tokens/s (median) | vs one at a time |",
            "|---|---:|---:|",
            f"| one prompt at a time | {tps['single']:,.0f} | 1.00x |",
            f"| batched ({g['batch_size']} prompts, left-padded, KV cache) | {tps['batched']:,.0f} | "
            f"**{g['ratio']:.2f}x** |",
            "",
            f"{g['prompts']} codetasks validation prompts (a quarter per task), greedy, up to "
            f"{g['max_new_tokens']} new tokens each ({g['answer_tokens']:,} answer tokens in all), "
            f"{g['reps']} repetitions alternating the order; the ratio is the median of the per-repetition "
            "ratios. Both sides gave the same answers (checked).",
        ]
    )
