"""The training loop: forward -> per-task losses -> balancer.combine -> backward/step -> balancer.observe.

Kept to one readable loop; everything it needs (the backend holding model and optimizer, data,
sampler, balancer, tracker) is built by the named builders of `mtft.recipe.builders` and handed in. The same loop
runs on one process, under DDP and under DeepSpeed: only the backend differs.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mtft.balancers.base import Balancer, TaskLosses
from mtft.core.dist import all_reduce_sum, rank, world_size
from mtft.core.errors import Interrupted, MtftError
from mtft.data.collator import TaskCollator, count_tokens
from mtft.data.loader import TrainBatches
from mtft.data.mixture import TokenizedMixture
from mtft.data.packing import PackedCollator
from mtft.data.sampler import MixtureSampler
from mtft.engine.backend import Backend
from mtft.engine.checkpoint import Checkpointer, RngState
from mtft.engine.config import TrainerConfig
from mtft.engine.evaluation import fixed_eval_rows, random_eval_rows, stratified_probe_rows, task_losses
from mtft.engine.forward import task_token_loss, task_token_loss_by_task
from mtft.loggers.base import Row, Tracker

log = logging.getLogger("mtft")


class DataclassState:
    """`state_dict`/`load_state_dict` for a dataclass of plain values: its fields, as they are."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, state[f.name])


@dataclass
class TrainResult(DataclassState):
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
class Progress(DataclassState):
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
    """SIGTERM/SIGINT/SIGUSR2 handler: the first signal asks the loop to checkpoint and stop after the
    current step; a second one stops at once (KeyboardInterrupt)."""

    def __init__(self, finishing: str = "finishing step, saving a checkpoint") -> None:
        self.signum: int | None = None
        self.finishing = finishing  # what is done before stopping, for the message
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: %s, then stopping", signal.Signals(signum).name, self.finishing)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            # SIGUSR2: what SLURM sends ahead of the time limit under submitit (`signal_delay_s`).
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                self._previous[signum] = signal.signal(signum, self)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """The loop over steps; it owns its progress (`result`, `progress`) and the checkpointer that
    saves and restores every component it was handed."""

    def __init__(
        self,
        cfg: TrainerConfig,
        backend: Backend,
        data: TokenizedMixture,
        collator: TaskCollator | PackedCollator,
        sampler: MixtureSampler,
        balancer: Balancer,
        tracker: Tracker,
        run_dir: Path,
        seed: int = 0,
        config: dict[str, Any] | None = None,  # recorded with each checkpoint (mtft.recipe.resume)
        num_workers: int = 0,  # DataLoader processes collating training batches (data.num_workers)
        # Called after each step and its evaluation (trainer.sample_interval's generation).
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg, self.backend, self.data, self.collator = cfg, backend, data, collator
        self.sampler, self.balancer, self.tracker = sampler, balancer, tracker
        self.on_step = on_step
        # `model` is what training calls (DDP/DeepSpeed wrapper); `module` the model itself.
        self.model, self.module, self.device = backend.model, backend.module, backend.device
        self.tasks = data.tasks
        self.autocast = backend.autocast
        self.batches = TrainBatches(data.train, sampler, collator, num_workers, self.device.type == "cuda")
        # A balancer whose `combine` is the base class's has no state to protect from a NaN loss, so
        # its micro-batches need no host check (FAMO and GradNorm read their losses on the host anyway).
        self._guard_combine = type(balancer).combine is not Balancer.combine
        self.eval_rows = fixed_eval_rows(data, cfg.eval_batches * cfg.eval_batch_size)
        self.result, self.progress = TrainResult(), Progress()
        # Draws the probe batches of balancers that validate as they train (CoBa), unless they
        # probe the same rows of every task each time.
        self.probe_rng = torch.Generator().manual_seed(seed)
        per_task = balancer.probe_rows_per_task
        self.probe_rows = stratified_probe_rows(data, per_task) if per_task else None
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

    def _val_losses(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return task_losses(
            self.module, self.data, rows, self.collator, self.cfg.eval_batch_size, self.device, self.autocast
        )

    def evaluate(self, step: int) -> torch.Tensor:
        losses, _ = self._val_losses(self.eval_rows)
        values = losses.tolist()
        self.result.val_history[step] = values
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
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
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
                applied, grad_norm = backend.step(skip=bool(stats.bad_tasks) or not math.isfinite(stats.loss))
                if applied:
                    progress.streak = 0
                    self._observe(step, stats)
                else:
                    self._skip(step, stats.bad_tasks)
                elapsed = time.perf_counter() - t0
                result.train_tokens += stats.tokens
                result.train_seconds += elapsed
                result.steps = step

                last = step == cfg.max_steps
                if step % cfg.log_interval == 0 or last or not applied:
                    rows = self._train_rows(
                        step, stats, weights, elapsed, grad_norm, backend.lr(), not applied
                    )
                    self.tracker.log(rows)
                self._check_streak(step, stats.bad_tasks)
                if step % cfg.eval_interval == 0 or last:
                    self._early_stopping(self.evaluate(step))
                    last = last or result.stopped_early
                if self.on_step is not None:
                    self.on_step(step)
                stopping = _any_rank(stop.signum is not None)  # every rank stops at the same step
                if last or (cfg.save_interval and step % cfg.save_interval == 0) or stopping:
                    path = self._save(step)
                    if stopping and not last:
                        raise Interrupted(step, str(path))
                if result.stopped_early:
                    break
        return result

    def _accumulate(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepStats:
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
            tokens += count_tokens(stats.last_batch)
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
            observed, _, _ = self._forward_no_grad(stats.last_batch)
        else:
            observed = TaskLosses(local=stats.mean, mean=stats.mean, present=stats.present)
        balancer.observe_step(step, observed)
        if balancer.val_interval and step % balancer.val_interval == 0:
            # A random probe batch is one training micro-batch (`batch_size` rows per rank), as in the
            # CoBa reference (MFTCoder's eval batch = train batch), not `eval_batch_size`: the probe
            # runs often. The ranks draw the same global rows and each evaluates its own share.
            rows = self.probe_rows
            if rows is None:
                n = balancer.val_batches * self.cfg.batch_size * world_size()
                rows = random_eval_rows(self.data, n, self.probe_rng)
            rows = rows[rank() :: world_size()]
            balancer.observe_val(
                step,
                *task_losses(
                    self.module,
                    self.data,
                    rows,
                    self.collator,
                    self.cfg.batch_size,
                    self.device,
                    self.autocast,
                ),
            )

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


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (one small all-reduce; free in one process)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def _finite_or_none(x: float) -> float | None:
    """metrics.jsonl is strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


def _what(bad_tasks: set[str]) -> str:
    return f"loss of task(s) {', '.join(sorted(bad_tasks))}" if bad_tasks else "gradient"
