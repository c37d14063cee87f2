"""What every sink shares: a metrics row, the sink protocol, and the tracker that fans rows out.

Rows follow the run-directory contract: `step`, `split` ("train"/"val"), `task` (a task or "all"),
`loss`; train rows of a task also carry `weight`. Sinks receive the same rows, so adding a logger
(wandb, TensorBoard) means adding a sink, never touching the trainer.
"""

from __future__ import annotations

from typing import Any, Protocol

Row = dict[str, Any]


class Sink(Protocol):
    def write(self, rows: list[Row]) -> None: ...
    def close(self) -> None: ...


class Tracker:
    """Fans rows out to every sink; the trainer only ever talks to this."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, rows: list[Row]) -> None:
        for sink in self.sinks:
            sink.write(rows)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
