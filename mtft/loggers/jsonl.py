"""metrics.jsonl: the one sink every run writes (the run-directory contract's metrics file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from mtft.loggers.base import Row


class JsonlSink:
    """metrics.jsonl, appended and flushed row by row so a killed run keeps everything it logged.

    The file is created with the first row, so a run that fails before logging leaves no file behind.
    Its state is its length in bytes: a sink restored from a checkpoint cuts the file back to it (the
    rows written after the checkpoint are replayed), and one that was not restored starts the file
    afresh (an earlier attempt that died before its first checkpoint is replayed whole).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = None
        self._restored_offset: int | None = None

    def write(self, rows: list[Row]) -> None:
        if self._fh is None:
            self._fh = self.path.open("w" if self._restored_offset is None else "a", encoding="utf-8")
        for row in rows:
            self._fh.write(json.dumps(row, allow_nan=False) + "\n")
        self._fh.flush()

    def state_dict(self) -> dict[str, Any]:
        if self._fh is not None:
            return {"offset": self._fh.tell()}
        return {"offset": self._restored_offset or 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        offset = int(state["offset"])
        if self.path.exists() and self.path.stat().st_size > offset:
            with self.path.open("r+b") as fh:
                fh.truncate(offset)
        self._restored_offset = offset

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
