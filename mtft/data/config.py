"""The task mixture: tasks and their files, sequence length, mixture sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from mtft.core.errors import MtftError
from mtft.core.schema import Choice, at_least, choice, in_unit_interval, positive, require


class DataSource(Choice):
    codetasks = "codetasks"  # the embedded mixture, generated from the Python standard library
    jsonl = "jsonl"  # your own files, listed per task


class Truncation(Choice):
    truncate = "truncate"  # cut longer examples to max_length and count them
    error = "error"  # stop the run, with the count per task


class Sampling(Choice):
    proportional = "proportional"  # to task size: every example once per epoch
    uniform = "uniform"  # equal probability per task
    temperature = "temperature"  # n_i^(1/t)


@dataclass
class TaskConfig:
    """One task of a mixture. JSONL sources list files; the embedded codetasks source generates them."""

    train: list[str] = field(default_factory=list)  # JSONL files of the task
    validation: list[str] = field(default_factory=list)
    # Fraction of `train` held out for validation when no validation files are given.
    val_fraction: float = 0.05
    max_train_samples: int | None = None  # keep only the first N examples (quick experiments)
    max_val_samples: int | None = None

    def check(self, name: str) -> None:
        """Range checks; called by DataConfig, which knows the task's name for the message."""
        in_unit_interval(f"data.tasks.{name}.val_fraction", self.val_fraction)
        for key in ("max_train_samples", "max_val_samples"):
            if getattr(self, key) is not None:
                at_least(f"data.tasks.{name}.{key}", getattr(self, key), 1)


@dataclass
class DataConfig:
    source: DataSource = MISSING
    # Task name -> TaskConfig fields. Typed Any so `+data.tasks.NAME.train=[...]` can add a task from the
    # command line (Hydra cannot add a key to a dict of dataclasses); `__post_init__` turns each entry
    # into a checked TaskConfig, so the rest of mtft sees `dict[str, TaskConfig]`.
    tasks: dict[str, Any] = field(default_factory=dict)
    max_length: int = 256  # tokens per sequence (prompt + response)
    truncation: Truncation = Truncation.truncate  # what happens to longer examples
    sampling: Sampling = Sampling.proportional  # how batches draw from the tasks
    temperature: float = 2.0  # t of `sampling: temperature`
    # Length-grouped batching: sort each window of `group_batches` global batches by length (like
    # transformers' `group_by_length`), so batches pad less; deterministic and resumable as before.
    group_by_length: bool = False
    group_batches: int = 50
    # codetasks only: percent of functions (by hash of module path + qualified name) held out for validation.
    val_percent: int = 5
    split_salt: str = "mtft-codetasks-v1"

    def __post_init__(self) -> None:
        if self.source != MISSING:
            self.source = choice("data.source", DataSource, self.source)
        self.truncation = choice("data.truncation", Truncation, self.truncation)
        self.sampling = choice("data.sampling", Sampling, self.sampling)
        at_least("data.max_length", self.max_length, 2)
        positive("data.temperature", self.temperature)
        at_least("data.group_batches", self.group_batches, 1)
        require(0 < self.val_percent < 100, "data.val_percent", "in 1..99", self.val_percent)
        self.tasks = task_configs(self.tasks)
        if self.source == DataSource.codetasks:
            from mtft.data.codetasks import TASKS

            unknown = sorted(set(self.tasks) - set(TASKS))
            require(not unknown, "data.tasks", f"tasks of codetasks ({', '.join(TASKS)})", unknown)
        elif self.source == DataSource.jsonl:
            for name, task in self.tasks.items():
                if not task.train:
                    raise MtftError(f"task '{name}': no training files given (data.tasks.{name}.train)")
                if not task.validation and task.val_fraction == 0:
                    raise MtftError(
                        f"task '{name}': give data.tasks.{name}.validation files or a val_fraction in (0, 1)"
                    )


def task_configs(tasks: dict[str, TaskConfig | dict]) -> dict[str, TaskConfig]:
    """Each task as a checked TaskConfig (entries may be plain mappings when built in Python)."""
    out = {}
    for name, node in tasks.items():
        try:
            task = node if isinstance(node, TaskConfig) else TaskConfig(**(node or {}))
        except TypeError as e:
            raise MtftError(f"data.tasks.{name}: {e}") from None
        task.check(name)
        out[name] = task
    return out
