"""A mixture: named tasks, each with train and validation conversations, then tokenized for training.

Records are read per task (mtft/data/sources.py) as conversations; tasks without validation files
hold out a content-hashed `val_fraction`, so the same record always lands on the same side. Then every
conversation is rendered (plain, or with a chat template) and tokenized into `input_ids` and `labels`
by a cached `Dataset.map`. Everything stays in memory-mapped Arrow files under the cache dir.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets

from mtft.core.cache import build_dir_once
from mtft.core.errors import MtftError
from mtft.data import codetasks
from mtft.data.config import DataConfig, DataSource, TaskConfig, TrainOn
from mtft.data.encode import Encoder
from mtft.data.formats import Reader, RecordError, detect
from mtft.data.sources import COLUMNS, Origins, TaskReader, fingerprint, normalize_batch

log = logging.getLogger(__name__)

TOKENIZE_VERSION = 3
TOKENIZED = Features(
    {
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "task_id": Value("int32"),
        "truncated": Value("bool"),
    }
)


@dataclass
class TaskCounts:
    """What became of a task's records: read, held out for validation, left out by a cap."""

    read: int = 0
    held_out: int = 0
    capped: int = 0


@dataclass
class Mixture:
    """Conversations per task and split (columns of sources.COLUMNS), in a fixed task order (the task ids)."""

    tasks: list[str]
    train: dict[str, Dataset]
    validation: dict[str, Dataset]
    fingerprints: dict[str, str]  # per task: identifies its records and split settings
    train_on: dict[str, TrainOn] = field(default_factory=dict)  # per task; absent: all_assistant
    origins: Origins = field(default_factory=Origins)
    counts: dict[str, TaskCounts] = field(default_factory=dict)

    def corpus(self, max_chars: int) -> list[str]:
        """Training text, interleaved over tasks, for fitting a tokenizer: about `max_chars` characters
        (at most twice that, as a record gives at most `max_chars`, however huge it is)."""
        texts, total = [], 0
        for i in range(max(len(v) for v in self.train.values())):
            for task in self.tasks:
                if i < len(self.train[task]):
                    texts.append("".join(self.train[task][i]["contents"])[:max_chars])
                    total += len(texts[-1])
                    if total >= max_chars:
                        return texts
        return texts


def conversations(records: list[dict]) -> Dataset:
    """In-memory records (one format, detected) as a conversation Dataset: generated data and tests."""
    if not records:
        return Dataset.from_dict({name: [] for name in COLUMNS})
    reader = Reader(detect(records[0], {}), {}, {})
    names = {name for record in records for name in record}
    batch = {name: [record.get(name) for record in records] for name in names}
    return Dataset.from_dict(normalize_batch(batch, list(range(len(records))), reader, -1))


def _hold_out(ds: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """(rest, held out): a record is held out when its content hash falls below `fraction`."""
    threshold = int(fraction * 2**32)
    kwargs = {"input_columns": "key", "batched": True}
    rest = ds.filter(_held_out, fn_kwargs={"threshold": threshold, "held": False}, **kwargs)
    return rest, ds.filter(_held_out, fn_kwargs={"threshold": threshold, "held": True}, **kwargs)


def _held_out(keys: list[str], threshold: int, held: bool) -> list[bool]:
    return [(int(k[:8], 16) < threshold) == held for k in keys]


def _stable_order(ds: Dataset) -> Dataset:
    """An order that depends only on content, so caps and eval subsets are the same on every run."""
    return ds.sort("key") if len(ds) else ds


def _cap(ds: Dataset, limit: int | None) -> Dataset:
    return ds if limit is None or limit >= len(ds) else _stable_order(ds).select(range(limit))


def _read_task(name: str, task: TaskConfig, cfg: DataConfig, cache_dir: Path, origins: Origins):
    """(train, validation or None) conversations of one of the user's tasks."""
    read = TaskReader(name, task, origins, cache_dir, cfg.num_proc)
    if task.hub is not None:
        split = task.hub.validation_split
        return read.hub(task.hub.split), read.hub(split) if split else None
    key = f"data.tasks.{name}"
    train = read.files(task.train, f"{key}.train")
    return train, read.files(task.validation, f"{key}.validation") if task.validation else None


def build_mixture(cfg: DataConfig, cache_dir: Path) -> Mixture:
    """Read every task's records (or the embedded codetasks) and split them; errors name file and line."""
    origins = Origins()
    raw: dict[str, tuple[Dataset, Dataset | None]] = {}
    fingerprints: dict[str, str] = {}
    if cfg.source == DataSource.codetasks:
        built = codetasks.load_cached(cache_dir, cfg.val_percent, cfg.split_salt)
        build_key = codetasks.cache_key(cfg.val_percent, cfg.split_salt)
        for name in cfg.tasks:
            raw[name] = (conversations(built[name]["train"]), conversations(built[name]["validation"]))
            fingerprints[name] = fingerprint("codetasks", build_key, name)
    else:
        for name, task in cfg.tasks.items():
            raw[name] = _read_task(name, task, cfg, cache_dir, origins)
            fingerprints[name] = fingerprint(
                [raw[name][0]._fingerprint, raw[name][1]._fingerprint if raw[name][1] is not None else None]
            )

    train, validation, counts = {}, {}, {}
    for name, task in cfg.tasks.items():
        tr, va = raw[name]
        count = counts[name] = TaskCounts(read=len(tr) + (len(va) if va is not None else 0))
        if va is None:
            tr, va = _hold_out(tr, task.val_fraction)
            count.held_out = len(va)
        train[name] = _cap(tr, task.max_train_samples)
        validation[name] = _stable_order(_cap(va, task.max_val_samples))
        count.capped = len(tr) + len(va) - len(train[name]) - len(validation[name])
        fingerprints[name] = fingerprint(
            fingerprints[name], task.val_fraction, task.max_train_samples, task.max_val_samples
        )
        if not len(train[name]):
            raise MtftError(f"task '{name}' has no training examples")
        if not len(validation[name]):
            raise MtftError(
                f"task '{name}' has an empty validation set: give data.tasks.{name}.validation files "
                "or a larger val_fraction"
            )
    train_on = {name: task.train_on for name, task in cfg.tasks.items()}
    return Mixture(list(cfg.tasks), train, validation, fingerprints, train_on, origins, counts)


@dataclass
class TokenizedMixture:
    """Token ids per example with task ids; validation rows are ordered by task, content-stable within."""

    tasks: list[str]
    train: Dataset  # columns: input_ids, labels, task_id
    validation: Dataset
    val_rows: list[list[int]]  # per task: row indices into `validation`
    truncated: list[int]  # per task: examples (train + validation) cut to max_length

    @property
    def train_task_ids(self) -> list[int]:
        return self.train["task_id"]


def tokenize_mixture(
    mixture: Mixture,
    tokenizer,
    max_length: int,
    cache_dir: Path | None = None,
    truncation: str = "truncate",
    template: str | None = None,
    num_proc: int = 1,
) -> TokenizedMixture:
    """Tokenize every conversation; with a cache_dir the result is stored once and memory-mapped after.

    `template` is a chat template's Jinja source (None: plain prompt + response). Conversations longer
    than `max_length` keep whole turns from the start and are counted (`truncation="truncate"`), or
    stop the run with the count per task (`"error"`).
    """
    train_on = {t: mixture.train_on.get(t, TrainOn.all_assistant) for t in mixture.tasks}
    encoder = Encoder(tokenizer, max_length, template)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fp = fingerprint(
        TOKENIZE_VERSION,
        [mixture.fingerprints[t] for t in mixture.tasks],
        [train_on[t] for t in mixture.tasks],
        max_length,
        template,
        backend.to_str() if backend is not None else tokenizer.name_or_path,
        [tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__],
    )
    build = _Build(mixture, encoder, train_on, num_proc)
    if cache_dir is None:
        tokenized = build.tokenized(None)
    else:
        path = cache_dir / "tokenized" / fp
        build_dir_once(path, build.store, marker="meta.json")
        tokenized = build.load(path)
    counts = {t: n for t, n in zip(mixture.tasks, tokenized.truncated, strict=True) if n}
    if counts and truncation == "error":
        listed = ", ".join(f"{t}: {n}" for t, n in counts.items())
        raise MtftError(
            f"examples longer than data.max_length={max_length} tokens ({listed}); raise data.max_length "
            "or set data.truncation=truncate"
        )
    if counts:
        total = len(tokenized.train) + len(tokenized.validation)
        log.info(
            "truncated %d of %d examples to data.max_length=%d (whole turns kept from the start)",
            sum(counts.values()),
            total,
            max_length,
        )
    return tokenized


@dataclass
class _Build:
    mixture: Mixture
    encoder: Encoder
    train_on: dict[str, TrainOn]
    num_proc: int

    def _split(self, split: str, maps: Path | None) -> tuple[Dataset, list[int], list[int]]:
        """(tokenized rows of every task in order, rows per task, truncated per task)."""
        parts, sizes, truncated = [], [], []
        for task_id, task in enumerate(self.mixture.tasks):
            ds = getattr(self.mixture, split)[task]
            try:
                out = ds.map(
                    _encode_batch,
                    fn_kwargs={
                        "encoder": self.encoder,
                        "train_on": self.train_on[task],
                        "task_id": task_id,
                    },
                    batched=True,
                    remove_columns=ds.column_names,
                    features=TOKENIZED,
                    cache_file_name=str(maps / f"{split}-{task_id}.arrow") if maps else None,
                    num_proc=self.num_proc if len(ds) >= 1000 * self.num_proc else None,
                    desc=f"tokenizing {task} ({split})",
                )
            except RecordError as e:
                where = self.mixture.origins.where(e.file_id, e.row) if e.file_id >= 0 else f"task '{task}'"
                raise MtftError(f"{where}: {e.message}") from None
            truncated.append(pc.sum(out.data.column("truncated")).as_py() or 0)
            parts.append(out.remove_columns("truncated"))
            sizes.append(len(out))
        return concatenate_datasets(parts), sizes, truncated

    def tokenized(self, maps: Path | None) -> TokenizedMixture:
        train, _, truncated = self._split("train", maps)
        validation, sizes, val_truncated = self._split("validation", maps)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        val_rows = [list(range(s, s + n)) for s, n in zip(starts, sizes, strict=True)]
        total = [a + b for a, b in zip(truncated, val_truncated, strict=True)]
        return TokenizedMixture(self.mixture.tasks, train, validation, val_rows, total)

    def store(self, tmp: Path) -> None:
        maps = tmp / "maps"
        maps.mkdir()
        tokenized = self.tokenized(maps)
        tokenized.train.save_to_disk(str(tmp / "train"))
        tokenized.validation.save_to_disk(str(tmp / "validation"))
        shutil.rmtree(maps)
        (tmp / "meta.json").write_text(
            json.dumps({"val_rows": tokenized.val_rows, "truncated": tokenized.truncated})
        )

    def load(self, path: Path) -> TokenizedMixture:
        meta = json.loads((path / "meta.json").read_text())
        return TokenizedMixture(
            tasks=self.mixture.tasks,
            train=Dataset.load_from_disk(str(path / "train")),
            validation=Dataset.load_from_disk(str(path / "validation")),
            val_rows=meta["val_rows"],
            truncated=meta["truncated"],
        )


def _encode_batch(
    batch: dict[str, list], encoder: Encoder, train_on: TrainOn, task_id: int
) -> dict[str, list]:
    try:
        encoded = encoder.encode_batch(list(zip(batch["roles"], batch["contents"], strict=True)), train_on)
    except RecordError as e:  # e.row is the index in this batch
        raise RecordError(batch["row"][e.row], e.message, batch["file_id"][e.row]) from None
    return {
        "input_ids": [ids for ids, _, _ in encoded],
        "labels": [labels for _, labels, _ in encoded],
        "task_id": [task_id] * len(encoded),
        "truncated": [cut for _, _, cut in encoded],
    }
