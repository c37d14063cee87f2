"""Checkpoints that resume a run exactly, written atomically, from one process or many.

One `Checkpointer` saves and restores a set of named components, each of which owns its state
(`state_dict`/`load_state_dict`): the backend (model, optimizer, schedule), the balancer, the sampler
position, the trainer's progress, and, per rank, the RNG states and the tracker (each sink's position
in its own files). Nothing else knows the layout. A checkpoint is a directory
`checkpoints/step-XXXXXXXX/` holding `state.pt` (written by rank 0: the components every rank shares),
`rank<r>.pt` (each rank's own components: its RNG states and its sinks), the files of components
that keep their own (DeepSpeed's `deepspeed/`), and `meta.json` (step, mean validation loss, world
size, the run's config, which a resume checks (see mtft.recipe.resume), and the sha256 of every
other file, checked before a checkpoint is used: a damaged latest checkpoint is passed over, with a
warning, for the one before it). It is
written into a temporary directory and renamed into place once every rank has finished, so a kill
during a save never leaves a directory that looks complete: incomplete ones keep their `.tmp-` name
and are ignored (and removed by the next save). Everything is loaded with
`torch.load(weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np
import torch

from mtft.core.dist import barrier, rank, world_size
from mtft.core.errors import MtftError
from mtft.core.rundir import CHECKPOINTS

log = logging.getLogger("mtft")

STEP_DIR = re.compile(r"^step-(\d{8})$")
SHARED_STATE = "state.pt"
META = "meta.json"


def rank_state_file(r: int) -> str:
    """The file of rank `r`'s own components: its RNG states and its sinks' positions."""
    return f"rank{r}.pt"


class Stateful(Protocol):
    """A component that can be checkpointed: its whole state as tensors and plain Python values."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class KeepsFiles(Protocol):
    """A component that writes (part of) its state as its own files, on every rank (DeepSpeed)."""

    def save_files(self, directory: Path) -> None: ...
    def load_files(self, directory: Path) -> None: ...


class RngState:
    """Every random number generator a step can touch (plus the loop's probe generator), as a component."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        """In types `weights_only` loading accepts (numpy's state as lists)."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "probe": self.generator.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(_tuples(state["python"]))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["probe"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples where a save/load round trip may have produced lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class Checkpointer:
    """Saves and restores named components under `<run dir>/checkpoints/`.

    `shared` components hold the same state on every rank, so rank 0 alone writes them; `per_rank`
    ones differ between ranks (RNG streams, a rank's own metrics file), so each rank writes its own.
    Components that keep files (`KeepsFiles`) write them on every rank, before any state is loaded
    back, since their files may carry what their `state_dict` leaves out.
    """

    def __init__(
        self,
        run_dir: Path,
        shared: dict[str, Stateful],
        per_rank: dict[str, Stateful],
        keep: int,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.root = run_dir / CHECKPOINTS
        self.shared, self.per_rank, self.keep, self.config = shared, per_rank, keep, config

    def _with_files(self) -> list[KeepsFiles]:
        return [c for c in [*self.shared.values(), *self.per_rank.values()] if isinstance(c, KeepsFiles)]

    def save(self, step: int, val_mean: float | None) -> Path:
        """Write `step` atomically (every rank calls this), then keep the last `keep` plus the best."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        for component in self._with_files():
            component.save_files(tmp)
        _torch_save(_states(self.per_rank), tmp / rank_state_file(rank()))
        barrier()
        if rank() == 0:
            _torch_save({"step": step, **_states(self.shared)}, tmp / SHARED_STATE)
            meta = {
                "step": step,
                "val_mean": val_mean,
                "world_size": world_size(),
                "config": self.config,
                "sha256": {f.relative_to(tmp).as_posix(): _sha256(f) for f in _files(tmp)},
            }
            (tmp / META).write_text(json.dumps(meta, default=str) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _prune(self.root, self.keep)
        barrier()
        log.info("step %d: checkpoint saved to %s", step, final)
        return final

    def load(self, path: Path) -> int:
        """Restore every component from the checkpoint at `path`; returns its step."""
        shared, own = _read(path)
        for component in self._with_files():
            component.load_files(path)
        for states, components in ((shared, self.shared), (own, self.per_rank)):
            for name, component in components.items():
                if name not in states:
                    raise MtftError(f"checkpoint {path} has no state for '{name}' (written by another mtft?)")
                component.load_state_dict(states[name])
        log.info("resumed from %s at step %d", path, shared["step"])
        return int(shared["step"])


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


class _WriteErrors:
    """torch.save's file, keeping a failed write's OSError (torch raises "unexpected pos" instead)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save, except that a write the file system refuses (ENOSPC, ...) is that OSError."""
    with path.open("wb") as fh:
        file = _WriteErrors(fh)
        try:
            torch.save(obj, file)
        except RuntimeError:
            if file.error is None:
                raise
            raise OSError(file.error.errno, file.error.strerror, str(path)) from None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / META).is_file() and (p / SHARED_STATE).is_file()]


def _files(directory: Path) -> list[Path]:
    """Every file of a checkpoint but its meta.json, which lists their checksums."""
    return sorted(f for f in directory.rglob("*") if f.is_file() and f != directory / META)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path` (None: intact). One written by an mtft that kept
    no checksums is taken as intact."""
    try:
        meta = read_meta(path)
    except MtftError as e:
        return str(e)
    recorded: dict[str, str] = meta.get("sha256", {})
    for name, digest in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def _val_mean(path: Path) -> float | None:
    try:
        return read_meta(path).get("val_mean")
    except MtftError:  # damaged: never the best
        return None


def _prune(root: Path, keep: int) -> None:
    dirs = checkpoint_dirs(root)
    scored = [(_val_mean(d), d) for d in dirs]
    best = min(((v, d) for v, d in scored if v is not None), default=(None, None), key=lambda x: x[0])[1]
    for d in dirs[: max(len(dirs) - keep, 0)]:
        if d != best:
            shutil.rmtree(d)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the latest intact checkpoint in the run dir (None if there is none; damaged ones are
    passed over with a warning); else a path, which must be intact."""
    if resume == "auto":
        dirs = checkpoint_dirs(run_dir / CHECKPOINTS)
        for path in reversed(dirs):
            problem = damage(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s): trying the one before it", path, problem)
        if dirs:
            raise MtftError(f"trainer.resume=auto: every checkpoint in {run_dir / CHECKPOINTS} is damaged")
        return None
    path = Path(resume).expanduser()
    if not (path / SHARED_STATE).is_file():
        raise MtftError(f"trainer.resume={resume}: no checkpoint there (expected {path / SHARED_STATE})")
    problem = damage(path)
    if problem is not None:
        raise MtftError(f"trainer.resume={resume}: the checkpoint is damaged ({problem})")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's `meta.json`."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise MtftError(f"cannot read {path / META}: {e}") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise MtftError(f"{path / META} is not a checkpoint's metadata")
    return meta


def _states(components: dict[str, Stateful]) -> dict[str, Any]:
    return {name: component.state_dict() for name, component in components.items()}


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared state and this rank's own state of the checkpoint at `path`."""
    try:
        shared = torch.load(path / SHARED_STATE, map_location="cpu", weights_only=True)
        own_file = path / rank_state_file(rank())
        if not own_file.is_file():
            raise MtftError(
                f"checkpoint {path} has no state for rank {rank()}: it was written by fewer processes; "
                "resume with the same number of processes"
            )
        return shared, torch.load(own_file, map_location="cpu", weights_only=True)
    except MtftError:
        raise
    except Exception as e:  # a checkpoint that is not ours, or damaged
        raise MtftError(f"cannot load checkpoint {path}: {e}") from None
