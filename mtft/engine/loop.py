"""The training loop: forward -> per-task losses -> balancer.combine -> backward/step -> balancer.observe.

Kept to one readable loop; everything it needs (the backend holding model and optimizer, data, its
batching and sampler, balancer, tracker) is built by the named builders of `mtft.recipe.builders` and
handed in. The same loop runs on one process, under DDP and under DeepSpeed: only the backend differs.
It sees typed batches (mtft.data.batch) and never learns how they were made, nor which balancer runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mtft.balancers.base import Balancer, TaskLosses
from mtft.core.dist import all_reduce_sum, rank, world_size
from mtft.core.errors import Interrupted, MtftError
from mtft.data.batch import Batch
from mtft.data.batching import Batching
from mtft.data.mixture import TokenizedMixture
from mtft.data.sampler import MixtureSampler
from mtft.engine.backend import Backend
from mtft.engine.checkpoint import Checkpointer, RngState
from mtft.engine.config import TrainerConfig
from mtft.engine.evaluation import fixed_eval_rows, task_losses
from mtft.engine.forward import task_token_loss, task_token_loss_by_task
from mtft.engine.progress import Progress, StepStats, TrainResult
from mtft.engine.rows import train_rows, val_rows
from mtft.engine.signals import StopSignal
from mtft.loggers.base import Tracker

log = logging.getLogger("mtft")


class Trainer:
    """The loop over steps; it owns its progress (`result`, `progress`) and the checkpointer that
    saves and restores every component it was handed."""

    def __init__(
        self,
        cfg: TrainerConfig,
        backend: Backend,
        data: TokenizedMixture,
        batching: Batching,
        sampler: MixtureSampler,  # made by `batching`
        balancer: Balancer,
        tracker: Tracker,
        run_dir: Path,
        seed: int = 0,
        config: dict[str, Any] | None = None,  # recorded with each checkpoint (mtft.recipe.resume)
        # Called after each step and its evaluation (trainer.sample_interval's generation).
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg, self.backend, self.data, self.batching = cfg, backend, data, batching
        self.sampler, self.balancer, self.tracker = sampler, balancer, tracker
        self.on_step = on_step
        # `model` is what training calls (DDP/DeepSpeed wrapper); `module` the model itself.
        self.model, self.module, self.device = backend.model, backend.module, backend.device
        self.tasks = data.tasks
        self.autocast = backend.autocast
        self.batches = batching.loader(data.train, sampler, self.device.type == "cuda")
        # A balancer whose `combine` is the base class's has no state to protect from a NaN loss, so
        # its micro-batches need no host check (FAMO and GradNorm read their losses on the host anyway).
        self._guard_combine = type(balancer).combine is not Balancer.combine
        self.eval_rows = fixed_eval_rows(data, cfg.eval_batches * cfg.eval_batch_size)
        self.result, self.progress = TrainResult(), Progress()
        # Draws the random probe rows of balancers that validate as they train (`probe_rows`).
        self.probe_rng = torch.Generator().manual_seed(seed)
        self.checkpointer = Checkpointer(
            run_dir,
            shared={
                "backend": backend,
                "balancer": balancer,
                "sampler": self.batches,
                "result": self.result,
                "progress": self.progress,
            },
            per_rank={"rng": RngState(self.probe_rng), "tracker": tracker},
            keep=cfg.keep_checkpoints,
            config=config,
        )

    def _val_losses(self, rows: list[int], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        collate = self.batching.collate
        return task_losses(self.module, self.data, rows, collate, batch_size, self.device, self.autocast)

    def evaluate(self, step: int) -> torch.Tensor:
        losses, _ = self._val_losses(self.eval_rows, self.cfg.eval_batch_size)
        values = losses.tolist()
        self.result.val_history[step] = values
        self.tracker.log(val_rows(step, self.tasks, values))
        return losses

    def _forward(self, batch: Batch) -> tuple[TaskLosses, torch.Tensor, torch.Tensor]:
        """Per-task losses of one micro-batch, reduced over ranks so every rank sees the same values."""
        batch = batch.to(self.device, non_blocking=True)
        parts = None
        with self.autocast():
            if self.balancer.per_task_rows:
                sums, counts, parts = task_token_loss_by_task(self.model, batch, len(self.tasks))
            else:
                sums, counts = task_token_loss(self.model, batch, len(self.tasks))
        global_sums, global_counts = all_reduce_sum(sums), all_reduce_sum(counts)
        denom = global_counts.clamp_min(1)
        losses = TaskLosses(local=sums / denom, mean=global_sums / denom, present=global_counts > 0)
        if parts is not None:
            losses.separate = [None if p is None else p / denom[i] for i, p in enumerate(parts)]
        return losses, global_sums, global_counts

    def fit(self, resume_from: Path | None = None) -> TrainResult:
        """Train to `max_steps` (or early stop), from scratch or from the checkpoint `resume_from`."""
        cfg, backend, balancer = self.cfg, self.backend, self.balancer
        result, progress = self.result, self.progress
        balancer.setup(self.module)
        balancer.plan(cfg.max_steps)
        if resume_from is None:
            first_step = 1
            initial = self.evaluate(0)
            balancer.observe_val(0, initial, torch.ones_like(initial, dtype=torch.bool))
            self._early_stopping(initial)
        else:
            # Every component, the sinks included, rewinds to the checkpoint: replayed steps log once.
            first_step = self.checkpointer.load(resume_from) + 1
        self.model.train()

        with StopSignal() as stop:
            for step in range(first_step, cfg.max_steps + 1):
                t0 = time.perf_counter()
                weights = balancer.weights()
                stats = self._accumulate(self.batches)
                skip = bool(stats.bad_tasks) or not math.isfinite(stats.loss)
                stats.applied, stats.grad_norm = backend.step(skip=skip)
                if stats.applied:
                    progress.streak = 0
                    self._observe(step, stats)
                else:
                    self._skip(step, stats.bad_tasks)
                stats.seconds = time.perf_counter() - t0
                result.train_tokens += stats.tokens
                result.train_seconds += stats.seconds
                result.steps = step

                last = step == cfg.max_steps
                if step % cfg.log_interval == 0 or last or not stats.applied:
                    rows = train_rows(step, self.tasks, stats, weights, backend.lr(), balancer.diagnostics())
                    self.tracker.log(rows)
                self._check_streak(step, stats.bad_tasks)
                if step % cfg.eval_interval == 0 or last:
                    self._early_stopping(self.evaluate(step))
                    last = last or result.stopped_early
                if self.on_step is not None:
                    self.on_step(step)
                stopping = stop.on_any_rank()
                if last or (cfg.save_interval and step % cfg.save_interval == 0) or stopping:
                    path = self._save(step)
                    if stopping and not last:
                        raise Interrupted(step, str(path))
                if result.stopped_early:
                    break
        return result

    def _accumulate(self, batches: Iterator[Batch]) -> StepStats:
        """Forward and backward over `grad_accum` micro-batches. Losses, token counts and non-finite
        flags stay on the device and are read once, after the last micro-batch: no host sync in
        between stalls a GPU's queue. After a non-finite task loss the update is skipped, and the
        balancer never sees a NaN (a base-class `combine` keeps no state, so it may compute one)."""
        T, device = len(self.tasks), self.device
        stats = StepStats(torch.zeros(T, device=device), torch.zeros(T, device=device))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # this rank's share
        nonfinite = torch.zeros(T, dtype=torch.bool, device=device)
        tokens = torch.zeros((), dtype=torch.long)  # counted on the host, where the batches are
        for micro in range(self.cfg.grad_accum):
            stats.last_batch = next(batches)
            tokens += stats.last_batch.num_tokens()
            with self.backend.accumulating(last=micro == self.cfg.grad_accum - 1):
                losses, sums, counts = self._forward(stats.last_batch)
                stats.sums += sums
                stats.counts += counts
                nonfinite |= losses.present & ~torch.isfinite(losses.mean)
                if self._guard_combine and bool(nonfinite.any()):
                    # The balancer never sees it; the plain sum keeps every engine's bookkeeping in
                    # step and makes the gradient non-finite, so the update is skipped everywhere.
                    loss = losses.local.sum()
                else:
                    loss = self.balancer.combine(losses)
                    loss_sum += loss.detach()
                self.backend.backward(loss * world_size() / self.cfg.grad_accum)
        # The step's one host sync: the job's combined loss and tokens, and which tasks were non-finite.
        totals = all_reduce_sum(torch.stack([loss_sum, tokens.to(device, torch.float64)]))
        loss, total_tokens, *bad = torch.cat([totals, nonfinite.double()]).tolist()
        stats.loss, stats.tokens = loss / self.cfg.grad_accum, int(total_tokens)
        stats.bad_tasks = {t for t, b in zip(self.tasks, bad, strict=True) if b}
        return stats

    def _observe(self, step: int, stats: StepStats) -> None:
        """Show the balancer the step that was just taken (and, if it asks, fresh validation losses)."""
        balancer = self.balancer
        if balancer.recompute_after_step:
            assert stats.last_batch is not None
            observed, _, _ = self._forward_no_grad(stats.last_batch)
        else:
            observed = TaskLosses(local=stats.mean, mean=stats.mean, present=stats.present)
        balancer.observe_step(step, observed)
        batch_size = self.cfg.batch_size
        rows = balancer.probe_rows(step, self.data.val_rows, batch_size * world_size(), self.probe_rng)
        if rows is not None:
            # The ranks draw the same global rows and each evaluates its own share, in batches of a
            # training micro-batch: the probe runs often.
            balancer.observe_val(step, *self._val_losses(rows[rank() :: world_size()], batch_size))

    def _skip(self, step: int, bad_tasks: set[str]) -> None:
        """A non-finite loss or gradient: no update this step (the caller logs the step's rows)."""
        progress = self.progress
        self.result.skipped_steps += 1
        progress.streak += 1
        log.warning(
            "step %d: non-finite %s; update skipped (%d in a row)", step, _what(bad_tasks), progress.streak
        )

    def _check_streak(self, step: int, bad_tasks: set[str]) -> None:
        """Too many non-finite steps in a row stop the run with a message naming the step and tasks."""
        progress = self.progress
        if progress.streak > self.cfg.max_nonfinite_steps:
            raise MtftError(
                f"non-finite {_what(bad_tasks)} at step {step}, {progress.streak} steps in a row "
                f"(trainer.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); lower trainer.lr or check the data"
            )

    def _early_stopping(self, val: torch.Tensor) -> None:
        progress = self.progress
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
            self.result.stopped_early = True

    def _save(self, step: int) -> Path:
        """Everything the loop needs to continue after `step` as if it had never stopped."""
        history = self.result.val_history
        val_mean = sum(history[max(history)]) / len(self.tasks) if history else None
        return self.checkpointer.save(step, val_mean)

    @torch.no_grad()
    def _forward_no_grad(self, batch: Batch) -> tuple[TaskLosses, torch.Tensor, torch.Tensor]:
        return self._forward(batch)


def _what(bad_tasks: set[str]) -> str:
    return f"loss of task(s) {', '.join(sorted(bad_tasks))}" if bad_tasks else "gradient"
