"""The `mtft train` recipe: the named builders of `mtft.recipe.builders`, top to bottom, then the summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import datasets
import transformers
from transformers import set_seed

from mtft.core.dist import barrier, device_for_rank, rank, rank_zero_first
from mtft.core.errors import Interrupted
from mtft.core.rundir import CHECKPOINTS, MODEL, EvalResult, RunSetup, Summary
from mtft.data.prepared import Data
from mtft.data.sampler import sequence_lengths
from mtft.engine.backend import Backend
from mtft.engine.checkpoint import checkpoint_dirs
from mtft.engine.memory import peak_gpu_memory_mb, peak_rss_mb
from mtft.engine.progress import TrainResult
from mtft.engine.signals import StopSignal
from mtft.loggers.console import print_final_table
from mtft.models.adapters import count_parameters
from mtft.recipe.builders import (
    build_backend,
    build_balancer,
    build_batching,
    build_data,
    build_model,
    build_sampler,
    build_tracker,
    build_trainer,
)
from mtft.recipe.config import TrainConfig
from mtft.recipe.runinfo import lr_warning, run_setup, setup_block

log = logging.getLogger("mtft")


def train(cfg: TrainConfig, run_dir: Path, resume_from: Path | None) -> Summary:
    """Run one training job into `run_dir` (claimed, see mtft.launch.claim) and return its summary;
    `resume_from`: the checkpoint to continue from (see mtft.recipe.resume), None for a fresh start."""
    start = time.perf_counter()
    barrier()  # every rank has looked at the run dir before rank 0 writes to it
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    set_seed(cfg.seed)
    device = device_for_rank()

    with rank_zero_first():  # one process builds the data and model caches, the others reuse them
        data = build_data(cfg)
        balancer = build_balancer(cfg.balancer, data.tasks)
    model = build_model(cfg, data.model_path, device)
    batching = build_batching(cfg, data.tokenizer.pad_token_id, model)
    counts = count_parameters(model)  # (trainable, total), before DeepSpeed partitions the weights
    warning = lr_warning(cfg, counts[1])
    if warning and rank() == 0:
        log.warning(warning)
    backend = build_backend(cfg, model, device)
    lengths = sequence_lengths(data.mixture.train)
    setup = run_setup(cfg, backend, counts, batching, lengths)
    if rank() == 0:
        log.info(setup_block(setup))
    sampler = build_sampler(cfg, batching, data.mixture.train_task_ids, lengths)
    tracker = build_tracker(cfg, run_dir, data.tasks)
    on_step = None
    if cfg.trainer.sample_interval is not None:
        from mtft.eval.samples import TrainingSamples

        on_step = TrainingSamples(
            cfg.trainer.sample_interval, data, cfg.data, cfg.eval, backend.module, tracker, backend.autocast
        )
    trainer = build_trainer(cfg, backend, data, batching, sampler, balancer, tracker, run_dir, on_step)
    try:
        result = trainer.fit(resume_from)
    finally:
        tracker.close()

    # A signal now (a scheduler's time limit, Ctrl-C) lets the final save finish, then stops the run
    # as during training: exit 75, and a resume from the final checkpoint has only this left to do.
    with StopSignal(finishing="finishing the final save") as stop:
        if cfg.trainer.save_model:
            backend.save_pretrained(run_dir / MODEL)
            if rank() == 0:
                data.tokenizer.save_pretrained(run_dir / MODEL)
        evaluation = evaluate_at_end(cfg, backend, data, run_dir) if cfg.trainer.eval_at_end else None
        summary = summarize(
            result, data.tasks, cfg.balancer.name, cfg.seed, time.perf_counter() - start, setup
        )
        summary.eval = evaluation
        if rank() == 0:
            summary.write(run_dir)
            print_final_table(summary, run_dir)
    if stop.signum is not None:
        raise Interrupted(result.steps, str(checkpoint_dirs(run_dir / CHECKPOINTS)[-1]))
    return summary


def evaluate_at_end(cfg: TrainConfig, backend: Backend, data: Data, run_dir: Path) -> EvalResult:
    """trainer.eval_at_end: `mtft eval` of the final model in this process (every rank takes its share);
    eval.json and eval_samples.jsonl go into the run dir, the results into summary.json."""
    from mtft.eval.evaluate import evaluate, print_table, write_eval

    result, samples = evaluate(
        backend.module, data, cfg.data, cfg.eval, f"final model of {run_dir}", backend.autocast
    )
    if rank() == 0:
        write_eval(run_dir, result, samples)
        print_table(result, stderr=True)
    return result


def summarize(
    result: TrainResult,
    tasks: list[str],
    balancer: str,
    seed: int,
    wall_s: float,
    setup: RunSetup,
) -> Summary:
    """summary.json from the loop's result: first, final and best validation loss per task, cost,
    and the run-start block."""
    history = result.val_history
    first, last = history[min(history)], history[max(history)]
    return Summary(
        balancer=balancer,
        tasks=tasks,
        steps=result.steps,
        seed=seed,
        initial_val_loss=dict(zip(tasks, first, strict=True)),
        final_val_loss=dict(zip(tasks, last, strict=True)),
        best_val_loss={t: min(v[i] for v in history.values()) for i, t in enumerate(tasks)},
        train_tokens_per_s=result.tokens_per_s,
        wall_s=wall_s,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_memory_mb=peak_gpu_memory_mb(),
        skipped_steps=result.skipped_steps,
        stopped_early=result.stopped_early,
        setup=setup,
    )
