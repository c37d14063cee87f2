"""TensorBoard sink: every metrics.jsonl row as scalars in event files (`<run dir>/tensorboard/`).

Series names are the same as in W&B (see mtft.loggers.series); the resolved config (secrets
removed) is stored once as text, so `tensorboard --logdir multirun/...` shows what each run was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mtft.loggers.config import TensorboardConfig
from mtft.loggers.context import RunContext
from mtft.loggers.series import Row, series_by_step


class TensorboardSink:
    """Scalars per step; flushed after every evaluation so a killed run keeps its curves.

    Event files are append-only, so a resumed run cannot cut them back; instead its writer opens with
    `purge_step` = the checkpoint's step + 1, which tells TensorBoard to hide every earlier event from
    that step on, so the replayed steps show once. A run that was not restored purges from step 0
    (an attempt that died before its first checkpoint). The writer opens with the first row, once it
    is known which of the two this run is.
    """

    def __init__(self, cfg: TensorboardConfig, ctx: RunContext) -> None:
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else ctx.run_dir / "tensorboard"
        self.ctx = ctx
        self.step = -1  # the last step written (or restored)
        self._writer: Any = None

    def _open(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.step + 1)
        if self.step < 0:
            config = yaml.safe_dump({**self.ctx.config, "choices": self.ctx.choices}, sort_keys=False)
            writer.add_text("config", f"```yaml\n{config}```", global_step=0)
        return writer

    def write(self, rows: list[Row]) -> None:
        if self._writer is None:
            self._writer = self._open()
        for step, values in sorted(series_by_step(rows).items()):
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step)
            self.step = max(self.step, step)
        if any(row["split"] == "val" for row in rows):
            self._writer.flush()

    def write_samples(self, step: int, samples: list[Row]) -> None:
        """trainer.sample_interval's answers as text, one entry per task (`samples/<task>`) and step."""
        if self._writer is None:
            self._writer = self._open()
        by_task: dict[str, list[str]] = {}
        for s in samples:
            by_task.setdefault(s["task"], []).append(
                f"**prompt**\n```\n{s['prompt']}\n```\n**reference**\n```\n{s['reference']}\n```\n"
                f"**prediction**\n```\n{s['prediction']}\n```"
            )
        for task, texts in by_task.items():
            self._writer.add_text(f"samples/{task}", "\n\n---\n\n".join(texts), global_step=step)
        self._writer.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
