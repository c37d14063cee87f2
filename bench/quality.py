"""Quality: the balancer sweep (uniform, coba, gradnorm, famo x seeds) on codetasks at a fixed token
budget, run through the real `mtft train` CLI (Hydra multirun of experiment=balancer_sweep) and
compared by `mtft report`, whose table is embedded in BENCHMARKS.md as printed; then the same on each
embedded scenario (conf/data/codetasks_*.yaml), where some balancer's paper claims an effect.

The batches depend only on the seed, never on the balancer (proportional and uniform sampling
alike), so every balancer of a seed trains on exactly the same tokens: the budget is
`steps x batch_size` sequences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
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


def report(sweep_dir: Path, *more: Path, out: Path | None = None) -> str:
    """`mtft report` on the sweep (and `more` sweeps beside it); returns the report.md it wrote."""
    out = out or sweep_dir / "report"
    mtft(["report", str(sweep_dir), *map(str, more), "-o", str(out)], threads=None)
    return (out / "report.md").read_text()


@dataclass(frozen=True)
class Scenario:
    """An embedded data config (conf/data/) and the balancer claim it is built to show."""

    data: str
    focus: str  # the task the claim is about
    claim: str
    steps: int  # optimizer steps per run: long enough for the effect the claim is about to appear
    overrides: tuple[str, ...] = ()  # trainer settings every run of the scenario takes
    # Extra sweeps beside the four balancers: (name, balancer option, overrides).
    variants: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


SCENARIOS = (
    Scenario(
        "codetasks_skewed",
        "function_naming",
        "CoBa: the small task's rise from its best shrinks, the mean final loss is no worse",
        400,
        # A constant learning rate: under a cosine decay the small task's rise fades as the rate does.
        ("trainer.scheduler=constant_with_warmup",),
        (
            ("famo_next_batch", "famo", ("balancer.post_step_loss=next_batch",)),
            ("coba_reference", "coba_reference", ()),
            ("coba_probe64", "coba", ("balancer.probe_rows=64",)),
        ),
    ),
    Scenario(
        "codetasks_scaled",
        "returns_value",
        "FAMO: every task's log-loss falls at a similar rate; GradNorm: training rates equalize",
        150,
    ),
)
BALANCERS = "uniform,coba,famo,gradnorm"
# End-of-run eval (generation metrics) on the first N validation examples per task, so that a
# sweep's greedy generation stays a few minutes on two cores.
EVAL_SAMPLES = 32
EVAL_AT_END = ("trainer.eval_at_end=true", f"eval.max_samples={EVAL_SAMPLES}")
# The scenarios' budget: short sequences (data config) and small batches, so that 4 balancers x 3
# seeds x 2 scenarios fit in well under an hour on two cores.
SCENARIO_BATCH = 8


def scenario(out_dir: Path, sc: Scenario, seeds: Sequence[int], eval_interval: int, jobs: int) -> str:
    """Every balancer (and variant) on one scenario, then one `mtft report` over all of them."""
    extra = [f"data={sc.data}", f"trainer.batch_size={SCENARIO_BATCH}", *sc.overrides, *EVAL_AT_END]
    dirs = [sweep(out_dir / "main", seeds, sc.steps, eval_interval, jobs, extra, BALANCERS)]
    for name, balancer, overrides in sc.variants:
        dirs.append(
            sweep(out_dir / name, seeds, sc.steps, eval_interval, jobs, [*extra, *overrides], balancer)
        )
    return report(*dirs, out=out_dir / "report")


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
