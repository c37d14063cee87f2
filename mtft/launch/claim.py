"""Claiming a run dir: one run at a time, and a refused run writes nothing into it.

A run holds an exclusive `flock` on `<run dir>/run.lock` for its whole life (the agents of one
multi-node job, `distributed.nnodes > 1`, each a shared one: they share the dir, other runs are kept
out); the kernel drops it when the process ends, however it ends, so a killed run never leaves a
stale lock behind. The files Hydra would write before the task function runs are written here
instead, once the dir is ours (`hydra.output_subdir` is null in train.yaml): a refused run leaves an
existing run's `.hydra/` byte-identical, and its messages go to the console only (the job's log file
opens lazily and is detached before the refusal is logged).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtft.core.errors import MtftError
from mtft.core.rundir import CONFIG, HYDRA_DIR, LOCK, METRICS
from mtft.loggers.context import redact


def _lock(fd: int, run_dir: Path, shared: bool) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MtftError(
            f"{run_dir} is in use by another run (it holds {LOCK}); wait for it to end, or choose "
            "another hydra.run.dir"
        ) from None


@contextmanager
def claim_run_dir(run_dir: Path, resume: str | None, shared: bool = False) -> Iterator[None]:
    """Hold the run dir's lock while the body runs. A run dir another process holds is refused, and
    so, without `trainer.resume`, is one that already holds a run; neither refusal writes anything.
    `shared`: for the agents of one multi-node job, which hold the dir together."""
    fd = None
    with suppress(FileNotFoundError):
        fd = os.open(run_dir / LOCK, os.O_RDWR)
    if fd is not None:
        _lock(fd, run_dir, shared)
    if not resume and (run_dir / METRICS).exists():
        if fd is not None:
            os.close(fd)
        raise MtftError(
            f"{run_dir} already holds a run ({METRICS}): continue it with trainer.resume=auto, "
            "or choose another hydra.run.dir"
        )
    if fd is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        _lock(fd, run_dir, shared)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def leave_run_dir(run_dir: Path) -> None:
    """A refused run reports on the console only, and leaves no trace: its log handler is detached
    and the dir Hydra created for it is removed again if it is still empty."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    with suppress(OSError):  # not empty: another run's dir, left as it is
        run_dir.rmdir()


def write_hydra_files(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` as Hydra writes them (`hydra_cfg`:
    Hydra's own config, under its `hydra` key), secrets redacted, each replaced atomically: the
    config of the run that now uses the dir (`mtft report` and `mtft export` read it). A sweep's
    `multirun.yaml`, which Hydra's launcher wrote with the command line as given, is redacted too."""
    (run_dir / HYDRA_DIR).mkdir(parents=True, exist_ok=True)
    files = {
        run_dir / CONFIG: cfg,
        run_dir / HYDRA_DIR / "hydra.yaml": hydra_cfg,
        run_dir / HYDRA_DIR / "overrides.yaml": hydra_cfg.hydra.overrides.task,
    }
    sweep_file = Path(hydra_cfg.hydra.sweep.dir) / "multirun.yaml"
    if hydra_cfg.hydra.mode == RunMode.MULTIRUN and sweep_file.is_file():
        files[sweep_file] = OmegaConf.load(sweep_file)
    for path, node in files.items():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # jobs of a sweep may share a file
        plain = redact(OmegaConf.to_container(node, resolve=False))
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(plain)), encoding="utf-8")
        os.replace(tmp, path)
