"""metrics.jsonl: the one sink every run writes (the run-directory contract's metrics file), and
samples.jsonl, the in-training samples (`trainer.sample_interval`), kept the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from mtft.core.errors import MtftError
from mtft.core.jsonfile import dumps
from mtft.core.rundir import MetricsRow
from mtft.loggers.base import Row


class JsonlSink:
    """metrics.jsonl, appended and flushed row by row so a killed run keeps everything it logged.

    The file is created with the first row, so a run that fails before logging leaves no file behind.
    Its state is its length in bytes: a sink restored from a checkpoint cuts the file back to it (the
    rows written after the checkpoint are replayed), and one that was not restored starts the file
    afresh (an earlier attempt that died before its first checkpoint is replayed whole). A file
    shorter than its checkpoint's record is an error: the rows it lost cannot be replayed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = None
        self._restored_offset: int | None = None

    def write(self, rows: list[Row]) -> None:
        """Each row as a `MetricsRow`, the type the report reads it back through."""
        self._append([MetricsRow.from_dict(row).to_dict() for row in rows])

    def _append(self, rows: list[Row]) -> None:
        if self._fh is None:
            self._fh = self.path.open("w" if self._restored_offset is None else "a", encoding="utf-8")
        for row in rows:
            self._fh.write(dumps(row) + "\n")
        self._fh.flush()

    def state_dict(self) -> dict[str, Any]:
        if self._fh is not None:
            return {"offset": self._fh.tell()}
        return {"offset": self._restored_offset or 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        offset = int(state["offset"])
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < offset:  # rows the checkpoint counts on are gone: never pad, never guess
            raise MtftError(
                f"{self.path} is shorter ({size} bytes) than the checkpoint's record of it ({offset} bytes): "
                "it was cut or replaced since; restore it, or resume from an earlier checkpoint"
            )
        if size > offset:
            with self.path.open("r+b") as fh:
                fh.truncate(offset)
        self._restored_offset = offset

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class SamplesSink(JsonlSink):
    """samples.jsonl: one row per generated sample (step, task, prompt, reference, prediction), rewound
    on resume exactly as metrics.jsonl is, so the steps a resumed run replays are written once."""

    def write(self, rows: list[Row]) -> None:
        """Metrics rows go to metrics.jsonl, not here."""

    def write_samples(self, step: int, samples: list[Row]) -> None:
        self._append(samples)
