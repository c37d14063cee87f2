"""Weights & Biases sink: every metrics.jsonl row as W&B series, one W&B run per mtft job.

Runs of one Hydra multirun share a W&B group (the sweep dir), so the dashboard shows a sweep's
balancers and seeds together; job_type and tags carry the balancer's name and the data choice. The W&B files
live under `<run dir>/wandb/`. The API key is only ever read by wandb itself (from WANDB_API_KEY or
`wandb login`): mtft never passes it, logs it, or writes it to the run dir.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mtft.core.errors import MtftError
from mtft.loggers.config import WandbConfig
from mtft.loggers.context import RunContext, redact
from mtft.loggers.series import Row, series_by_step


def init_kwargs(cfg: WandbConfig, ctx: RunContext) -> dict[str, Any]:
    """The arguments of `wandb.init` for this job: names from the config, else from the sweep."""
    balancer = ctx.balancer
    tags = [f"balancer={balancer}"] if balancer else []
    tags += [f"data={ctx.choices['data']}"] if "data" in ctx.choices else []
    return {
        "mode": str(cfg.mode) if cfg.mode is not None else None,
        "project": cfg.project,
        "entity": cfg.entity,
        "name": cfg.name or (f"{balancer} seed={ctx.config.get('seed')}" if balancer else None),
        "group": cfg.group or ctx.sweep_dir,
        "job_type": cfg.job_type or balancer,
        "tags": [*tags, *cfg.tags],
        "notes": cfg.notes,
        "config": {**ctx.config, "choices": ctx.choices},
        "dir": str(ctx.run_dir),
    }


@contextmanager
def redacted_argv() -> Iterator[None]:
    """`sys.argv` without the values of secret overrides (`...api_key=...`), for as long as W&B reads it."""
    argv = sys.argv
    sys.argv = redact(argv)
    try:
        yield
    finally:
        sys.argv = argv


def previous_run_id(ctx: RunContext) -> str | None:
    """The W&B id of an earlier attempt in this run dir (a resumed run continues the same W&B run)."""
    latest = ctx.run_dir / "wandb" / "latest-run"
    if not latest.is_dir():
        return None
    found = sorted(latest.glob("run-*.wandb"))
    return found[0].stem.removeprefix("run-") if found else None


class WandbSink:
    """Logs each write's rows as one W&B step; `close` finishes the run.

    Its state is the W&B run id: a run restored from a checkpoint continues that W&B run (and one
    that was not, the latest W&B run in the run dir, left by an attempt that died before its first
    checkpoint). W&B steps only go forward, so the steps it already has are skipped when replayed.
    The W&B run starts with the first row, once it is known which run to continue.
    """

    def __init__(self, cfg: WandbConfig, ctx: RunContext) -> None:
        self.kwargs = init_kwargs(cfg, ctx)
        self.ctx = ctx
        self.run_id: str | None = None
        self.run: Any = None

    def _start(self) -> Any:
        import wandb

        kwargs = dict(self.kwargs)
        if (kwargs["mode"] or os.environ.get("WANDB_MODE")) == "offline":
            # Offline means no network, but wandb's own error reporting and telemetry (Sentry,
            # OpenTelemetry) still post to the server unless told not to.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        run_id = self.run_id or previous_run_id(self.ctx)
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        # console="off": the run dir already has the console log (train.log), and the live progress
        # bar stays intact.
        try:
            with redacted_argv():  # W&B records the command line as the run's `args`
                run = wandb.init(**kwargs, settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:
            raise MtftError(
                f"wandb could not start a run: {e} (no network or no login? try logger.wandb.mode=offline)"
            ) from None
        self.run_id = run.id
        return run

    def write(self, rows: list[Row]) -> None:
        if self.run is None:
            self.run = self._start()
        for step, values in sorted(series_by_step(rows).items()):
            if step < self.run.step:
                continue  # a resumed run replays steps W&B already has; W&B steps only go forward
            self.run.log(values, step=step)

    def write_samples(self, step: int, samples: list[Row]) -> None:
        """trainer.sample_interval's answers as a W&B table (`samples`), one per sampling step."""
        import wandb

        if self.run is None:
            self.run = self._start()
        columns = ["step", "task", "prompt", "reference", "prediction"]
        table = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
        self.run.log({"samples": table}, step=max(step, self.run.step))

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state["run_id"]

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
