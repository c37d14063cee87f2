"""TensorBoard sink: every metrics.jsonl row as scalars in event files (`<run dir>/tensorboard/`).

Series names are the same as in W&B (see mtft.loggers.series); the resolved config (secrets
removed) is stored once as text, so `tensorboard --logdir multirun/...` shows what each run was.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mtft.loggers.config import TensorboardConfig
from mtft.loggers.context import RunContext
from mtft.loggers.series import Row, series_by_step


class TensorboardSink:
    """Scalars per step; flushed after every evaluation so a killed run keeps its curves."""

    def __init__(self, cfg: TensorboardConfig, ctx: RunContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else ctx.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        config = yaml.safe_dump({**ctx.config, "choices": ctx.choices}, sort_keys=False)
        self.writer.add_text("config", f"```yaml\n{config}```", global_step=0)

    def write(self, rows: list[Row]) -> None:
        for step, values in sorted(series_by_step(rows).items()):
            for name, value in values.items():
                self.writer.add_scalar(name, value, global_step=step)
        if any(row["split"] == "val" for row in rows):
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
