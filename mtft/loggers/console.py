"""The console: log lines (rich on a terminal, plain elsewhere), a progress bar, and the final table."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

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

from mtft.core.rundir import Summary
from mtft.loggers.base import Row

log = logging.getLogger("mtft")

CONSOLE = Console(stderr=True)  # shared by the progress bar and log lines so they never garble


def console_handler() -> logging.Handler:
    """Log handler for the console (used by mtft/conf/hydra/job_logging/mtft.yaml).

    On a terminal, rich prints lines above the live progress bar; elsewhere (CI, files, pipes)
    lines are plain and never wrapped, so paths in messages stay whole and greppable.
    """
    if CONSOLE.is_terminal:
        return RichHandler(console=CONSOLE, show_path=False, show_time=False, markup=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


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
        stats = f"loss {_fmt(row['loss'])}  {row['tokens_per_s']:,.0f} tok/s  w [{weights}]"
        if self.progress is not None:
            self.progress.update(self.bar, completed=row["step"], stats=stats)
        elif row["step"] % self.every == 0:
            log.info("step %d  %s", row["step"], stats)

    def _val(self, step: int, rows: list[Row]) -> None:
        by_task = {r["task"]: r["loss"] for r in rows if r["split"] == "val"}
        parts = "  ".join(f"{t} {_fmt(by_task.get(t))}" for t in self.tasks)
        log.info("step %d  val  %s  | mean %s", step, parts, _fmt(by_task.get("all")))

    def state_dict(self) -> dict[str, Any]:
        return {}  # the console keeps nothing: a resumed run's lines simply follow the earlier ones

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to rewind."""

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def print_final_table(summary: Summary, run_dir: Path) -> None:
    """First vs final (and best) validation loss per task, then where the run is."""
    table = Table(title=f"validation loss per task ({summary.balancer}, {summary.steps} steps)")
    for col in ("task", "step 0", "final", "best", "change"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task in summary.tasks:
        first, final = summary.initial_val_loss[task], summary.final_val_loss[task]
        change = (final - first) / first * 100 if first and math.isfinite(first) else float("nan")
        table.add_row(
            task, f"{first:.3f}", f"{final:.3f}", f"{summary.best_val_loss[task]:.3f}", f"{change:+.1f}%"
        )
    CONSOLE.print(table)
    CONSOLE.print(
        f"{summary.train_tokens_per_s:,.0f} train tokens/s, {summary.wall_s:.0f}s wall, "
        f"peak RSS {summary.peak_rss_mb:,.0f} MB"
    )
    CONSOLE.print(f"run dir: [bold]{run_dir}[/bold]")
