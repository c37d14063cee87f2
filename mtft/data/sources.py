"""Where a task's records come from: local files, directories, globs or a Hub dataset, read by `datasets`.

Each file is loaded into an Arrow table (memory-mapped from `datasets`' cache, so a mixture larger than
RAM is never held as Python objects), its format detected from its first record, and every record
turned into a conversation (mtft/data/formats.py) by a cached `Dataset.map`. A record that cannot
be read stops the run with a one-line error naming its file and line (or row).
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value, concatenate_datasets

from mtft.core.errors import MtftError
from mtft.data.config import Format, HubSource, TaskConfig
from mtft.data.formats import Reader, RecordError, detect

NORMALIZE_VERSION = 1
# File suffix -> the `datasets` builder that reads it.
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
# Leading bytes of binary and compressed files, so a file under the wrong name is named for what it is.
MAGIC = {
    b"\x1f\x8b": "gzip-compressed",
    b"PK\x03\x04": "a zip archive",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ": "xz-compressed",
    b"PAR1": "a Parquet file",
    b"ARROW1": "an Arrow file",
    b"\xff\xff\xff\xff": "an Arrow stream",
}
COLUMNS = ("roles", "contents", "key", "file_id", "row")  # of a normalized task split


@dataclass
class Origins:
    """The files records came from, so a row can be named as `file:line` when something is wrong with it."""

    names: list[str] = field(default_factory=list)

    def add(self, name: str) -> int:
        self.names.append(name)
        return len(self.names) - 1

    def where(self, file_id: int, row: int) -> str:
        name = self.names[file_id]
        if name.endswith((".jsonl", ".jsonl.gz")) and Path(name).is_file():
            return f"{name}:{_line_of_row(Path(name), row)}"
        return f"{name} row {row + 1}"


def suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(BUILDERS, key=len, reverse=True) if name.endswith(s)), path.suffix.lower())


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def resolve(spec: str, key: str) -> list[Path]:
    """The data files (or `save_to_disk` directories) one entry of a task's file list names."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in found if p.is_file() and suffix(p) in BUILDERS]
        if not files:
            raise MtftError(f"{key}: the glob {spec} matches no data files ({', '.join(BUILDERS)})")
        return files
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and suffix(p) in BUILDERS)
        if not files:
            raise MtftError(f"{key}: the directory {path} holds no data files ({', '.join(BUILDERS)})")
        return files
    if not path.exists():
        raise MtftError(f"{key}: no such file or directory: {path}")
    if suffix(path) not in BUILDERS:
        raise MtftError(f"{key}: {path}: unsupported file type (supported: {', '.join(BUILDERS)})")
    return [path]


def check_file(path: Path) -> None:
    """Refuse a file whose bytes are not what its name says (a compressed or binary file as .jsonl)."""
    if path.is_dir():
        return
    with path.open("rb") as fh:
        head = fh.read(8192)
    if not head.strip() and path.stat().st_size <= len(head):
        raise MtftError(f"{path}: no records (the file is empty)")
    kind = next((what for magic, what in MAGIC.items() if head.startswith(magic)), None)
    expected = {".jsonl.gz": "gzip-compressed", ".json.gz": "gzip-compressed", ".parquet": "a Parquet file"}
    want = expected.get(suffix(path))
    if want is not None:
        if kind != want:
            raise MtftError(f"{path}: not {want} as its name says")
    elif suffix(path) == ".arrow":
        if kind not in ("an Arrow file", "an Arrow stream"):
            raise MtftError(f"{path}: not an Arrow file as its name says")
    elif kind is not None or b"\x00" in head:
        rename = {"gzip-compressed": ".jsonl.gz", "a Parquet file": ".parquet", "an Arrow stream": ".arrow"}
        hint = f"; name it for what it is (e.g. {rename[kind]})" if kind in rename else ""
        raise MtftError(f"{path}: {kind or 'a binary file'}, not {suffix(path)} text{hint}")


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the non-blank lines: the rows `datasets` reads from a JSON-lines file."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield lineno, line


def _line_of_row(path: Path, row: int) -> int:
    for i, (lineno, _) in enumerate(_lines(path)):
        if i == row:
            return lineno
    return row + 1


def _first_bad_line(path: Path) -> str | None:
    """`file:line: what is wrong` for the first line of a JSON-lines file that is not a JSON object."""
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"{where}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            return f"{where}: malformed JSON ({e.msg} at column {e.colno})"
        if not isinstance(record, dict):
            return f"{where}: expected a JSON object, got {type(record).__name__}"
    return None


def _cache(cache_dir: Path) -> str:
    return str(cache_dir / "datasets")


def load_file(path: Path, cache_dir: Path) -> Dataset:
    """One data file (or saved dataset) as a memory-mapped Dataset."""
    check_file(path)
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        builder = BUILDERS[suffix(path)]
        # CSV has no types: every cell is text (an answer "3" must not become the number 3).
        options = _csv_options(path) if builder == "csv" else {}
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=_cache(cache_dir), **options
        )
    except Exception as e:  # datasets and pyarrow raise many types; the user needs file and line
        bad = _first_bad_line(path) if suffix(path) in (".jsonl", ".jsonl.gz") else None
        raise MtftError(bad or f"{path}: cannot be read ({_first_line(e)})") from None


def _csv_options(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def load_hub(hub: HubSource, split: str, key: str, cache_dir: Path) -> Dataset:
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            hub.path, hub.name, split=split, revision=hub.revision, cache_dir=_cache(cache_dir)
        )
    except Exception as e:  # offline, unknown id, unknown split: all the same to the user
        raise MtftError(
            f"{key}: cannot load '{hub.path}' (split {split}) from the Hub: {_first_line(e)}. Offline? "
            "Save it where you have a network (`datasets.load_dataset(...).save_to_disk(DIR)`) and list DIR "
            "in the task's train: instead"
        ) from None


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:20]


def _file_identity(path: Path) -> list:
    if path.is_dir():
        return [str(path), sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir())]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def normalize_batch(
    batch: dict[str, list], indices: list[int], reader: Reader, file_id: int
) -> dict[str, list]:
    """A batch of records as conversations (COLUMNS); `indices` are the records' rows in file `file_id`."""
    out: dict[str, list] = {name: [] for name in COLUMNS}
    names = list(batch)
    for i, row in enumerate(indices):
        record = {name: batch[name][i] for name in names}
        try:
            roles, contents = reader.conversation(record)
        except ValueError as e:
            raise RecordError(row, str(e)) from None
        out["roles"].append(roles)
        out["contents"].append(contents)
        out["key"].append(content_key(contents))
        out["file_id"].append(file_id)
        out["row"].append(row)
    return out


def content_key(contents: list[str]) -> str:
    """A hash of the text, for content-stable order and hold-out (`prompt\\0response` for a single turn)."""
    return hashlib.sha1("\x00".join(contents).encode()).hexdigest()


@dataclass
class TaskReader:
    """Reads one task's files or Hub splits as conversations; records name the task they belong to."""

    name: str
    task: TaskConfig
    origins: Origins
    cache_dir: Path
    num_proc: int

    def files(self, specs: list[str], key: str) -> Dataset:
        """Every file that `specs` (the task's list under `key`) names, normalized and concatenated in order."""
        parts = []
        for spec in specs:
            for path in resolve(spec, key):
                raw = load_file(path, self.cache_dir)
                parts.append(self._normalize(raw, str(path), _file_identity(path)))
        return concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    def hub(self, split: str) -> Dataset:
        hub = self.task.hub
        raw = load_hub(hub, split, f"data.tasks.{self.name}.hub", self.cache_dir)
        return self._normalize(raw, f"{hub.path}[{split}]", raw._fingerprint)

    def _normalize(self, raw: Dataset, origin: str, identity: Any) -> Dataset:
        """Every record of `raw` as a conversation (columns COLUMNS); the result is cached on disk."""
        file_id = self.origins.add(origin)
        if len(raw) == 0:
            raise MtftError(f"{origin}: no records")
        task, fmt = self.task, self.task.format
        if fmt == Format.auto:
            try:
                fmt = detect(raw[0], task.columns)
            except ValueError as e:
                raise MtftError(f"{self.origins.where(file_id, 0)}: {e}") from None
        reader = Reader(fmt, task.columns, task.roles, self.name)
        fp = fingerprint(NORMALIZE_VERSION, identity, fmt, task.columns, task.roles, self.name)
        path = self.cache_dir / "records" / f"{fp}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return raw.map(
                normalize_batch,
                fn_kwargs={"reader": reader, "file_id": file_id},
                batched=True,
                with_indices=True,
                remove_columns=raw.column_names,
                cache_file_name=str(path),
                new_fingerprint=fp,
                num_proc=self.num_proc if len(raw) >= 1000 * self.num_proc else None,
                desc=f"reading {origin}",
            )
        except RecordError as e:
            raise MtftError(f"{self.origins.where(file_id, e.row)}: {e.message}") from None
        except UnicodeDecodeError:  # Arrow keeps invalid UTF-8 in a string column until it is read
            bad = _first_bad_line(Path(origin)) if suffix(Path(origin)) in (".jsonl", ".jsonl.gz") else None
            raise MtftError(bad or f"{origin}: not UTF-8 text") from None
