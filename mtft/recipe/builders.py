"""The recipe's named steps, each building one component from the validated config.

`mtft.recipe.finetune` calls them in order (data -> model -> engine -> balancer -> loggers -> loop);
tests and `bench/` call the same builders instead of wiring components by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mtft.balancers import Balancer
from mtft.core.dist import rank
from mtft.loggers.base import Sink
from mtft.loggers.console import ConsoleSink
from mtft.loggers.context import run_context
from mtft.loggers.jsonl import JsonlSink
from mtft.recipe.config import TrainConfig


def build_balancer(cfg: Any, tasks: list[str]) -> Balancer:
    """The balancer class `cfg._target_` names, given the other (already checked) fields of `cfg`."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    options = {k: v for k, v in vars(cfg).items() if k != "_target_"}
    return get_class(cfg._target_)(tasks, **options)


def build_sinks(cfg: TrainConfig, run_dir: Path, tasks: list[str]) -> list[Sink]:
    """The sinks `cfg.logger` asks for, built in the order rows reach them. Rank 0 logs for the
    job; other ranks log nothing unless `logger.all_ranks` (then to metrics.rank<r>.jsonl)."""
    if rank() != 0:
        return [JsonlSink(run_dir / f"metrics.rank{rank()}.jsonl")] if cfg.logger.all_ranks else []
    sinks: list[Sink] = [
        JsonlSink(run_dir / "metrics.jsonl"),
        ConsoleSink(tasks, cfg.trainer.max_steps, cfg.logger.progress),
    ]
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
