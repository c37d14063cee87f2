"""`mtft eval`'s measurements: per task, token loss and perplexity over its validation examples and
the task's generation metrics; written as eval.json and eval_samples.jsonl, shown as a table.

Under several processes each rank takes every W-th example (loss and generation alike) and the
results are combined, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

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
from mtft.core.jsonfile import finite_or_none, write_jsonl
from mtft.core.rundir import EVAL_SAMPLES, EvalResult, EvalTask, Generation
from mtft.data.collator import TaskCollator
from mtft.data.config import DataConfig, TaskConfig
from mtft.data.encode import Encoder
from mtft.data.prepared import Data
from mtft.engine.evaluation import task_losses
from mtft.eval.config import EvalConfig
from mtft.eval.generate import conversation_prompts, generate
from mtft.eval.metrics import normalize, score


def evaluate(
    model: torch.nn.Module,
    data: Data,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    label: str,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    tasks: list[str] | None = None,
) -> tuple[EvalResult, list[dict[str, Any]]]:
    """(eval.json's content, one sample row per generated example) for `model` on `data`'s tasks
    (or only `tasks`)."""
    n = eval_cfg.max_samples
    mixture = data.mixture
    chosen = [t for t in mixture.tasks if tasks is None or t in tasks]
    device = next(model.parameters()).device
    rows = [r for t in chosen for r in mixture.val_rows[mixture.tasks.index(t)][:n]]
    collate = TaskCollator(data.tokenizer.pad_token_id)
    losses, present = task_losses(
        model, mixture, rows[rank() :: world_size()], collate, eval_cfg.batch_size, device, autocast
    )
    results: dict[str, EvalTask] = {}
    samples: list[dict[str, Any]] = []
    encoder = Encoder(data.tokenizer, data_cfg.max_length, data.template)
    for task in chosen:
        task_id = mixture.tasks.index(task)
        loss = float(losses[task_id]) if bool(present[task_id]) else math.nan
        entry = EvalTask(
            examples=len(mixture.val_rows[task_id][:n]),
            loss=finite_or_none(loss),
            perplexity=finite_or_none(math.exp(loss) if loss < 700 else math.inf),
            metrics={},
            score=None,
        )
        task_cfg = data_cfg.tasks[task]
        if task_cfg.metrics and data.conversations is not None:
            entry.metrics, task_samples = _generate_task(
                model, data, encoder, task_cfg, eval_cfg, task, autocast
            )
            entry.score = entry.metrics[str(task_cfg.metrics[0])]
            samples += task_samples
        results[task] = entry
    scores = [t.score for t in results.values() if t.score is not None]
    losses_seen = [t.loss for t in results.values() if t.loss is not None]
    result = EvalResult(
        model=label,
        max_samples=n,
        generation=Generation(eval_cfg.temperature, eval_cfg.top_p, eval_cfg.seed, eval_cfg.max_new_tokens),
        tasks=results,
        mean_loss=statistics.fmean(losses_seen) if losses_seen else None,
        mean_score=statistics.fmean(scores) if scores else None,
    )
    return result, samples


def _generate_task(
    model: torch.nn.Module,
    data: Data,
    encoder: Encoder,
    task_cfg: TaskConfig,
    eval_cfg: EvalConfig,
    task: str,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    assert data.conversations is not None
    conversations = data.conversations.validation[task]
    count = (
        len(conversations) if eval_cfg.max_samples is None else min(eval_cfg.max_samples, len(conversations))
    )
    prompts = conversation_prompts(encoder, conversations.select(range(count)))
    mine = prompts[rank() :: world_size()]
    answers = gather_shards(
        generate(model, data.tokenizer, mine, eval_cfg, task_cfg.max_new_tokens, autocast)
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


def write_eval(out_dir: Path, result: EvalResult, samples: list[dict[str, Any]]) -> list[Path]:
    """eval.json and eval_samples.jsonl into `out_dir`, each written whole (strict JSON)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / EVAL_SAMPLES, samples, ensure_ascii=False)
    return [result.write(out_dir), out_dir / EVAL_SAMPLES]


def print_table(result: EvalResult, stderr: bool = False) -> None:
    """The table on stdout (or stderr); off a terminal 160 columns wide, so no task name is cut."""
    console = Console(stderr=stderr)
    (console if console.is_terminal else Console(stderr=stderr, width=160)).print(eval_table(result))


def eval_table(result: EvalResult) -> Table:
    """Per task: examples, loss, perplexity and each of its metrics; then the means."""
    names = sorted({m for t in result.tasks.values() for m in t.metrics})
    table = Table(title=f"mtft eval: {result.model}")
    for column in ("task", "examples", "loss", "perplexity", *names, "score"):
        table.add_column(column, justify="left" if column == "task" else "right")

    def fmt(x: float | None, digits: int) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    for task, t in result.tasks.items():
        metrics = [fmt(t.metrics.get(m), 1) for m in names]
        row = [str(t.examples), fmt(t.loss, 3), fmt(t.perplexity, 2), *metrics, fmt(t.score, 1)]
        table.add_row(task, *row)
    table.add_section()
    table.add_row("mean", "", fmt(result.mean_loss, 3), "", *[""] * len(names), fmt(result.mean_score, 1))
    return table
