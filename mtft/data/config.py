"""The task mixture: tasks and their files, sequence length, mixture sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from mtft.core.errors import MtftError
from mtft.core.schema import Choice, at_least, choice, in_unit_interval, positive, require


class DataSource(Choice):
    codetasks = "codetasks"  # the embedded mixture, generated from the Python standard library
    files = "files"  # your own data per task: local files, directories, globs or a Hub dataset


class Format(Choice):
    """The shape of a task's records (see mtft/data/formats.py)."""

    auto = "auto"  # detected from the first record of each file
    messages = "messages"  # OpenAI/TRL: {"messages": [{"role": system|user|assistant, "content"}]}
    sharegpt = "sharegpt"  # {"conversations": [{"from": system|human|gpt, "value"}]}
    chat_rounds = "chat_rounds"  # MFTCoder: {"chat_rounds": [{"role": system|human|bot, "content"}]}
    alpaca = "alpaca"  # {"instruction", "input", "output", "system"?}
    prompt_response = "prompt_response"  # {"prompt", "response"}
    text = "text"  # {"text"}: every token is learned


class TrainOn(Choice):
    """Which tokens of a conversation the loss covers."""

    all_assistant = "all_assistant"  # every assistant turn, with its end-of-turn token
    last_assistant = "last_assistant"  # the final assistant turn only
    all = "all"  # every token, template and user turns included


# Fields a task's `columns:` may rename: record fields, then the role and content keys of a message.
COLUMN_KEYS = (
    "messages", "conversations", "chat_rounds", "instruction", "input", "output", "system", "prompt",
    "response", "text", "role", "content",
)  # fmt: skip
ROLES = ("system", "user", "assistant")


class Truncation(Choice):
    truncate = "truncate"  # cut longer examples to max_length and count them
    error = "error"  # stop the run, with the count per task


class Metric(Choice):
    """A task's generation metrics (computed in mtft/eval/metrics.py), all on a 0-100 scale."""

    exact_match = "exact_match"  # the normalized prediction equals the reference
    rouge_l = "rouge_l"  # ROUGE-L F1 (longest common subsequence of words), mean over examples
    chrf = "chrf"  # corpus chrF (character n-gram F-score, sacrebleu defaults)
    bleu = "bleu"  # corpus BLEU (sacrebleu defaults, 13a tokenization)


class Sampling(Choice):
    proportional = "proportional"  # to task size: every example once per epoch
    uniform = "uniform"  # equal probability per task
    temperature = "temperature"  # n_i^(1/t)


@dataclass
class HubSource:
    """A dataset on the Hugging Face Hub (downloaded by `datasets` only because a task names it)."""

    path: str = MISSING  # dataset id, e.g. tatsu-lab/alpaca
    name: str | None = None  # the dataset's configuration (subset)
    split: str = "train"
    validation_split: str | None = None  # null: hold out `val_fraction` of `split`
    revision: str | None = None  # pin a commit for reproducible runs


@dataclass
class TaskConfig:
    """One task of a mixture: where its records are and how to read them (codetasks generates its own)."""

    # Files, directories (every data file inside) or globs: .jsonl .json .jsonl.gz .json.gz .csv
    # .parquet .arrow, or a `Dataset.save_to_disk` directory.
    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    hub: HubSource | None = None  # instead of files
    format: Format = Format.auto
    columns: dict[str, str] = field(
        default_factory=dict
    )  # our field name -> the data's, e.g. {prompt: question}
    roles: dict[str, str] = field(default_factory=dict)  # the data's role -> system|user|assistant
    train_on: TrainOn = TrainOn.all_assistant
    # Fraction of `train` held out for validation when no validation files are given.
    val_fraction: float = 0.05
    max_train_samples: int | None = None  # keep only the first N examples (quick experiments)
    max_val_samples: int | None = None
    # Generation metrics of `mtft eval` (exact_match, rouge_l, chrf, bleu; see mtft/eval/metrics.py),
    # on prediction and reference stripped of surrounding whitespace and, if asked, lowercased.
    metrics: list[str] = field(default_factory=list)
    metric_strip: bool = True
    metric_lowercase: bool = False
    max_new_tokens: int | None = None  # per answer in mtft eval; null: eval.max_new_tokens

    def check(self, name: str) -> None:
        """Range checks; called by DataConfig, which knows the task's name for the message."""
        key = f"data.tasks.{name}"
        self.format = choice(f"{key}.format", Format, self.format)
        self.train_on = choice(f"{key}.train_on", TrainOn, self.train_on)
        if isinstance(self.hub, dict):
            try:
                self.hub = HubSource(**self.hub)
            except TypeError as e:
                raise MtftError(f"{key}.hub: {e}") from None
        if self.hub is not None:
            require(
                self.hub.path not in (MISSING, "", None), f"{key}.hub.path", "a dataset id", self.hub.path
            )
        for field_name, column in self.columns.items():
            require(
                field_name in COLUMN_KEYS,
                f"{key}.columns",
                f"keyed by one of {list(COLUMN_KEYS)}",
                field_name,
            )
            require(
                isinstance(column, str) and bool(column),
                f"{key}.columns.{field_name}",
                "a column name",
                column,
            )
        for role, target in self.roles.items():
            require(target in ROLES, f"{key}.roles.{role}", f"one of {list(ROLES)}", target)
        in_unit_interval(f"{key}.val_fraction", self.val_fraction)
        for key in ("max_train_samples", "max_val_samples", "max_new_tokens"):
            if getattr(self, key) is not None:
                at_least(f"data.tasks.{name}.{key}", getattr(self, key), 1)
        self.metrics = [choice(f"data.tasks.{name}.metrics", Metric, m) for m in self.metrics]
        text = self.format == Format.text
        require(
            not (text and self.metrics),
            f"data.tasks.{name}.metrics",
            "empty with format text (no answer)",
            [str(m) for m in self.metrics],
        )


@dataclass
class DataConfig:
    source: DataSource = MISSING
    # Task name -> TaskConfig fields. Typed Any so `+data.tasks.NAME.train=[...]` can add a task from the
    # command line (Hydra cannot add a key to a dict of dataclasses); `__post_init__` turns each entry
    # into a checked TaskConfig, so the rest of mtft sees `dict[str, TaskConfig]`.
    tasks: dict[str, Any] = field(default_factory=dict)
    max_length: int = 256  # tokens per sequence (a whole conversation)
    truncation: Truncation = Truncation.truncate  # what happens to longer examples
    num_proc: int = 1  # processes for reading and tokenizing (datasets.map); results are cached
    sampling: Sampling = Sampling.proportional  # how batches draw from the tasks
    temperature: float = 2.0  # t of `sampling: temperature`
    # Length-grouped batching: sort each window of `group_batches` global batches by length (like
    # transformers' `group_by_length`), so batches pad less; deterministic and resumable as before.
    group_by_length: bool = False
    group_batches: int = 50
    # Sequence packing: examples concatenated into rows of max_length tokens (first-fit-decreasing
    # inside windows of `packing_window` examples), each example attending only to itself, per-task
    # losses exact; trainer.batch_size then counts packed rows. An alternative to group_by_length.
    packing: bool = False
    packing_window: int = 1000
    num_workers: int = 0  # DataLoader processes that collate training batches ahead of the loop
    # codetasks only: percent of functions (by hash of module path + qualified name) held out for validation.
    val_percent: int = 5
    split_salt: str = "mtft-codetasks-v1"

    def __post_init__(self) -> None:
        if self.source != MISSING:
            self.source = choice("data.source", DataSource, self.source)
        self.truncation = choice("data.truncation", Truncation, self.truncation)
        self.sampling = choice("data.sampling", Sampling, self.sampling)
        at_least("data.max_length", self.max_length, 2)
        at_least("data.num_proc", self.num_proc, 1)
        positive("data.temperature", self.temperature)
        at_least("data.group_batches", self.group_batches, 1)
        at_least("data.packing_window", self.packing_window, 1)
        at_least("data.num_workers", self.num_workers, 0)
        if self.packing and self.group_by_length:
            raise MtftError("data.packing and data.group_by_length are alternatives: set one")
        require(0 < self.val_percent < 100, "data.val_percent", "in 1..99", self.val_percent)
        self.tasks = task_configs(self.tasks)
        if self.source == DataSource.codetasks:
            from mtft.data.codetasks import TASKS

            unknown = sorted(set(self.tasks) - set(TASKS))
            require(not unknown, "data.tasks", f"tasks of codetasks ({', '.join(TASKS)})", unknown)
        elif self.source == DataSource.files:
            for name, task in self.tasks.items():
                if not task.train and task.hub is None:
                    raise MtftError(
                        f"task '{name}': no training data given (data.tasks.{name}.train or .hub)"
                    )
                if task.train and task.hub is not None:
                    raise MtftError(f"task '{name}': give data.tasks.{name}.train files or .hub, not both")
                held_out = task.validation or (task.hub is not None and task.hub.validation_split)
                if not held_out and task.val_fraction == 0:
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
