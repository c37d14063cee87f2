"""Where a run's numbers go: metrics.jsonl (always), the console, and summary.json at the end.

Rows follow the run-directory contract: `step`, `split` ("train"/"val"), `task` (a task or "all"),
`loss`; train rows of a task also carry `weight`. Sinks receive the same rows, so adding a logger
(wandb, TensorBoard) means adding a sink, never touching the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

log = logging.getLogger("mtft")

Row = dict[str, Any]
CONSOLE = Console(stderr=True)  # shared by the progress bar and log lines so they never garble


def console_handler() -> logging.Handler:
    """Log handler for the console (used by conf/hydra/job_logging/rich.yaml).

    On a terminal, rich prints lines above the live progress bar; elsewhere (CI, files, pipes)
    lines are plain and never wrapped, so paths in messages stay whole and greppable.
    """
    if CONSOLE.is_terminal:
        return RichHandler(console=CONSOLE, show_path=False, show_time=False, markup=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class Sink(Protocol):
    def write(self, rows: list[Row]) -> None: ...
    def close(self) -> None: ...


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


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


class ConsoleSink:
    """A progress bar on a terminal (a periodic log line otherwise) and a compact line per evaluation."""

    def __init__(self, tasks: list[str], max_steps: int, progress: bool = True) -> None:
        self.tasks = tasks
        self.live = progress and CONSOLE.is_terminal
        self.every = max(1, max_steps // 10)
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=CONSOLE,
            )
            self.bar = self.progress.add_task("train", total=max_steps, stats="")
            self.progress.start()

    def write(self, rows: list[Row]) -> None:
        for row in rows:
            if row["task"] != "all":
                continue
            if row["split"] == "train":
                self._train(row, rows)
            else:
                self._val(row["step"], rows)

    def _train(self, row: Row, rows: list[Row]) -> None:
        weights = " ".join(f"{r['weight']:.2f}" for r in rows if r["split"] == "train" and r["task"] != "all")
        stats = f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s  w [{weights}]"
        if self.progress is not None:
            self.progress.update(self.bar, completed=row["step"], stats=stats)
        elif row["step"] % self.every == 0:
            log.info("step %d  %s", row["step"], stats)

    def _val(self, step: int, rows: list[Row]) -> None:
        by_task = {r["task"]: r["loss"] for r in rows if r["split"] == "val"}
        parts = "  ".join(f"{t} {_fmt(by_task.get(t))}" for t in self.tasks)
        log.info("step %d  val  %s  | mean %s", step, parts, _fmt(by_task.get("all")))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


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


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")


def print_final_table(summary: dict[str, Any], run_dir: Path) -> None:
    """First vs final (and best) validation loss per task, then where the run is."""
    table = Table(title=f"validation loss per task ({summary['balancer']}, {summary['steps']} steps)")
    for col in ("task", "step 0", "final", "best", "change"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task in summary["tasks"]:
        first, final = summary["initial_val_loss"][task], summary["final_val_loss"][task]
        change = (final - first) / first * 100 if first and math.isfinite(first) else float("nan")
        table.add_row(
            task, f"{first:.3f}", f"{final:.3f}", f"{summary['best_val_loss'][task]:.3f}", f"{change:+.1f}%"
        )
    CONSOLE.print(table)
    CONSOLE.print(
        f"{summary['train_tokens_per_s']:,.0f} train tokens/s, {summary['wall_s']:.0f}s wall, "
        f"peak RSS {summary['peak_rss_mb']:,.0f} MB"
    )
    CONSOLE.print(f"run dir: [bold]{run_dir}[/bold]")
