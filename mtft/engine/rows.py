"""The metrics rows the loop logs (docs/design.md, "The run directory"): per task, then the mixture
(`task: all`), for each training step logged and each evaluation."""

from __future__ import annotations

import math

import torch

from mtft.core.jsonfile import finite_or_none
from mtft.engine.progress import StepStats
from mtft.loggers.base import Row


def val_rows(step: int, tasks: list[str], values: list[float]) -> list[Row]:
    """Each task's validation loss, then their mean."""
    rows: list[Row] = [
        {"step": step, "split": "val", "task": t, "loss": finite_or_none(v)}
        for t, v in zip(tasks, values, strict=True)
    ]
    rows.append(
        {"step": step, "split": "val", "task": "all", "loss": finite_or_none(sum(values) / len(values))}
    )
    return rows


def train_rows(
    step: int,
    tasks: list[str],
    stats: StepStats,
    weights: torch.Tensor,
    lr: float,
    diagnostics: dict[str, float],
) -> list[Row]:
    """Per task: its loss in this step's batch (null if absent) and the weight applied; then the
    mixture's loss, learning rate, tokens, gradient norm and the balancer's `diagnostics`."""
    rows: list[Row] = [
        {
            "step": step,
            "split": "train",
            "task": task,
            "loss": finite_or_none(value) if has else None,
            "weight": w,
        }
        for task, value, has, w in zip(
            tasks, stats.mean.tolist(), stats.present.tolist(), weights.tolist(), strict=True
        )
    ]
    summary: Row = {
        "step": step,
        "split": "train",
        "task": "all",
        "loss": finite_or_none(stats.loss) if stats.applied else None,
        "lr": lr,
        "tokens": stats.tokens,
        "tokens_per_s": stats.tokens / stats.seconds if stats.seconds else 0.0,
    }
    if math.isfinite(stats.grad_norm):
        summary["grad_norm"] = stats.grad_norm
    if not stats.applied:
        summary["skipped"] = True
    summary.update(diagnostics)
    rows.append(summary)
    return rows
