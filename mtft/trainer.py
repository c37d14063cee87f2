"""The training loop: forward -> per-task losses -> balancer.combine -> backward/step -> balancer.observe.

Kept to one readable loop; everything it needs (model, data, sampler, balancer, tracker) is built
by the recipe in `mtft.train` and handed in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import get_scheduler

from mtft.balancers.base import Balancer, TaskLosses
from mtft.checkpoint import load_state, restore_rng_state, rng_state, save_checkpoint
from mtft.config import TrainerConfig
from mtft.data.collator import TaskCollator
from mtft.data.mixture import TokenizedMixture
from mtft.data.sampler import MixtureSampler
from mtft.distributed import all_reduce_sum, world_size
from mtft.errors import Interrupted, MtftError
from mtft.evaluation import fixed_eval_rows, random_eval_rows, task_losses
from mtft.loss import per_task_token_loss
from mtft.tracking import Row, Tracker

log = logging.getLogger("mtft")


@dataclass
class TrainResult:
    steps: int = 0  # optimizer steps taken (fewer than max_steps after early stopping)
    val_history: dict[int, list[float]] = field(default_factory=dict)  # step -> loss per task
    train_tokens: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    stopped_early: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


@dataclass
class Progress:
    """What the loop carries from step to step beyond the model: checkpointed with it."""

    streak: int = 0  # consecutive non-finite steps
    best_val: float = math.inf  # for early stopping
    evals_without_improvement: int = 0


@dataclass
class StepStats:
    """One optimizer step's per-task loss sums and token counts (over ranks and micro-batches)."""

    sums: torch.Tensor
    counts: torch.Tensor
    loss: float = 0.0  # the combined (balanced) loss
    tokens: int = 0  # non-padding tokens
    bad_tasks: set[str] = field(default_factory=set)  # tasks whose loss was not finite
    last_batch: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    @property
    def mean(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)


class StopSignal:
    """SIGTERM/SIGINT handler: the first signal asks the loop to checkpoint and stop after the
    current step; a second one stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: finishing step, saving a checkpoint, then stopping", signal.Signals(signum).name
        )

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
        run_dir: Path,
        seed: int = 0,
    ) -> None:
        if cfg.max_steps < 1 or cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.eval_interval < 1:
            raise MtftError("trainer.max_steps, batch_size, grad_accum and eval_interval must all be >= 1")
        if cfg.save_interval is not None and cfg.save_interval < 1:
            raise MtftError("trainer.save_interval must be >= 1 (or null: only at the end)")
        if cfg.keep_checkpoints < 1:
            raise MtftError("trainer.keep_checkpoints must be >= 1")
        self.cfg, self.model, self.data, self.collator = cfg, model, data, collator
        self.sampler, self.balancer, self.tracker, self.device, self.seed = (
            sampler,
            balancer,
            tracker,
            device,
            seed,
        )
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
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
            {"step": step, "split": "val", "task": t, "loss": _finite_or_none(v)}
            for t, v in zip(self.tasks, values, strict=True)
        ]
        rows.append(
            {"step": step, "split": "val", "task": "all", "loss": _finite_or_none(sum(values) / len(values))}
        )
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

    def fit(self, resume_from: Path | None = None) -> TrainResult:
        """Train to `max_steps` (or early stop), from scratch or from the checkpoint `resume_from`."""
        cfg, model, balancer = self.cfg, self.model, self.balancer
        optimizer = build_optimizer(model, cfg)
        scheduler = get_scheduler(
            cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
        result, progress = TrainResult(), Progress()
        probe_rng = torch.Generator().manual_seed(self.seed)
        balancer.setup(model)
        if resume_from is None:
            first_step = 1
            # Rows of an earlier attempt that died before its first checkpoint are replayed exactly.
            self.metrics_path.unlink(missing_ok=True)
            initial = self.evaluate(0, result)
            balancer.observe_val(0, initial, torch.ones_like(initial, dtype=torch.bool))
            self._early_stopping(initial, result, progress)
        else:
            first_step = self._restore(resume_from, optimizer, scheduler, result, progress, probe_rng)
        batches = iter(DataLoader(self.data.train, batch_sampler=self.sampler, collate_fn=self.collator))
        state_fn = functools.partial(self._state, optimizer, scheduler, result, progress, probe_rng)
        model.train()

        with StopSignal() as stop:
            for step in range(first_step, cfg.max_steps + 1):
                t0 = time.perf_counter()
                weights = balancer.weights()
                stats = self._accumulate(batches)
                grad_norm = float("nan")
                if not stats.bad_tasks:
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm else math.inf
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
                skipped = (
                    bool(stats.bad_tasks) or not math.isfinite(grad_norm) or not math.isfinite(stats.loss)
                )
                if skipped:
                    optimizer.zero_grad(set_to_none=True)
                    self._skip(step, stats.bad_tasks, result, progress)
                else:
                    progress.streak = 0
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    self._observe(step, stats, probe_rng)
                elapsed = time.perf_counter() - t0
                result.train_tokens += stats.tokens
                result.train_seconds += elapsed
                result.steps = step

                last = step == cfg.max_steps
                if step % cfg.log_interval == 0 or last or skipped:
                    lr = scheduler.get_last_lr()[0]
                    self.tracker.log(self._train_rows(step, stats, weights, elapsed, grad_norm, lr, skipped))
                self._check_streak(step, stats.bad_tasks, progress)
                if step % cfg.eval_interval == 0 or last:
                    self._early_stopping(self.evaluate(step, result), result, progress)
                    last = last or result.stopped_early
                if last or (cfg.save_interval and step % cfg.save_interval == 0) or stop.signum is not None:
                    path = self._save(step, state_fn(step), result)
                    if stop.signum is not None and not last:
                        raise Interrupted(step, str(path))
                if result.stopped_early:
                    break
        return result

    def _accumulate(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepStats:
        """Forward and backward over `grad_accum` micro-batches. A non-finite task loss stops the
        backward passes (the update will be skipped), so a balancer never sees a NaN."""
        T = len(self.tasks)
        stats = StepStats(torch.zeros(T, device=self.device), torch.zeros(T, device=self.device))
        for _ in range(self.cfg.grad_accum):
            stats.last_batch = next(batches)
            losses, sums, counts = self._forward(stats.last_batch)
            stats.sums += sums
            stats.counts += counts
            stats.tokens += int(all_reduce_sum(stats.last_batch["attention_mask"].sum()).item())
            values, present = losses.mean.tolist(), losses.present.tolist()
            stats.bad_tasks |= {
                t for t, v, p in zip(self.tasks, values, present, strict=True) if p and not math.isfinite(v)
            }
            if stats.bad_tasks:
                continue
            loss = self.balancer.combine(losses)
            (loss * world_size() / self.cfg.grad_accum).backward()
            stats.loss += loss.item() / self.cfg.grad_accum
        return stats

    def _observe(self, step: int, stats: StepStats, probe_rng: torch.Generator) -> None:
        """Show the balancer the step that was just taken (and, if it asks, fresh validation losses)."""
        balancer = self.balancer
        if balancer.recompute_after_step:
            observed, _, _ = self._forward_no_grad(stats.last_batch)
        else:
            observed = TaskLosses(local=stats.mean, mean=stats.mean, present=stats.present)
        balancer.observe_step(step, observed)
        if balancer.val_interval and step % balancer.val_interval == 0:
            rows = random_eval_rows(self.data, balancer.val_batches * self.cfg.eval_batch_size, probe_rng)
            balancer.observe_val(step, *self._val_losses(rows))

    def _skip(self, step: int, bad_tasks: set[str], result: TrainResult, progress: Progress) -> None:
        """A non-finite loss or gradient: no update this step (the caller logs the step's rows)."""
        result.skipped_steps += 1
        progress.streak += 1
        log.warning(
            "step %d: non-finite %s; update skipped (%d in a row)", step, _what(bad_tasks), progress.streak
        )

    def _check_streak(self, step: int, bad_tasks: set[str], progress: Progress) -> None:
        """Too many non-finite steps in a row stop the run with a message naming the step and tasks."""
        if progress.streak > self.cfg.max_nonfinite_steps:
            raise MtftError(
                f"non-finite {_what(bad_tasks)} at step {step}, {progress.streak} steps in a row "
                f"(trainer.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); lower trainer.lr or check the data"
            )

    def _early_stopping(self, val: torch.Tensor, result: TrainResult, progress: Progress) -> None:
        mean = float(val.mean())
        if mean < progress.best_val - self.cfg.early_stopping_min_delta:
            progress.best_val, progress.evals_without_improvement = mean, 0
            return
        progress.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        if patience is not None and progress.evals_without_improvement >= patience:
            log.info(
                "early stopping: mean validation loss has not improved on %.4f for %d evaluations",
                progress.best_val,
                patience,
            )
            result.stopped_early = True

    def _state(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        result: TrainResult,
        progress: Progress,
        probe_rng: torch.Generator,
        step: int,
    ) -> dict[str, Any]:
        """Everything the loop needs to continue after `step` as if it had never stopped."""
        return {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(probe_rng),
            "metrics_offset": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
            "result": asdict(result),
            "progress": asdict(progress),
        }

    def _save(self, step: int, state: dict[str, Any], result: TrainResult) -> Path:
        history = result.val_history
        val_mean = sum(history[max(history)]) / len(self.tasks) if history else None
        path = save_checkpoint(self.run_dir / "checkpoints", step, state, val_mean, self.cfg.keep_checkpoints)
        log.info("step %d: checkpoint saved to %s", step, path)
        return path

    def _restore(
        self,
        path: Path,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        result: TrainResult,
        progress: Progress,
        probe_rng: torch.Generator,
    ) -> int:
        """Load a checkpoint; returns the first step still to run. metrics.jsonl is cut back to it."""
        state = load_state(path)
        self.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"], probe_rng)
        for key, value in state["result"].items():
            setattr(result, key, value)
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        with self.metrics_path.open("r+b") as fh:  # rows written after the checkpoint are replayed
            fh.truncate(state["metrics_offset"])
        log.info("resumed from %s at step %d", path, state["step"])
        return state["step"] + 1

    @torch.no_grad()
    def _forward_no_grad(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[TaskLosses, torch.Tensor, torch.Tensor]:
        return self._forward(batch)

    def _train_rows(
        self,
        step: int,
        stats: StepStats,
        weights: torch.Tensor,
        elapsed: float,
        grad_norm: float,
        lr: float,
        skipped: bool,
    ) -> list[Row]:
        """Per task: its loss in this step's batch (null if absent) and the weight applied; then the mixture."""
        rows: list[Row] = [
            {
                "step": step,
                "split": "train",
                "task": task,
                "loss": _finite_or_none(value) if has else None,
                "weight": w,
            }
            for task, value, has, w in zip(
                self.tasks, stats.mean.tolist(), stats.present.tolist(), weights.tolist(), strict=True
            )
        ]
        summary: Row = {
            "step": step,
            "split": "train",
            "task": "all",
            "loss": None if skipped else _finite_or_none(stats.loss),
            "lr": lr,
            "tokens": stats.tokens,
            "tokens_per_s": stats.tokens / elapsed if elapsed else 0.0,
        }
        if math.isfinite(grad_norm):
            summary["grad_norm"] = grad_norm
        if skipped:
            summary["skipped"] = True
        summary.update(self.balancer.diagnostics())
        rows.append(summary)
        return rows


def _finite_or_none(x: float) -> float | None:
    """metrics.jsonl is strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


def _what(bad_tasks: set[str]) -> str:
    return f"loss of task(s) {', '.join(sorted(bad_tasks))}" if bad_tasks else "gradient"
