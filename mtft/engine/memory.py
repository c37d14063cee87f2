"""The memory a run used, for summary.json: peak host RSS, and peak GPU memory where CUDA ran."""

from __future__ import annotations

import resource

import torch


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_memory_mb() -> float | None:
    """Peak memory torch allocated on the current GPU; None if this process never used CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
