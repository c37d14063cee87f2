"""Quality: the balancer sweep (uniform, coba, gradnorm, famo x seeds) on codetasks at a fixed token
budget, run through the real `mtft train` CLI (Hydra multirun of experiment=balancer_sweep) and
compared by `mtft report`, whose table is embedded in BENCHMARKS.md as printed.

With proportional sampling the batches depend only on the seed, never on the balancer, so every
balancer of a seed trains on exactly the same tokens: the budget is `steps x batch_size` sequences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT


def mtft(args: Sequence[str], threads: int | None) -> None:
    """Run the `mtft` CLI as a user would, output streamed to this process's output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, "-m", "mtft", *args], cwd=ROOT, env=env, check=True)


def sweep(
    out_dir: Path,
    seeds: Sequence[int],
    steps: int,
    eval_interval: int,
    jobs: int,
    extra: Sequence[str] = (),
    balancers: str = "uniform,coba_tiny,gradnorm,famo",
) -> Path:
    """One Hydra multirun of the sweep recipe into `out_dir`; `jobs` > 1 runs jobs in parallel processes."""
    args = [
        "train",
        "-m",
        "experiment=balancer_sweep",
        f"balancer={balancers}",
        f"seed={','.join(str(s) for s in seeds)}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_interval={eval_interval}",
        "trainer.save_interval=null",
        "logger.progress=false",
        f"hydra.sweep.dir={out_dir}",
        *extra,
    ]
    if jobs > 1:
        args += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    mtft(args, threads=1 if jobs > 1 else None)  # two jobs on two cores: one thread each
    return out_dir


def report(sweep_dir: Path) -> str:
    """`mtft report` on the sweep; returns the Markdown table it wrote (report.md)."""
    mtft(["report", str(sweep_dir)], threads=None)
    return (sweep_dir / "report" / "report.md").read_text()


def summaries(sweep_dir: Path) -> list[dict[str, Any]]:
    """The summary.json of every finished job of a sweep, with the job's data overrides."""
    out = []
    for path in sorted(sweep_dir.glob("*/summary.json")):
        s = json.loads(path.read_text())
        tokens = 0
        for line in (path.parent / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["split"] == "train" and row["task"] == "all":
                tokens += int(row.get("tokens") or 0)
        s["train_tokens"] = tokens
        out.append(s)
    return out
