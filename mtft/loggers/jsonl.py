"""metrics.jsonl: the one sink every run writes (the run-directory contract's metrics file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from mtft.loggers.base import Row


class JsonlSink:
    """metrics.jsonl, appended and flushed row by row so a killed run keeps everything it logged.

    The file is created with the first row, so a run that fails before logging leaves no file behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = None

    def write(self, rows: list[Row]) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        for row in rows:
            self._fh.write(json.dumps(row, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
