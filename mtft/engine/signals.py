"""Stopping on a signal: a scheduler's time limit or Ctrl-C ends a run at a step boundary, after a
checkpoint, so it resumes exactly; every rank stops at the same step."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

from mtft.core.dist import all_reduce_sum, world_size

log = logging.getLogger("mtft")


class StopSignal:
    """SIGTERM/SIGINT/SIGUSR2 handler: the first signal asks the loop to checkpoint and stop after the
    current step; a second one stops at once (KeyboardInterrupt)."""

    def __init__(self, finishing: str = "finishing step, saving a checkpoint") -> None:
        self.signum: int | None = None
        self.finishing = finishing  # what is done before stopping, for the message
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: %s, then stopping", signal.Signals(signum).name, self.finishing)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            # SIGUSR2: what SLURM sends ahead of the time limit under submitit (`signal_delay_s`).
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                self._previous[signum] = signal.signal(signum, self)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def on_any_rank(self) -> bool:
        """True on every rank once any rank got a signal (one small all-reduce; free in one process),
        so the ranks stop at the same step."""
        received = self.signum is not None
        if world_size() == 1:
            return received
        return bool(all_reduce_sum(torch.tensor([float(received)])).item() > 0)
