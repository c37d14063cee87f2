"""The training loop: forward -> per-task losses -> balancer.combine -> backward/step -> balancer.observe.

Kept to one readable loop; everything it needs (model, data, sampler, balancer, tracker) is built
by the recipe in `mtft.train` and handed in.
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import get_scheduler

from mtft.balancers.base import Balancer, TaskLosses
from mtft.config import TrainerConfig
from mtft.data.collator import TaskCollator
from mtft.data.mixture import TokenizedMixture
from mtft.data.sampler import MixtureSampler
from mtft.distributed import all_reduce_sum, world_size
from mtft.errors import MtftError
from mtft.evaluation import fixed_eval_rows, random_eval_rows, task_losses
from mtft.loss import per_task_token_loss
from mtft.tracking import Row, Tracker


@dataclass
class TrainResult:
    steps: int
    val_history: dict[int, list[float]] = field(default_factory=dict)  # step -> loss per task
    train_tokens: int = 0
    train_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases), as is standard for LMs."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise MtftError(f"trainer.precision must be fp32 or bf16, got '{precision}'")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MtftError("trainer.precision=bf16 but this GPU does not support bfloat16; use fp32")
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        model: torch.nn.Module,
        data: TokenizedMixture,
        collator: TaskCollator,
        sampler: MixtureSampler,
        balancer: Balancer,
        tracker: Tracker,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        if cfg.max_steps < 1 or cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.eval_interval < 1:
            raise MtftError("trainer.max_steps, batch_size, grad_accum and eval_interval must all be >= 1")
        self.cfg, self.model, self.data, self.collator = cfg, model, data, collator
        self.sampler, self.balancer, self.tracker, self.device, self.seed = (
            sampler,
            balancer,
            tracker,
            device,
            seed,
        )
        self.tasks = data.tasks
        self.autocast = autocast_for(cfg.precision, device)
        self.eval_rows = fixed_eval_rows(data, cfg.eval_batches * cfg.eval_batch_size)

    def _val_losses(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return task_losses(
            self.model, self.data, rows, self.collator, self.cfg.eval_batch_size, self.device, self.autocast
        )

    def evaluate(self, step: int, result: TrainResult) -> torch.Tensor:
        losses, _ = self._val_losses(self.eval_rows)
        values = losses.tolist()
        result.val_history[step] = values
        rows: list[Row] = [
            {"step": step, "split": "val", "task": t, "loss": v}
            for t, v in zip(self.tasks, values, strict=True)
        ]
        rows.append({"step": step, "split": "val", "task": "all", "loss": sum(values) / len(values)})
        self.tracker.log(rows)
        return losses

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[TaskLosses, torch.Tensor, torch.Tensor]:
        """Per-task losses of one micro-batch, reduced over ranks so every rank sees the same values."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums, counts = per_task_token_loss(logits, batch["labels"], batch["task_ids"], len(self.tasks))
        global_sums, global_counts = all_reduce_sum(sums), all_reduce_sum(counts)
        denom = global_counts.clamp_min(1)
        losses = TaskLosses(local=sums / denom, mean=global_sums / denom, present=global_counts > 0)
        return losses, global_sums, global_counts

    def fit(self) -> TrainResult:
        cfg, model, balancer = self.cfg, self.model, self.balancer
        optimizer = build_optimizer(model, cfg)
        scheduler = get_scheduler(
            cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
        loader = DataLoader(self.data.train, batch_sampler=self.sampler, collate_fn=self.collator)
        batches = iter(loader)
        result = TrainResult(steps=cfg.max_steps)
        balancer.setup(model)
        initial = self.evaluate(0, result)
        balancer.observe_val(0, initial, torch.ones_like(initial, dtype=torch.bool))
        probe_rng = torch.Generator().manual_seed(self.seed)
        model.train()

        for step in range(1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            weights = balancer.weights()
            step_sums = torch.zeros(len(self.tasks), device=self.device)
            step_counts = torch.zeros(len(self.tasks), device=self.device)
            step_loss, tokens = 0.0, 0
            last_batch: dict[str, torch.Tensor] = {}
            for _ in range(cfg.grad_accum):
                last_batch = next(batches)
                losses, sums, counts = self._forward(last_batch)
                loss = balancer.combine(losses)
                if not torch.isfinite(loss):
                    bad = [
                        t
                        for t, v, p in zip(
                            self.tasks, losses.mean.tolist(), losses.present.tolist(), strict=True
                        )
                        if p and not math.isfinite(v)
                    ]
                    raise MtftError(
                        f"non-finite loss at step {step} (tasks: {', '.join(bad) or 'combined loss'})"
                    )
                (loss * world_size() / cfg.grad_accum).backward()
                step_sums += sums
                step_counts += counts
                step_loss += loss.item() / cfg.grad_accum
                tokens += int(all_reduce_sum(last_batch["attention_mask"].sum()).item())
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
                if cfg.max_grad_norm
                else float("nan")
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            present = step_counts > 0
            mean = step_sums / step_counts.clamp_min(1)
            if balancer.recompute_after_step:
                observed, _, _ = self._forward_no_grad(last_batch)
            else:
                observed = TaskLosses(local=mean, mean=mean, present=present)
            balancer.observe_step(step, observed)
            if balancer.val_interval and step % balancer.val_interval == 0:
                rows = random_eval_rows(self.data, balancer.val_batches * cfg.eval_batch_size, probe_rng)
                balancer.observe_val(step, *self._val_losses(rows))
            elapsed = time.perf_counter() - t0
            result.train_tokens += tokens
            result.train_seconds += elapsed

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                self.tracker.log(
                    self._train_rows(
                        step, mean, present, weights, step_loss, tokens, elapsed, grad_norm, scheduler
                    )
                )
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                self.evaluate(step, result)
        return result

    @torch.no_grad()
    def _forward_no_grad(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[TaskLosses, torch.Tensor, torch.Tensor]:
        return self._forward(batch)

    def _train_rows(
        self,
        step: int,
        mean: torch.Tensor,
        present: torch.Tensor,
        weights: torch.Tensor,
        loss: float,
        tokens: int,
        elapsed: float,
        grad_norm: float,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> list[Row]:
        rows: list[Row] = []
        for task, value, has, weight in zip(
            self.tasks, mean.tolist(), present.tolist(), weights.tolist(), strict=True
        ):
            rows.append(
                {
                    "step": step,
                    "split": "train",
                    "task": task,
                    "loss": value if has else None,
                    "weight": weight,
                }
            )
        summary: Row = {
            "step": step,
            "split": "train",
            "task": "all",
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        }
        if math.isfinite(grad_norm):
            summary["grad_norm"] = grad_norm
        summary.update(self.balancer.diagnostics())
        rows.append(summary)
        return rows
