"""The `mtft train` recipe: config -> data -> model -> trainer -> tracking -> summary, top to bottom."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import datasets
import transformers
from transformers import set_seed

from mtft.core.dist import barrier, device_for_rank, rank, rank_zero_first, world_size
from mtft.core.errors import MtftError
from mtft.core.rundir import Summary
from mtft.data.collator import TaskCollator
from mtft.data.mixture import build_mixture, tokenize_mixture
from mtft.data.sampler import MixtureSampler, sequence_lengths
from mtft.engine.backend import build_backend
from mtft.engine.checkpoint import find_checkpoint
from mtft.engine.loop import Trainer, peak_rss_mb
from mtft.loggers.base import Tracker
from mtft.loggers.console import print_final_table
from mtft.models.adapters import apply_peft, check_adapter_support
from mtft.models.loading import load_model, load_tokenizer, resolve_path
from mtft.recipe.builders import build_balancer, build_sinks
from mtft.recipe.config import TrainConfig

log = logging.getLogger("mtft")


def checkpoint_to_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from; a fresh run refuses a run dir that already holds a run."""
    metrics = run_dir / "metrics.jsonl"
    if not resume:
        if metrics.exists():
            raise MtftError(
                f"{run_dir} already holds a run (metrics.jsonl): continue it with trainer.resume=auto, "
                "or choose another hydra.run.dir"
            )
        return None
    path = find_checkpoint(run_dir, resume)
    if path is None:
        log.info("trainer.resume=auto: no checkpoint in %s yet, starting from the beginning", run_dir)
    return path


def train(cfg: TrainConfig, run_dir: Path, balancer_name: str) -> Summary:
    """Run one training job into `run_dir` and return its summary."""
    start = time.perf_counter()
    check_adapter_support(cfg.peft)  # e.g. peft=qlora without CUDA: stop before any data or model work
    resume_from = checkpoint_to_resume(run_dir, cfg.trainer.resume)
    barrier()  # every rank has looked at the run dir before rank 0 writes to it
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    set_seed(cfg.seed)
    cache_dir = Path(cfg.cache_dir).expanduser()
    device = device_for_rank()

    with rank_zero_first():  # one process builds the data and model caches, the others reuse them
        mixture = build_mixture(cfg.data, cache_dir)
        balancer = build_balancer(cfg.balancer, mixture.tasks)
        path = resolve_path(cfg.model, cache_dir, mixture.corpus)
        tokenizer = load_tokenizer(path, cfg.model)
        data = tokenize_mixture(
            mixture, tokenizer, cfg.data.max_length, cache_dir, cfg.data.truncation, cfg.model.prompt_format
        )
    log.info(
        "tasks: %s",
        ", ".join(
            f"{t} ({len(mixture.train[t])} train / {len(data.val_rows[i])} val)"
            for i, t in enumerate(data.tasks)
        ),
    )
    model = load_model(path, cfg.model, cfg.peft)
    if not getattr(model, "is_quantized", False):  # a 4-bit (QLoRA) model is placed by its device_map
        model = model.to(device)
    model = apply_peft(model, cfg.peft, cfg.trainer)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise MtftError(
            f"data.max_length={cfg.data.max_length} exceeds the model's context ({context} tokens)"
        )
    log.info("model: %s (%.2fM parameters) from %s", type(model).__name__, model.num_parameters() / 1e6, path)
    if cfg.deepspeed is not None and balancer.needs_parameters:
        raise MtftError(
            f"balancer {balancer_name} takes per-task gradients of shared parameters (torch.autograd.grad), "
            "which DeepSpeed's ZeRO gradient hooks do not allow; run it without DeepSpeed (deepspeed=none, "
            "plain or DDP with distributed.nproc_per_node)"
        )
    backend = build_backend(model, cfg.trainer, cfg.deepspeed, device)

    sampler = MixtureSampler(
        data.train_task_ids,
        cfg.trainer.batch_size,
        cfg.data.sampling,
        cfg.data.temperature,
        seed=cfg.seed,
        rank=rank(),
        world_size=world_size(),
        lengths=sequence_lengths(data.train) if cfg.data.group_by_length else None,
        group_by_length=cfg.data.group_by_length,
        group_batches=cfg.data.group_batches,
    )
    tracker = Tracker(build_sinks(cfg, run_dir, data.tasks))
    trainer = Trainer(
        cfg.trainer,
        backend,
        data,
        TaskCollator(tokenizer.pad_token_id),
        sampler,
        balancer,
        tracker,
        run_dir,
        cfg.seed,
    )
    try:
        result = trainer.fit(resume_from)
    finally:
        tracker.close()

    if cfg.trainer.save_model:
        backend.save_pretrained(run_dir / "model")
        if rank() == 0:
            tokenizer.save_pretrained(run_dir / "model")
    history = result.val_history
    first, last = history[min(history)], history[max(history)]
    summary = Summary(
        balancer=balancer_name,
        tasks=data.tasks,
        steps=result.steps,
        seed=cfg.seed,
        initial_val_loss=dict(zip(data.tasks, first, strict=True)),
        final_val_loss=dict(zip(data.tasks, last, strict=True)),
        best_val_loss={t: min(v[i] for v in history.values()) for i, t in enumerate(data.tasks)},
        train_tokens_per_s=result.tokens_per_s,
        wall_s=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        skipped_steps=result.skipped_steps,
        stopped_early=result.stopped_early,
    )
    if rank() == 0:
        summary.write(run_dir)
        print_final_table(summary, run_dir)
    return summary
