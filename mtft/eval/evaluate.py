"""`mtft eval`'s measurements: per task, token loss and perplexity over its validation examples and
the task's generation metrics; written as eval.json and eval_samples.jsonl, shown as a table.

Under several processes each rank takes every W-th example (loss and generation alike) and the
results are combined, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mtft.core.dist import gather_shards, rank, world_size
from mtft.core.rundir import EVAL, EVAL_SAMPLES
from mtft.data.collator import TaskCollator
from mtft.data.encode import Encoder
from mtft.engine.evaluation import task_losses
from mtft.eval.generate import conversation_prompts, generate
from mtft.eval.metrics import normalize, score
from mtft.recipe.builders import Data
from mtft.recipe.config import TrainConfig


def evaluate(
    model: torch.nn.Module,
    data: Data,
    cfg: TrainConfig,
    label: str,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    tasks: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(eval.json's content, one sample row per generated example) for `model` on `data`'s tasks
    (or only `tasks`)."""
    n = cfg.eval.max_samples
    mixture = data.mixture
    chosen = [t for t in mixture.tasks if tasks is None or t in tasks]
    device = next(model.parameters()).device
    rows = [r for t in chosen for r in mixture.val_rows[mixture.tasks.index(t)][:n]]
    collate = TaskCollator(data.tokenizer.pad_token_id)
    losses, present = task_losses(
        model, mixture, rows[rank() :: world_size()], collate, cfg.eval.batch_size, device, autocast
    )
    results: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    encoder = Encoder(data.tokenizer, cfg.data.max_length, data.template)
    for task in chosen:
        task_id = mixture.tasks.index(task)
        loss = float(losses[task_id]) if bool(present[task_id]) else math.nan
        entry: dict[str, Any] = {
            "examples": len(mixture.val_rows[task_id][:n]),
            "loss": _num(loss),
            "perplexity": _num(math.exp(loss) if loss < 700 else math.inf),
            "metrics": {},
            "score": None,
        }
        task_cfg = cfg.data.tasks[task]
        if task_cfg.metrics and data.conversations is not None:
            entry["metrics"], task_samples = _generate_task(model, data, encoder, cfg, task, autocast)
            entry["score"] = entry["metrics"][str(task_cfg.metrics[0])]
            samples += task_samples
        results[task] = entry
    scores = [t["score"] for t in results.values() if t["score"] is not None]
    losses_seen = [t["loss"] for t in results.values() if t["loss"] is not None]
    result = {
        "model": label,
        "max_samples": n,
        "generation": {k: getattr(cfg.eval, k) for k in ("temperature", "top_p", "seed", "max_new_tokens")},
        "tasks": results,
        "mean_loss": statistics.fmean(losses_seen) if losses_seen else None,
        "mean_score": statistics.fmean(scores) if scores else None,
    }
    return result, samples


def _generate_task(
    model: torch.nn.Module,
    data: Data,
    encoder: Encoder,
    cfg: TrainConfig,
    task: str,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    assert data.conversations is not None
    conversations = data.conversations.validation[task]
    count = (
        len(conversations) if cfg.eval.max_samples is None else min(cfg.eval.max_samples, len(conversations))
    )
    prompts = conversation_prompts(encoder, conversations.select(range(count)))
    task_cfg = cfg.data.tasks[task]
    mine = prompts[rank() :: world_size()]
    answers = gather_shards(
        generate(model, data.tokenizer, mine, cfg.eval, task_cfg.max_new_tokens, autocast)
    )
    norm = {"strip": task_cfg.metric_strip, "lowercase": task_cfg.metric_lowercase}
    predictions = [normalize(a, **norm) for a in answers]
    references = [normalize(p.reference or "", **norm) for p in prompts]
    metrics, each = {}, {}
    for metric in task_cfg.metrics:
        metrics[str(metric)], each[str(metric)] = score(metric, predictions, references)
    samples = [
        {
            "task": task,
            "prompt": data.tokenizer.decode(p.ids, skip_special_tokens=False),
            "reference": p.reference,
            "prediction": answer,
            "scores": {m: values[i] for m, values in each.items()},
        }
        for i, (p, answer) in enumerate(zip(prompts, answers, strict=True))
    ]
    return metrics, samples


def _num(x: float) -> float | None:
    """eval.json is strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


def write_eval(out_dir: Path, result: dict[str, Any], samples: list[dict[str, Any]]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EVAL).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    with open(out_dir / EVAL_SAMPLES, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    return [out_dir / EVAL, out_dir / EVAL_SAMPLES]


def print_table(result: dict[str, Any], stderr: bool = False) -> None:
    """The table on stdout (or stderr); off a terminal 160 columns wide, so no task name is cut."""
    console = Console(stderr=stderr)
    (console if console.is_terminal else Console(stderr=stderr, width=160)).print(eval_table(result))


def eval_table(result: dict[str, Any]) -> Table:
    """Per task: examples, loss, perplexity and each of its metrics; then the means."""
    names = sorted({m for t in result["tasks"].values() for m in t["metrics"]})
    table = Table(title=f"mtft eval: {result['model']}")
    for column in ("task", "examples", "loss", "perplexity", *names, "score"):
        table.add_column(column, justify="left" if column == "task" else "right")

    def fmt(x: float | None, digits: int) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    for task, t in result["tasks"].items():
        metrics = [fmt(t["metrics"].get(m), 1) for m in names]
        row = [str(t["examples"]), fmt(t["loss"], 3), fmt(t["perplexity"], 2), *metrics, fmt(t["score"], 1)]
        table.add_row(task, *row)
    table.add_section()
    table.add_row(
        "mean", "", fmt(result["mean_loss"], 3), "", *[""] * len(names), fmt(result["mean_score"], 1)
    )
    return table
