"""Resuming: the checkpoint to continue from, and whether the new command may continue it.

Every checkpoint records the config it was trained with (secrets removed) and its world size
(`meta.json`). A resume compares them with the new command before anything is built: settings that
only change cadence, logging or the length of the run are applied; everything else (model, data,
tasks, seed, batch size, accumulation, world size, balancer, optimizer and learning-rate schedule)
would silently continue another run than the one asked for, so it is refused, naming every change.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from mtft.core.errors import MtftError
from mtft.engine.checkpoint import find_checkpoint, read_meta
from mtft.loggers.context import redact
from mtft.recipe.config import TrainConfig

log = logging.getLogger("mtft")

# Keys (or prefixes, ending in ".") a resumed run may change; the new values apply from the checkpoint on.
MAY_CHANGE = (
    "trainer.max_steps",  # upward only: the schedule is recomputed for the new total
    "trainer.eval_interval",
    "trainer.save_interval",
    "trainer.log_interval",
    "trainer.keep_checkpoints",
    "trainer.save_model",
    "trainer.max_nonfinite_steps",
    "trainer.resume",
    "logger.",
    "distributed.",  # launch settings; the world size they give is compared on its own
    "data.num_proc",
    "data.num_workers",  # who collates the batches, not which: the packed test resumes bitwise with them
    "cache_dir",
)


def run_record(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a checkpoint records it: plain values, secrets removed."""
    return redact(dataclasses.asdict(cfg))


def resume_point(run_dir: Path, cfg: TrainConfig, world_size: int) -> Path | None:
    """The checkpoint `trainer.resume` names (None: start from the beginning), checked against `cfg`."""
    if not cfg.trainer.resume:
        return None
    path = find_checkpoint(run_dir, cfg.trainer.resume)
    if path is None:
        log.info("trainer.resume=auto: no checkpoint in %s yet, starting from the beginning", run_dir)
        return None
    check_resumable(read_meta(path), cfg, world_size, path)
    return path


def check_resumable(meta: dict[str, Any], cfg: TrainConfig, world_size: int, path: Path) -> None:
    """Refuse, in one line, every change the run cannot honour."""
    step = int(meta["step"])
    if cfg.trainer.max_steps < step:
        raise MtftError(
            f"trainer.max_steps={cfg.trainer.max_steps} is below step {step} of the checkpoint {path}"
        )
    old, new = _flat(meta["config"]), _flat(run_record(cfg))
    changed = [
        f"{key} ({old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(MAY_CHANGE)
    ]
    if meta.get("world_size", world_size) != world_size:
        changed.append(f"world size ({meta['world_size']} -> {world_size})")
    if changed:
        raise MtftError(
            f"trainer.resume: the checkpoint {path} was trained with other settings, which a resumed run "
            f"cannot change: {', '.join(changed)}; resume with its values, or start a new run dir"
        )


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}
