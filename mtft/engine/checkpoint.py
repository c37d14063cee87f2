"""Checkpoints that resume a run exactly, written atomically, from one process or many.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding `state.pt` (written by rank 0: the
model, optimizer and scheduler unless the engine keeps its own files, the balancer, the sampler
position, the metrics.jsonl byte offset and the trainer's running totals), `rng-rank<r>.pt` (every
RNG state of each rank), the engine's own files if it has any (DeepSpeed's `deepspeed/`), and
`meta.json` (step, mean validation loss). It is written into a temporary directory and renamed into
place once every rank has finished, so a kill during a save never leaves a directory that looks
complete: incomplete ones keep their `.tmp-` name and are ignored (and removed by the next save).
Everything is loaded with `torch.load(weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtft.core.dist import barrier, rank
from mtft.core.errors import MtftError

log = logging.getLogger("mtft")

STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random number generator a step can touch, in types `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "probe": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["probe"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples where a save/load round trip may have produced lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "meta.json").is_file() and (p / "state.pt").is_file()]


def save_checkpoint(
    root: Path,
    step: int,
    state: dict[str, Any],
    rng: dict[str, Any],
    val_mean: float | None,
    keep: int,
    save_engine: Callable[[Path], None],
) -> Path:
    """Write `step` atomically (every rank calls this), then keep the last `keep` plus the best."""
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    save_engine(tmp)
    torch.save(rng, tmp / f"rng-rank{rank()}.pt")
    barrier()
    if rank() == 0:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "val_mean": val_mean}) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    barrier()
    return final


def _fsync_tree(path: Path) -> None:
    for sub in path.rglob("*"):
        if sub.is_dir():
            _fsync_dir(sub)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    for file in [*path.iterdir(), path] if path.is_dir() else [path]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prune(root: Path, keep: int) -> None:
    dirs = checkpoint_dirs(root)
    scored = [(json.loads((d / "meta.json").read_text()).get("val_mean"), d) for d in dirs]
    best = min(((v, d) for v, d in scored if v is not None), default=(None, None), key=lambda x: x[0])[1]
    for d in dirs[: max(len(dirs) - keep, 0)]:
        if d != best:
            shutil.rmtree(d)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the latest complete checkpoint in the run dir (None if there is none); else a path."""
    if resume == "auto":
        dirs = checkpoint_dirs(run_dir / "checkpoints")
        return dirs[-1] if dirs else None
    path = Path(resume).expanduser()
    if not (path / "state.pt").is_file():
        raise MtftError(f"trainer.resume={resume}: no checkpoint there (expected {path / 'state.pt'})")
    return path


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer state and this rank's RNG states of the checkpoint at `path`."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rng_file = path / f"rng-rank{rank()}.pt"
        if not rng_file.is_file():
            raise MtftError(
                f"checkpoint {path} has no RNG state for rank {rank()}: it was written by fewer processes; "
                "resume with the same number of processes"
            )
        return state, torch.load(rng_file, map_location="cpu", weights_only=True)
    except MtftError:
        raise
    except Exception as e:  # a checkpoint that is not ours, or damaged
        raise MtftError(f"cannot load checkpoint {path}: {e}") from None
