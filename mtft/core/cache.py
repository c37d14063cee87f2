"""Build-once cache directories, published atomically so parallel jobs never see half a build."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_dir_once(path: Path, build: Callable[[Path], None], marker: str) -> Path:
    """Return `path`, first calling `build(tmp_dir)` and renaming it to `path` if `path/marker` is absent.

    If another process publishes the same directory first, its copy is kept and ours is discarded.
    """
    if (path / marker).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        build(tmp)
        os.replace(tmp, path)
    except OSError:
        if not (path / marker).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
