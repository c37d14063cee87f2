"""The recipe's named steps, each building one component from the validated config.

`mtft.recipe.finetune` calls them in order (data -> balancer -> model -> batching -> backend ->
sampler -> tracker -> trainer); tests and `bench/` call the same builders instead of wiring components by hand,
so what they exercise is what `mtft train` runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class

from mtft.balancers import Balancer
from mtft.core.dist import rank, world_size
from mtft.core.errors import MtftError
from mtft.core.rundir import METRICS, SAMPLES, rank_metrics
from mtft.data.batching import Batching
from mtft.data.mixture import build_mixture, tokenize_mixture
from mtft.data.prepared import Data
from mtft.data.sampler import MixtureSampler
from mtft.data.templates import resolve_template
from mtft.engine.backend import Backend, DeepSpeedBackend, TorchBackend
from mtft.engine.loop import Trainer
from mtft.loggers.base import Sink, Tracker
from mtft.loggers.console import ConsoleSink
from mtft.loggers.context import run_context
from mtft.loggers.jsonl import JsonlSink, SamplesSink
from mtft.models.adapters import apply_peft
from mtft.models.config import PromptFormat
from mtft.models.loading import load_model, load_tokenizer, resolve_path
from mtft.models.packing import check_packed_attention
from mtft.recipe.config import TrainConfig
from mtft.recipe.resume import run_record

log = logging.getLogger("mtft")


def build_data(cfg: TrainConfig) -> Data:
    """Read (or build) the task mixture and tokenize it for the configured model; both are cached."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    mixture = build_mixture(cfg.data, cache_dir)
    path = resolve_path(cfg.model, cache_dir, mixture.corpus)
    tokenizer = load_tokenizer(path, cfg.model)
    template = None
    if cfg.model.prompt_format == PromptFormat.chat:
        template = resolve_template(cfg.model.chat_template, tokenizer)
        tokenizer.chat_template = template  # saved with the model, so inference renders as training did
    data = tokenize_mixture(
        mixture,
        tokenizer,
        cfg.data.max_length,
        cache_dir,
        cfg.data.truncation,
        template,
        cfg.data.num_proc,
    )
    log.info(
        "tasks: %s",
        ", ".join(
            f"{t} ({len(mixture.train[t])} train / {len(data.val_rows[i])} val)"
            for i, t in enumerate(data.tasks)
        ),
    )
    return Data(data, tokenizer, path, mixture, template)


def build_balancer(cfg: Any, tasks: list[str]) -> Balancer:
    """The balancer class `cfg._target_` names, given the other (already checked) fields of `cfg`."""
    options = {k: v for k, v in vars(cfg).items() if k != "_target_"}
    return get_class(cfg._target_)(tasks, **options)


def build_model(cfg: TrainConfig, path: str, device: torch.device) -> torch.nn.Module:
    """The model on `device`, with its adapters (`cfg.peft`), checked against `data.max_length`."""
    model = load_model(path, cfg.model, cfg.peft)
    if not getattr(model, "is_quantized", False):  # a 4-bit (QLoRA) model is placed by its device_map
        model = model.to(device)
    model = apply_peft(model, cfg.peft, cfg.trainer.gradient_checkpointing)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise MtftError(
            f"data.max_length={cfg.data.max_length} exceeds the model's context ({context} tokens)"
        )
    log.info("model: %s (%.2fM parameters) from %s", type(model).__name__, model.num_parameters() / 1e6, path)
    return model


def build_backend(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> Backend:
    """Plain PyTorch (one process or DDP) unless `cfg.deepspeed` asks for DeepSpeed ZeRO."""
    if cfg.deepspeed is None:
        return TorchBackend(model, cfg.trainer, device)
    return DeepSpeedBackend(model, cfg.trainer, cfg.deepspeed, device)


def build_batching(cfg: TrainConfig, pad_token_id: int, model: torch.nn.Module) -> Batching:
    """How examples become micro-batches (`Batching` reads `data.packing` and `data.group_by_length`);
    packed rows are refused for a model that would let their examples attend to each other."""
    batching = Batching(cfg.data, pad_token_id)
    if batching.packed:
        check_packed_attention(model)
    return batching


def build_sampler(
    cfg: TrainConfig, batching: Batching, task_ids: list[int], lengths: list[int] | None = None
) -> MixtureSampler:
    """This rank's share of the task mixture's batches. `lengths` (of every training example) are
    needed unless batches are plain; `task_ids` may relabel the examples (bench's synthetic tasks)."""
    return batching.sampler(task_ids, cfg.trainer.batch_size, cfg.seed, rank(), world_size(), lengths)


def build_sinks(cfg: TrainConfig, run_dir: Path, tasks: list[str]) -> list[Sink]:
    """The sinks `cfg.logger` asks for, built in the order rows reach them. Rank 0 logs for the
    job; other ranks log nothing unless `logger.all_ranks` (then to metrics.rank<r>.jsonl)."""
    if rank() != 0:
        return [JsonlSink(run_dir / rank_metrics(rank()))] if cfg.logger.all_ranks else []
    sinks: list[Sink] = [
        JsonlSink(run_dir / METRICS),
        ConsoleSink(tasks, cfg.trainer.max_steps, cfg.logger.progress),
    ]
    if cfg.trainer.sample_interval is not None:
        sinks.append(SamplesSink(run_dir / SAMPLES))
    wandb_cfg, tensorboard_cfg = cfg.logger.wandb, cfg.logger.tensorboard
    if not (wandb_cfg.enabled or tensorboard_cfg.enabled):
        return sinks
    ctx = run_context(cfg, run_dir)
    if wandb_cfg.enabled:
        from mtft.loggers.wandb import WandbSink

        sinks.append(WandbSink(wandb_cfg, ctx))
    if tensorboard_cfg.enabled:
        from mtft.loggers.tensorboard import TensorboardSink

        sinks.append(TensorboardSink(tensorboard_cfg, ctx))
    return sinks


def build_tracker(cfg: TrainConfig, run_dir: Path, tasks: list[str], extra: Sequence[Sink] = ()) -> Tracker:
    """The configured sinks, plus `extra` ones (bench's timing sink), behind one tracker."""
    return Tracker([*build_sinks(cfg, run_dir, tasks), *extra])


def build_trainer(
    cfg: TrainConfig,
    backend: Backend,
    data: Data,
    batching: Batching,
    sampler: MixtureSampler,
    balancer: Balancer,
    tracker: Tracker,
    run_dir: Path,
    on_step: Callable[[int], None] | None = None,
) -> Trainer:
    """The loop over all of the above; it also checkpoints and restores them. `on_step(step)` runs
    after each step (trainer.sample_interval)."""
    return Trainer(
        cfg.trainer,
        backend,
        data.mixture,
        batching,
        sampler,
        balancer,
        tracker,
        run_dir,
        cfg.seed,
        config=run_record(cfg),
        on_step=on_step,
    )
