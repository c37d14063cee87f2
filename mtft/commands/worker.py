"""One rank of a job started by `mtft train distributed.nproc_per_node=N` (see mtft.launch.workers).

python -m mtft.commands.worker RUN_DIR/launch_config.yaml RUN_DIR PARENT_PID
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from mtft.commands.exits import fail
from mtft.core.rundir import TRAIN_LOG

log = logging.getLogger("mtft")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker the moment the `mtft train` that started it dies, however it
    dies (kill -9 included): an orphan would keep training into a run dir whose lock is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the call above: this worker is an orphan
        os.kill(os.getpid(), signal.SIGKILL)


def _setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs like the Hydra job does (console and <run dir>/train.log); other ranks only warn."""
    from mtft.loggers.console import console_handler

    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console_handler())
    if rank == 0:
        file = logging.FileHandler(run_dir / TRAIN_LOG)
        file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(file)


def main(argv: list[str]) -> int:
    config_path, run_dir = Path(argv[0]), Path(argv[1])
    _die_with_parent(int(argv[2]))
    from mtft.launch.process_group import join_process_group
    from mtft.recipe.config import load_config
    from mtft.recipe.finetune import train

    _setup_logging(run_dir, int(os.environ.get("RANK", "0")))
    try:
        cfg = load_config(config_path)  # the resolved config the parent wrote, checked again
        # The same join as every other launcher's, with the parent's resolved backend and timeout.
        join_process_group(cfg.distributed.backend, cfg.distributed.timeout_min)
        # The parent resolved and checked the checkpoint: its path, or null for a fresh start.
        train(cfg, run_dir, cfg.trainer.resume and Path(cfg.trainer.resume))
    except Exception as e:
        return fail(e, logged=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
