"""What every sink shares: a metrics row, the sink protocol, and the tracker that fans rows out.

Rows follow the run-directory contract: `step`, `split` ("train"/"val"), `task` (a task or "all"),
`loss`; train rows of a task also carry `weight`. Sinks receive the same rows, so adding a logger
(wandb, TensorBoard) means adding a sink, never touching the trainer.

Every sink owns its position in its own output (`state_dict`/`load_state_dict`): the tracker is a
component of the checkpoint, and restoring it rewinds each sink to the checkpoint's step, so the steps
a resumed run replays are written once, and nothing else ever edits a sink's files.
"""

from __future__ import annotations

from typing import Any, Protocol

Row = dict[str, Any]


class Sink(Protocol):
    def write(self, rows: list[Row]) -> None: ...
    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Where the sink stands in its output after the rows written so far."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rewind to `state` (called before any row is written), dropping what came after it."""
        ...


class Tracker:
    """Fans rows out to every sink; the trainer only ever talks to this."""

    def __init__(self, sinks: list[Sink]) -> None:
        names = [_name(sink) for sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"one sink of each kind: their states are keyed by kind, got {names}")
        self.sinks = sinks

    def log(self, rows: list[Row]) -> None:
        for sink in self.sinks:
            sink.write(rows)

    def log_samples(self, step: int, samples: list[Row]) -> None:
        """Generated text (task, prompt, reference, prediction per row) to the sinks that show text:
        those with a `write_samples(step, samples)` method."""
        for sink in self.sinks:
            write = getattr(sink, "write_samples", None)
            if write is not None:
                write(step, samples)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def state_dict(self) -> dict[str, Any]:
        """Each sink's state under its class name (a job has at most one sink of a kind)."""
        return {_name(sink): sink.state_dict() for sink in self.sinks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rewind every sink that has a saved state; one added since the checkpoint starts afresh."""
        for sink in self.sinks:
            if _name(sink) in state:
                sink.load_state_dict(state[_name(sink)])


def _name(sink: Sink) -> str:
    return type(sink).__name__
