"""`trainer.sample_interval=N`: answers to a few fixed validation prompts per task every N steps, so
what the model produces can be watched as it trains (console, samples.jsonl, W&B, TensorBoard)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from mtft.core.dist import rank
from mtft.data.config import DataConfig
from mtft.data.encode import Encoder
from mtft.data.prepared import Data
from mtft.eval.config import EvalConfig
from mtft.eval.generate import conversation_prompts, generate
from mtft.loggers.base import Row, Tracker

log = logging.getLogger("mtft")


class TrainingSamples:
    """Called by the loop after every step; generates (on rank 0 only) when the step is due."""

    def __init__(
        self,
        interval: int,
        data: Data,
        data_cfg: DataConfig,
        eval_cfg: EvalConfig,
        module: torch.nn.Module,
        tracker: Tracker,
        autocast: Callable[[], AbstractContextManager],
    ) -> None:
        assert data.conversations is not None
        self.interval, self.data, self.eval_cfg = interval, data, eval_cfg
        self.module, self.tracker, self.autocast = module, tracker, autocast
        self.limits = {task: data_cfg.tasks[task].max_new_tokens for task in data.tasks}
        encoder = Encoder(data.tokenizer, data_cfg.max_length, data.template)
        k = eval_cfg.sample_prompts
        self.prompts = {
            task: conversation_prompts(encoder, ds.select(range(min(k, len(ds)))))
            for task, ds in data.conversations.validation.items()
        }

    def __call__(self, step: int) -> None:
        if step % self.interval or rank() != 0:
            return
        rows: list[Row] = []
        for task, prompts in self.prompts.items():
            answers = generate(
                self.module, self.data.tokenizer, prompts, self.eval_cfg, self.limits[task], self.autocast
            )
            for p, answer in zip(prompts, answers, strict=True):
                prompt = self.data.tokenizer.decode(p.ids, skip_special_tokens=True)
                rows.append(
                    {
                        "step": step,
                        "task": task,
                        "prompt": prompt,
                        "reference": p.reference,
                        "prediction": answer,
                    }
                )
        shown = "\n".join(f"  {r['task']}: {r['prediction'][:120]!r}" for r in rows)
        log.info("step %d samples:\n%s", step, shown)
        self.tracker.log_samples(step, rows)
