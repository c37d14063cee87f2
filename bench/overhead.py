"""Balancer overhead: median step time of coba, famo and gradnorm relative to uniform as the number of
tasks T grows, and peak memory (RSS) per balancer.

Tasks are synthetic splits of codetasks (each of the four tasks cut into T/4 round-robin parts; for
T=2, pairs merged), so the data and the model are the same at every T and only the balancer's
bookkeeping grows. Balancers run at their default settings, except that CoBa's warm-up is shortened
to a few steps so its weight update (not only its validation probe) is inside the measured steps.
CoBa probes once every `update_interval` steps, so the timed steps are a whole number of intervals
and a ratio compares total times: a median over steps would leave the probe steps out.
Peak RSS is process-wide, so it is measured in a fresh subprocess per balancer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from bench.common import ROOT, Setup, median, quiet, run_mtft
from mtft.balancers.coba import CobaBalancerConfig
from mtft.data.batch import Batch
from mtft.data.mixture import TokenizedMixture
from mtft.engine.forward import task_token_loss
from mtft.engine.memory import peak_rss_mb

BALANCERS = ("uniform", "coba", "famo", "gradnorm")


def balancer_overrides(name: str, warmup: int) -> list[str]:
    """Default settings; CoBa's warm-up cut to `warmup` steps so its update math is measured too."""
    if name == "coba":
        return ["balancer=coba", f"balancer.warmup_steps={warmup}"]
    return [f"balancer={name}"]


def _split_ids(task_ids: np.ndarray, num_tasks: int) -> np.ndarray:
    rows = np.arange(len(task_ids))
    if num_tasks >= 4:
        parts = num_tasks // 4
        return task_ids * parts + rows % parts
    return task_ids % num_tasks


def split_tasks(data: TokenizedMixture, num_tasks: int) -> TokenizedMixture:
    """The same examples relabelled into `num_tasks` synthetic tasks (a power of two, 2 to 4 x 2^k)."""
    if num_tasks < 2 or (num_tasks >= 4 and num_tasks % 4) or num_tasks == 3:
        raise ValueError(f"num_tasks must be 2 or a multiple of 4, got {num_tasks}")

    def relabel(ds: Any) -> tuple[Any, np.ndarray]:
        ids = _split_ids(np.asarray(ds["task_id"]), num_tasks)
        return ds.remove_columns("task_id").add_column("task_id", ids.tolist()), ids

    train, _ = relabel(data.train)
    validation, val_ids = relabel(data.validation)
    return TokenizedMixture(
        tasks=[f"t{i:02d}" for i in range(num_tasks)],
        train=train,
        validation=validation,
        val_rows=[np.flatnonzero(val_ids == t).tolist() for t in range(num_tasks)],
        truncated=[0] * num_tasks,
    )


def run(
    setup: Setup,
    task_counts: Sequence[int],
    reps: int,
    steps: int,
    warmup: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every balancer at every T, `reps` times in rotating order; per-rep ratios to uniform, medians."""
    check_whole_intervals(steps, warmup)
    out: dict[str, Any] = {"reps": reps, "steps": steps, "warmup": warmup, "by_tasks": {}}
    for T in task_counts:
        data = split_tasks(setup.data, T)
        times: dict[str, list[list[float]]] = {b: [] for b in BALANCERS}
        for rep in range(reps):
            order = BALANCERS[rep % len(BALANCERS) :] + BALANCERS[: rep % len(BALANCERS)]
            for name in order:
                t = run_mtft(
                    setup, steps, warmup, data=data, balancer_overrides=balancer_overrides(name, warmup)
                )
                times[name].append(t.step_times)
                log(f"  T={T:2d} rep {rep + 1}/{reps} {name:8s} median step {t.median_step_s * 1000:6.1f} ms")
        out["by_tasks"][str(T)] = {name: _summarize(times[name], times["uniform"]) for name in BALANCERS}
    return out


def run_accum(
    setup: Setup, grad_accum: int, reps: int, steps: int, warmup: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """CoBa's probe is one forward per optimizer step, so its relative cost falls with gradient
    accumulation (larger effective batches, as in real finetuning): uniform vs coba at T=4."""
    check_whole_intervals(steps, warmup)
    times: dict[str, list[list[float]]] = {"uniform": [], "coba": []}
    for rep in range(reps):
        for name in ("uniform", "coba") if rep % 2 == 0 else ("coba", "uniform"):
            t = run_mtft(
                setup,
                steps,
                warmup,
                balancer_overrides=balancer_overrides(name, warmup),
                grad_accum=grad_accum,
            )
            times[name].append(t.step_times)
            log(
                f"  grad_accum={grad_accum} rep {rep + 1}/{reps} {name:8s} median step {t.median_step_s * 1000:6.1f} ms"
            )
    return {"grad_accum": grad_accum, **{n: _summarize(times[n], times["uniform"]) for n in times}}


def run_lean(setup: Setup, reps: int, batches: int) -> dict[str, float]:
    """The lean LM head (only scored positions) against the full one, paired batch by batch in one
    process: training forward+backward on training batches, and the no-grad forward of validation
    batches (what CoBa's probe and the evaluation run); and the probe's no-grad forward as a fraction
    of a training forward+backward (what CoBa adds per step at grad_accum=1, before the optimizer)."""
    model, collate = setup.model(), setup.collator()
    rows = torch.randint(len(setup.data.validation), (batches, setup.cfg.trainer.batch_size))
    train_batches = [
        collate(setup.data.train.__getitems__(b))
        for b, _ in zip(setup.sampler(), range(batches), strict=False)
    ]
    val_batches = [collate(setup.data.validation.__getitems__(r.tolist())) for r in rows]
    T = len(setup.data.tasks)

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def train(batch: Batch, lean: bool) -> None:
        sums, counts = task_token_loss(model, batch, T, lean=lean)
        (sums.sum() / counts.sum()).backward()
        model.zero_grad(set_to_none=True)

    def probe(batch: Batch, lean: bool) -> None:
        with torch.no_grad():
            task_token_loss(model, batch, T, lean=lean)

    times: dict[str, list[float]] = {k: [] for k in ("train_lean", "train_full", "probe_lean", "probe_full")}
    for rep in range(reps):
        for tb, vb in zip(train_batches, val_batches, strict=True):
            for lean in (True, False) if rep % 2 == 0 else (False, True):
                kind = "lean" if lean else "full"
                times[f"train_{kind}"].append(timed(lambda tb=tb, lean=lean: train(tb, lean)))
                times[f"probe_{kind}"].append(timed(lambda vb=vb, lean=lean: probe(vb, lean)))

    def ratio(a: str, b: str) -> float:
        return median([x / y for x, y in zip(times[a], times[b], strict=True)])

    return {
        "reps": reps,
        "batches": batches,
        "train_lean/full": ratio("train_lean", "train_full"),
        "probe_lean/full": ratio("probe_lean", "probe_full"),
        "probe/train_lean": ratio("probe_lean", "train_lean"),
        "probe/train_full": ratio("probe_full", "train_full"),
    }


def _summarize(steps: list[list[float]], uniform: list[list[float]]) -> dict[str, float]:
    """Every balancer trains on the same batches as the uniform run of the same repetition, so the
    ratio of their total times over the timed steps compares equal work (batch lengths, which vary
    5x, cancel) and counts periodic costs (CoBa's probe) at their true share; then the median over
    repetitions."""
    per_rep = [sum(a) / sum(b) for a, b in zip(steps, uniform, strict=True)]
    return {"median_step_s": median([s for run in steps for s in run]), "ratio": median(per_rep)}


def check_whole_intervals(steps: int, warmup: int) -> None:
    """The timed steps must hold CoBa's probe at its true share (see the module docstring)."""
    interval = CobaBalancerConfig().update_interval
    if (steps - warmup) % interval:
        raise ValueError(
            f"{steps} steps - {warmup} untimed must be a multiple of CoBa's update_interval {interval}"
        )


def peak_rss(num_tasks: int, steps: int, warmup: int) -> dict[str, dict[str, float | None]]:
    """Peak RSS (MB) of a fresh process training `steps` steps with each balancer, and the peak
    during training alone (the data and model are already loaded when it is reset)."""
    out = {}
    for name in BALANCERS:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.overhead", "--rss", name, str(num_tasks), str(steps), str(warmup)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _vm_hwm_mb() -> float | None:
    """The process's peak resident set since the last reset (Linux: VmHWM in /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_child(name: str, num_tasks: int, steps: int, warmup: int) -> None:
    """Train in this fresh process; report its peak RSS and the peak during training alone."""
    quiet()
    setup = Setup.load()
    data = split_tasks(setup.data, num_tasks)
    try:  # reset the high-water mark, so the training phase's own peak can be read after it
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = psutil.Process().memory_info().rss / 2**20
    run_mtft(
        setup, steps, min(warmup, steps - 1), data=data, balancer_overrides=balancer_overrides(name, warmup)
    )
    train_peak = _vm_hwm_mb() if reset else None
    print(
        json.dumps(
            {
                "peak_rss_mb": peak_rss_mb(),
                "train_peak_rss_mb": train_peak,
                "rss_before_mb": before,
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--rss":
        _rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit("usage: python -m bench.overhead --rss BALANCER TASKS STEPS WARMUP (used by bench.run)")
