"""The task mixture: tasks and their files, sequence length, mixture sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError

from mtft.core.errors import MtftError


@dataclass
class TaskConfig:
    """One task of a mixture. JSONL sources list files; the embedded codetasks source generates them."""

    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    # Fraction of `train` held out for validation when no validation files are given.
    val_fraction: float = 0.05
    max_train_samples: int | None = None
    max_val_samples: int | None = None


@dataclass
class DataConfig:
    source: str = MISSING  # codetasks | jsonl
    # task name -> TaskConfig fields. Typed as Any so `+data.tasks.NAME.train=[...]` can add a task
    # from the command line (OmegaConf cannot add keys to a dict of dataclasses); `task_configs`
    # checks every entry against TaskConfig at start-up.
    tasks: dict[str, Any] = field(default_factory=dict)
    max_length: int = 256
    truncation: str = "truncate"  # longer examples: truncate (and count them) | error
    # Mixture sampling: proportional (to task size) | uniform (equal per task) | temperature (n_i^(1/t)).
    sampling: str = "proportional"
    temperature: float = 2.0
    # Length-grouped batching: sort each window of `group_batches` global batches by length (like
    # transformers' `group_by_length`), so batches pad less; deterministic and resumable as before.
    group_by_length: bool = False
    group_batches: int = 50
    # codetasks only: percent of functions (by hash of module path + qualified name) held out for validation.
    val_percent: int = 5
    split_salt: str = "mtft-codetasks-v1"


def task_configs(tasks: dict[str, Any]) -> dict[str, TaskConfig]:
    """Check each task entry against the TaskConfig schema, naming the task in any error."""
    out = {}
    for name, node in tasks.items():
        if isinstance(node, TaskConfig):
            out[name] = node
            continue
        try:
            merged = OmegaConf.merge(OmegaConf.structured(TaskConfig), node or {})
        except (ValidationError, KeyError) as e:
            raise MtftError(f"data.tasks.{name}: {str(e).splitlines()[0]}") from None
        out[name] = OmegaConf.to_object(merged)
    return out
