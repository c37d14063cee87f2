"""`make bench`: run the benchmarks and rewrite the tables of BENCHMARKS.md.

    python -m bench.run --mode quick   # ~15 minutes on 2 CPU cores: fewer repetitions and steps
    python -m bench.run --mode full    # ~2.5 hours: the numbers committed in BENCHMARKS.md
    python -m bench.run --mode full --only quality,scenarios   # some parts; the others are kept

Results also go to bench/results/<mode>/results.json (with the sweep's run dirs next to it). Only the
blocks between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers in BENCHMARKS.md are
rewritten; the prose around them is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import data, generation, overhead, quality, throughput
from bench.common import ROOT, Setup, machine, quiet
from mtft.report.aggregate import build_report


@dataclass(frozen=True)
class Mode:
    """How much of everything to run."""

    tp_reps: int
    tp_steps: int
    tp_warmup: int
    oh_tasks: tuple[int, ...]
    oh_reps: int
    oh_steps: int
    oh_warmup: int
    rss_tasks: tuple[int, ...]
    accum: int  # 0: skip the gradient-accumulation CoBa measurement
    q_seeds: tuple[int, ...]
    q_steps: int
    q_eval_interval: int
    q_grouped: bool  # also sweep uniform with data.group_by_length=true
    jobs: int = 2
    data_n: int = 0  # generated conversations for the data pipeline measurement (0: skip)
    gen: tuple[int, int, int] = (0, 0, 0)  # generation throughput: prompts, new tokens, repetitions (0: skip)
    scenarios: bool = False  # the embedded scenarios' sweeps (each at its own budget, quality.SCENARIOS)
    s_eval_interval: int = 25


# Packed rows per step in the quality comparison: 8 rows of 256 tokens hold about the tokens of the
# 16 unpacked sequences of a plain step (mean length ~125), so both train on the same budget.
PACKED_ROWS = 8

MODES = {
    "quick": Mode(
        3, 14, 3, (2, 4, 8, 16, 32), 1, 10, 2, (4,), 0, (1,), 30, 10, False, data_n=50_000, gen=(32, 32, 2)
    ),
    "full": Mode(
        5,
        20,
        4,
        (2, 4, 8, 16, 32),
        2,
        10,
        2,
        (4, 32),
        4,
        (1, 2, 3),
        100,
        20,
        True,
        data_n=200_000,
        gen=(64, 64, 3),
        scenarios=True,
    ),
    # for tests/test_bench.py: a couple of steps of everything, the sweep left out
    "smoke": Mode(1, 3, 1, (2,), 1, 9, 1, (), 0, (), 0, 0, False),
}


PARTS = ("throughput", "data", "generation", "overhead", "quality", "scenarios")


def enabled(mode: Mode) -> tuple[str, ...]:
    """The parts `mode` runs (a size of 0 leaves a part out)."""
    off = {"data": not mode.data_n, "generation": not mode.gen[0], "quality": not mode.q_seeds}
    off["scenarios"] = not mode.scenarios
    return tuple(p for p in PARTS if not off.get(p, False))


def run_all(
    mode_name: str,
    out_dir: Path,
    parts: Sequence[str] | None = None,
    results: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    setup: Setup | None = None,
    save: Callable[[dict[str, Any]], None] = lambda results: None,
) -> dict[str, Any]:
    """Run `parts` (default: every part the mode enables) into `results` (default: a fresh record);
    each part keeps its own start time, duration and load average, since parts may come from
    separate invocations (`--only`). Every comparison is paired inside one part. `save` gets the
    results after each part, so an interrupted run keeps the parts it finished."""
    mode = MODES[mode_name]
    quiet()
    results = results if results is not None else {}
    results.update(mode=mode_name, settings=asdict(mode), machine=machine())
    setup = setup or Setup.load()
    results["model_parameters"] = sum(p.numel() for p in setup.model().parameters())
    results["train_examples"] = len(setup.lengths)
    results["batch_size"] = setup.cfg.trainer.batch_size
    results["max_length"] = setup.cfg.data.max_length
    run = {
        "throughput": lambda: _throughput(setup, mode, log),
        "data": lambda: data.run(mode.data_n, setup.model_path, (1, 2), log),
        "generation": lambda: generation.run(setup, *mode.gen[:2], 16, mode.gen[2], log),
        "overhead": lambda: _overhead(setup, mode, log),
        "quality": lambda: _quality(mode, out_dir, log),
        "scenarios": lambda: run_scenarios(mode, out_dir, log),
    }
    for part in parts or enabled(mode):
        started, load, t0 = _now(), machine()["load_avg"], time.perf_counter()
        results[part] = run[part]()
        results[part].update(
            started=started, wall_s=time.perf_counter() - t0, load_avg=[load, machine()["load_avg"]]
        )
        save(results)
    return results


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _throughput(setup: Setup, mode: Mode, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"throughput: {mode.tp_reps} reps x {len(throughput.SIDES)} sides x {mode.tp_steps} steps")
    return throughput.run(setup, mode.tp_reps, mode.tp_steps, mode.tp_warmup, log)


def _overhead(setup: Setup, mode: Mode, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"balancer overhead: T in {mode.oh_tasks}, {mode.oh_reps} reps x {mode.oh_steps} steps")
    out = overhead.run(setup, mode.oh_tasks, mode.oh_reps, mode.oh_steps, mode.oh_warmup, log)
    if mode.accum:
        out["accum"] = overhead.run_accum(setup, mode.accum, mode.oh_reps, mode.oh_steps, mode.oh_warmup, log)
    log("lean LM head vs full, paired batch by batch")
    out["lean"] = overhead.run_lean(setup, mode.oh_reps + 1, max(4, mode.oh_steps // 2))
    out["rss"] = {}
    for T in mode.rss_tasks:
        log(f"peak RSS at T={T}")
        out["rss"][str(T)] = overhead.peak_rss(T, 6, 2)
    return out


def _quality(mode: Mode, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The balancer sweep (with end-of-run eval), then uniform with length grouping and with packing."""

    def sweep(name: str, extra: Sequence[str], balancers: str | None = None) -> Path:
        path = out_dir / name
        shutil.rmtree(path, ignore_errors=True)
        kw = {"balancers": balancers} if balancers else {}
        return quality.sweep(path, mode.q_seeds, mode.q_steps, mode.q_eval_interval, mode.jobs, extra, **kw)

    log(f"quality: 4 balancers x seeds {mode.q_seeds}, {mode.q_steps} steps each, eval at the end")
    sweep_dir = sweep("sweep", quality.EVAL_AT_END)
    runs = quality.summaries(sweep_dir)
    out: dict[str, Any] = {
        "report_md": quality.report(sweep_dir),
        "sweep_dir": str(sweep_dir.relative_to(ROOT)) if sweep_dir.is_relative_to(ROOT) else str(sweep_dir),
        "steps": mode.q_steps,
        "seeds": list(mode.q_seeds),
        "eval_samples": quality.EVAL_SAMPLES,
        "train_tokens": sorted({r["train_tokens"] for r in runs}),
        "runs": [_run_row(r) for r in runs],
    }
    if mode.q_grouped:
        log("quality: uniform with data.group_by_length=true")
        grouped = sweep("sweep_grouped", ["data.group_by_length=true"], "uniform")
        out["grouped_runs"] = [_run_row(r) for r in quality.summaries(grouped)]
        log(f"quality: uniform with data.packing=true, {PACKED_ROWS} rows a step")
        packed = sweep("sweep_packed", ["data.packing=true", f"trainer.batch_size={PACKED_ROWS}"], "uniform")
        out["packed_runs"] = [_run_row(r) for r in quality.summaries(packed)]
    return out


def run_scenarios(mode: Mode, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Every balancer on every embedded scenario, each scenario compared by one `mtft report`."""
    out: dict[str, Any] = {"seeds": list(mode.q_seeds), "by_data": {}}
    for sc in quality.SCENARIOS:
        t0 = time.perf_counter()
        log(f"scenario {sc.data}: 4 balancers x seeds {mode.q_seeds}, {sc.steps} steps each")
        sc_dir = out_dir / sc.data
        shutil.rmtree(sc_dir, ignore_errors=True)
        report_md = quality.scenario(sc_dir, sc, mode.q_seeds, mode.s_eval_interval, mode.jobs)
        out["by_data"][sc.data] = {
            "report_md": report_md,
            "steps": sc.steps,
            "overrides": list(sc.overrides),
            "dir": str(sc_dir.relative_to(ROOT)) if sc_dir.is_relative_to(ROOT) else str(sc_dir),
            "wall_s": time.perf_counter() - t0,
            "stats": claim_stats(sc_dir / "main", sc.focus),
        }
    return out


def claim_stats(main_sweep: Path, focus: str) -> dict[str, dict[str, Any]]:
    """What the targets table judges a scenario's claim by: the four balancers at their defaults (the
    main sweep, so each keeps its plain name; the variants are in the report), per balancer."""
    return {
        res.name: {
            "rise": res.rise[focus].mean,
            "mean_final": res.mean_final.mean,
            "weight_sd": _finite(res.weight_sd[focus].mean),  # None: fixed weights
            "n": res.mean_final.n,
        }
        for res in build_report([main_sweep]).results
    }


def _finite(x: float) -> float | None:
    """`x`, or None where it is NaN/inf (results.json stays strict JSON)."""
    return x if math.isfinite(x) else None


def _run_row(s: dict[str, Any]) -> dict[str, Any]:
    final = s["final_val_loss"]
    return {
        "balancer": s["balancer"],
        "seed": s["seed"],
        "mean_final": statistics.fmean(final.values()),
        "mean_best": statistics.fmean(s["best_val_loss"].values()),
        "tokens_per_s": s["train_tokens_per_s"],
        "wall_s": s["wall_s"],
        "peak_rss_mb": s["peak_rss_mb"],
        "train_tokens": s["train_tokens"],
    }


# --- rendering ------------------------------------------------------------------------------------


def _x(v: float) -> str:
    return f"{v:.2f}x"


def render(results: dict[str, Any]) -> dict[str, str]:
    """Markdown for each marked block of BENCHMARKS.md."""
    blocks = {}
    m = results["machine"]
    mode = results["mode"]
    done = sorted((p for p in PARTS if p in results), key=lambda p: results[p]["started"])
    blocks["run"] = "\n".join(
        [
            f"Mode **{mode}** (`make bench{'' if mode == 'quick' else ' BENCH_MODE=' + mode}`). Each part is "
            "one process run; every comparison is paired inside its part (`--only PART` reruns one part):",
            "",
            "| part | started | minutes | load average at start / end |",
            "|---|---|---:|---|",
            *(
                f"| {p} | {results[p]['started']} | {results[p]['wall_s'] / 60:.1f} | "
                f"{results[p]['load_avg'][0]} / {results[p]['load_avg'][1]} |"
                for p in done
            ),
            "",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['platform']}",
            f"- software: Python {m['python']}, torch {m['torch']} (torch threads: {m['torch_threads']}; "
            f"OMP_NUM_THREADS={m['omp_num_threads'] or 'unset'}), transformers {m['transformers']}",
            f"- model: the embedded tiny Llama ({results['model_parameters'] / 1e6:.2f}M parameters), data: "
            f"codetasks ({results['train_examples']:,} training examples), micro-batch "
            f"{results['batch_size']} sequences, fp32 on CPU",
        ]
    )
    if "throughput" in results:
        blocks["throughput"] = render_throughput(results["throughput"], results["batch_size"])
    if "overhead" in results:
        blocks["overhead"] = render_overhead(results["overhead"])

    q = results.get("quality")
    if q:
        table = q["report_md"]
        body = table.split("## Validation loss per task")[0].replace("# mtft report", "").strip()
        tokens = q["train_tokens"]
        rows = [
            f"Budget: **{q['steps']} steps x {results['batch_size']} sequences = "
            f"{q['steps'] * results['batch_size']:,} sequences per run**, "
            f"{tokens[0]:,}{'–' + format(tokens[-1], ',') if len(tokens) > 1 else ''} non-padding tokens "
            "(the same batches for every balancer of a seed), seeds "
            f"{', '.join(map(str, q['seeds']))}; two jobs at a time, one thread each (`OMP_NUM_THREADS=1`); "
            f"each run ends with `mtft eval` of its final model (`trainer.eval_at_end=true`) on the first "
            f"{q.get('eval_samples', 'all')} validation examples per task (the metric columns); "
            f"{q['wall_s'] / 60:.1f} minutes. `mtft report {q['sweep_dir']}` printed:",
            "",
            body,
        ]
        if q.get("grouped_runs"):
            plain = [r for r in q["runs"] if r["balancer"] == "uniform"]
            grouped = q["grouped_runs"]

            def agg(rs: list[dict[str, Any]], key: str) -> str:
                vals = [r[key] for r in rs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{statistics.fmean(vals):.3f} ± {sd:.3f}"

            rows += [
                "",
                "Length-grouped batching at the same budget (uniform balancer, same seeds):",
                "",
                "| batching | mean final val loss | mean best val loss | useful tokens/s (1 thread) | wall per run |",
                "|---|---:|---:|---:|---:|",
                f"| plain | {agg(plain, 'mean_final')} | {agg(plain, 'mean_best')} | "
                f"{statistics.fmean(r['tokens_per_s'] for r in plain):,.0f} | {statistics.fmean(r['wall_s'] for r in plain):.0f} s |",
                f"| `data.group_by_length=true` | {agg(grouped, 'mean_final')} | {agg(grouped, 'mean_best')} | "
                f"{statistics.fmean(r['tokens_per_s'] for r in grouped):,.0f} | {statistics.fmean(r['wall_s'] for r in grouped):.0f} s |",
            ]
        if q.get("packed_runs"):
            packed = q["packed_runs"]
            rows.append(
                f"| `data.packing=true`, {PACKED_ROWS} rows of {results['max_length']} tokens | "
                f"{agg(packed, 'mean_final')} | {agg(packed, 'mean_best')} | "
                f"{statistics.fmean(r['tokens_per_s'] for r in packed):,.0f} | {statistics.fmean(r['wall_s'] for r in packed):.0f} s |"
            )
        blocks["quality"] = "\n".join(rows)
    if "data" in results:
        blocks["data"] = data.render(results["data"])
    if "generation" in results:
        blocks["generation"] = generation.render(results["generation"])
    if "scenarios" in results:
        blocks["scenarios"] = render_scenarios(results)
    blocks["targets"] = render_targets(results)
    # A part the mode leaves out says so; one it runs but these results lack (an interrupted or
    # `--only` run) keeps its block from the run that made it.
    for part in set(PARTS) - set(enabled(MODES[mode])):
        blocks.setdefault(part, "(not run in this mode)")
    return blocks


def render_overhead(oh: dict[str, Any]) -> str:
    names = overhead.BALANCERS
    rows = [
        "| tasks T | "
        + " | ".join(f"{n} step" for n in names)
        + " | "
        + " | ".join(f"{n} / uniform" for n in names[1:])
        + " |",
        "|---:|" + "---:|" * (2 * len(names) - 1),
    ]
    for T, by in oh["by_tasks"].items():
        rows.append(
            f"| {T} | "
            + " | ".join(f"{by[n]['median_step_s'] * 1000:.0f} ms" for n in names)
            + " | "
            + " | ".join(_x(by[n]["ratio"]) for n in names[1:])
            + " |"
        )
    rows += [
        "",
        f"{oh['reps']} repetition(s), balancers alternating, {oh['steps']} steps each ({oh['warmup']} untimed). "
        "A balancer's run trains on the same batches as the uniform run of the same repetition; a ratio is "
        "their total time over the timed steps (a whole number of CoBa's probe intervals, so its probe counts "
        "at its true share), then the median over repetitions. Step times are medians over all timed steps.",
    ]
    if "accum" in oh:
        a = oh["accum"]
        rows += [
            "",
            f"With `trainer.grad_accum={a['grad_accum']}` (T=4): uniform {a['uniform']['median_step_s'] * 1000:.0f} ms, "
            f"coba {a['coba']['median_step_s'] * 1000:.0f} ms per step: coba / uniform = **{_x(a['coba']['ratio'])}**.",
        ]
    if "lean" in oh:
        ln = oh["lean"]
        rows += [
            "",
            f"Lean LM head (logits only at scored positions) against the full head, paired batch by batch "
            f"({ln['reps']} x {ln['batches']} micro-batches): training forward+backward "
            f"**{_x(ln['train_lean/full'])}**, CoBa's probe (no-grad forward of a validation micro-batch) "
            f"**{_x(ln['probe_lean/full'])}**. The probe costs {_x(ln['probe/train_lean'])} of a training "
            f"forward+backward with the lean head ({_x(ln['probe/train_full'])} with the full one).",
        ]
    if oh.get("rss"):
        rows += [
            "",
            "Peak memory (RSS, MB) of a fresh process per balancer (6 steps): the whole process, and the peak "
            "during training alone (high-water mark reset after loading data and model):",
            "",
            "| tasks T | " + " | ".join(names) + " |",
            "|---:|" + "---|" * len(names),
        ]
        for T, by in oh["rss"].items():
            cells = []
            for n in names:
                r = by[n]
                train = r.get("train_peak_rss_mb")
                cells.append(
                    f"{r['peak_rss_mb']:,.0f} / {train:,.0f}" if train else f"{r['peak_rss_mb']:,.0f}"
                )
            rows.append(f"| {T} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def render_throughput(tp: dict[str, Any], batch_size: int) -> str:
    """The throughput block: every loop, plain and packed, and the padding table."""
    sides = tp["sides"]
    rows = [
        "| loop | useful tokens/s (median) | median step | vs bare loop | vs HF Trainer |",
        "|---|---:|---:|---:|---:|",
    ]
    ratio = tp["ratios"]
    vs_bare = {
        "bare": 1.0,
        "hf": ratio["hf/bare"],
        "mtft": ratio["mtft/bare"],
        "mtft_grouped": ratio["mtft_grouped/bare"],
    }
    vs_hf = {"hf": 1.0, "mtft": ratio["mtft/hf"]}
    runs = {side: sides[side]["tokens_per_s_all"] for side in throughput.SIDES}
    plain_sides = [side for side in throughput.SIDES if side not in throughput.PACKED]

    def spread(a: str, b: str) -> str:
        per_rep = [x / y for x, y in zip(runs[a], runs[b], strict=True)]
        return f" ({min(per_rep):.2f}–{max(per_rep):.2f})" if len(per_rep) > 1 else ""

    ranges = {
        "hf": spread("hf", "bare"),
        "mtft": spread("mtft", "bare"),
        "mtft_grouped": spread("mtft_grouped", "bare"),
    }
    ranges_hf = {"mtft": spread("mtft", "hf")}
    for side in plain_sides:
        s = sides[side]
        rows.append(
            f"| {throughput.LABELS[side]} | {s['tokens_per_s']:,.0f} | {s['median_step_s'] * 1000:.0f} ms | "
            f"{_x(vs_bare[side])}{ranges.get(side, '')} | "
            f"{_x(vs_hf[side]) + ranges_hf.get(side, '') if side in vs_hf else '—'} |"
        )
    rows += [
        "",
        "With packing on every side (`data.packing=true`: the same packed rows, position ids restarting "
        "per example, no attention mask; the HF Trainer fed them as TRL's `padding_free` does):",
        "",
        "| loop | useful tokens/s (median) | median step | vs bare loop, packed | vs HF Trainer, packed |",
        "|---|---:|---:|---:|---:|",
    ]
    packed_vs = {
        "bare_packed": ("1.00x", "—"),
        "hf_packed": (_x(ratio["hf_packed/bare_packed"]) + spread("hf_packed", "bare_packed"), "1.00x"),
        "mtft_packed": (
            _x(ratio["mtft_packed/bare_packed"]) + spread("mtft_packed", "bare_packed"),
            _x(ratio["mtft_packed/hf_packed"]) + spread("mtft_packed", "hf_packed"),
        ),
    }
    for side in throughput.PACKED:
        s = sides[side]
        rows.append(
            f"| {throughput.LABELS[side]} | {s['tokens_per_s']:,.0f} | {s['median_step_s'] * 1000:.0f} ms | "
            f"{packed_vs[side][0]} | {packed_vs[side][1]} |"
        )
    pad = tp["padding"]
    rows += [
        "",
        f"{tp['reps']} repetitions per loop, alternating (rotating order), {tp['steps']} steps each, the first "
        f"{tp['warmup']} not timed; tokens/s is the median over repetitions, each ratio the median of the "
        "per-repetition ratios (in brackets: the lowest and highest of them). Useful tokens = non-padding tokens; the plain loops "
        "train on the very same batches, and the packed loops on the very same packed rows (checked token by token).",
        "",
        "Padding waste (share of the padded batch that is padding) over one epoch of batches "
        f"({pad['batches']:,} batches of {batch_size}):",
        "",
        "| batching | real tokens | padded tokens | padding waste |",
        "|---|---:|---:|---:|",
        f"| plain (default) | {pad['plain']['real_tokens']:,} | {pad['plain']['padded_tokens']:,} | {pad['plain']['waste']:.1%} |",
        f"| `data.group_by_length=true` | {pad['grouped']['real_tokens']:,} | {pad['grouped']['padded_tokens']:,} | {pad['grouped']['waste']:.1%} |",
        f"| `data.packing=true` ({pad['packed']['rows']:,} rows of `data.max_length`) | {pad['packed']['real_tokens']:,} | {pad['packed']['padded_tokens']:,} | {pad['packed']['waste']:.1%} |",
        "",
        f"`data.group_by_length=true` makes mtft **{_x(ratio['mtft_grouped/mtft'])}** faster in useful tokens/s, "
        f"`data.packing=true` **{_x(ratio['mtft_packed/mtft'])}**{spread('mtft_packed', 'mtft')} "
        f"({_x(ratio['mtft_packed/mtft_grouped'])} of length grouping).",
    ]
    return "\n".join(rows)


def render_scenarios(results: dict[str, Any]) -> str:
    """Each scenario's `mtft report` as printed (tables, winners line), under its claim."""
    scenarios = results["scenarios"]
    by_data = {sc.data: sc for sc in quality.SCENARIOS}
    parts = []
    for name, r in scenarios["by_data"].items():
        sc = by_data[name]
        body = r["report_md"].split("## Validation loss per task")[0].replace("# mtft report", "").strip()
        settings = "".join(f" with `{o}`" for o in r["overrides"])
        parts += [
            f"### `data={name}`",
            "",
            f"Claim under test: {sc.claim} (task of interest: `{sc.focus}`). Budget: "
            f"{r['steps']} steps x {quality.SCENARIO_BATCH} sequences per run{settings}, seeds "
            f"{', '.join(map(str, r.get('seeds', scenarios['seeds'])))}; {r['wall_s'] / 60:.1f} minutes. "
            f"`mtft report {r['dir']}/*` printed:",
            "",
            body.replace("## Task weights", "#### Task weights"),
            "",
        ]
    return "\n".join(parts).rstrip()


def render_targets(results: dict[str, Any]) -> str:
    def status(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = ["| target | measured | status |", "|---|---:|---|"]
    if "throughput" in results:
        r = results["throughput"]["ratios"]
        rows += [
            f"| mtft ≥ 0.9x bare PyTorch loop (tokens/s) | {_x(r['mtft/bare'])} | {status(r['mtft/bare'] >= 0.9)} |",
            f"| mtft ≥ 1.0x Hugging Face Trainer | {_x(r['mtft/hf'])} | {status(r['mtft/hf'] >= 1.0)} |",
            f"| `data.packing=true` ≥ 1.8x plain batches (useful tokens/s, codetasks) | {_x(r['mtft_packed/mtft'])} | "
            f"{status(r['mtft_packed/mtft'] >= 1.8)} |",
            f"| with packing on both sides: mtft ≥ 0.9x bare loop, ≥ 1.0x HF Trainer | {_x(r['mtft_packed/bare_packed'])}, "
            f"{_x(r['mtft_packed/hf_packed'])} | {status(r['mtft_packed/bare_packed'] >= 0.9 and r['mtft_packed/hf_packed'] >= 1.0)} |",
        ]
    if "overhead" in results:
        oh = results["overhead"]["by_tasks"]
        T4 = oh.get("4") or next(iter(oh.values()))
        Tmax = max(oh, key=int)
        gn = ", ".join(f"T={T}: {_x(oh[T]['gradnorm']['ratio'])}" for T in oh)
        rows += [
            f"| CoBa ≤ 1.05x uniform step time (defaults, T=4, grad_accum=1) | {_x(T4['coba']['ratio'])} | {status(T4['coba']['ratio'] <= 1.05)} |",
            f"| FAMO ≤ 1.05x uniform step time (defaults, T=4) | {_x(T4['famo']['ratio'])} | {status(T4['famo']['ratio'] <= 1.05)} |",
            f"| GradNorm ≤ 1.6x uniform step time at T={Tmax} (growth with T shown) | {gn} | "
            f"{status(oh[Tmax]['gradnorm']['ratio'] <= 1.6)} |",
        ]
    q = results.get("quality") or {}
    if q.get("packed_runs"):
        plain = [run["mean_final"] for run in q["runs"] if run["balancer"] == "uniform"]
        packed = [run["mean_final"] for run in q["packed_runs"]]
        gap, noise = packed_vs_plain(plain, packed)
        rows.append(
            f"| `data.packing=true` validation loss at a fixed budget = plain's within noise (uniform, "
            f"{len(packed)} seeds; noise = 2 standard errors of the difference) | {gap:+.3f} (noise {noise:.3f}) | "
            f"{status(abs(gap) <= noise)} |"
        )
    if "data" in results:
        d = results["data"]
        ratio = (d["mtft_1"]["peak_mb"] - d["mtft_1"]["base_mb"]) / (
            d["python"]["peak_mb"] - d["python"]["base_mb"]
        )
        rows.append(
            f"| tokenizing {d['conversations']:,} conversations: peak anonymous memory growth ≤ 0.5x the data held as Python "
            f"objects | {_x(ratio)} | {status(ratio <= 0.5)} |"
        )
    if "generation" in results:
        g = results["generation"]["ratio"]
        rows.append(
            f"| generation throughput: batched vs one prompt at a time (tokens/s) | {_x(g)} | shown |"
        )
    skewed = results.get("scenarios", {}).get("by_data", {}).get("codetasks_skewed", {}).get("stats", {})
    if "coba" in skewed and "uniform" in skewed:
        c, u = skewed["coba"], skewed["uniform"]
        ok = c["rise"] <= u["rise"] / 2 and c["mean_final"] <= u["mean_final"]
        rows.append(
            f"| `data=codetasks_skewed`: CoBa (defaults) cuts `function_naming`'s rise from its best to ≤ half "
            f"of uniform's, mean final val loss no worse ({c['n']} seeds) | rise {c['rise']:+.1%} vs "
            f"{u['rise']:+.1%}; mean {c['mean_final']:.3f} vs {u['mean_final']:.3f} | {status(ok)} |"
        )
    return "\n".join(rows)


def packed_vs_plain(plain: list[float], packed: list[float]) -> tuple[float, float]:
    """(mean packed - mean plain, two standard errors of that difference) of final validation losses."""
    var = sum(statistics.variance(v) / len(v) for v in (plain, packed) if len(v) > 1)
    return statistics.fmean(packed) - statistics.fmean(plain), 2 * var**0.5


def rewrite(path: Path, blocks: dict[str, str]) -> None:
    """Replace each `<!-- bench:NAME -->...<!-- /bench:NAME -->` block; create the file if missing."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->).*?(<!-- /bench:{name} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda mt, b=body: f"{mt.group(1)}\n{b}\n{mt.group(2)}", text)
        else:
            text += f"\n## {name}\n\n<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="results dir (default bench/results/<mode>)")
    parser.add_argument(
        "--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help="file whose tables to rewrite"
    )
    parser.add_argument("--render-only", action="store_true", help="re-render from an existing results.json")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated parts to run ({', '.join(PARTS)}); their results replace those parts in "
        "an existing results.json, the other parts are kept, and every block is re-rendered",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every process (default 1: on a small shared machine, oversubscribed "
        "OpenMP threads make timings erratic; every side of every comparison uses the same setting)",
    )
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the subprocesses (peak RSS, sweeps) inherit it
    torch.set_num_threads(args.threads)
    out_dir = (args.out or ROOT / "bench" / "results" / args.mode).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    if args.render_only:
        results = json.loads(results_path.read_text())
    else:
        parts = args.only.split(",") if args.only else None
        unknown = sorted(set(parts or ()) - set(PARTS))
        if unknown:
            parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        kept = json.loads(results_path.read_text()) if parts and results_path.exists() else None
        results = run_all(
            args.mode,
            out_dir,
            parts,
            kept,
            log=lambda s: print(s, flush=True),
            save=lambda r: results_path.write_text(json.dumps(r, indent=1)),
        )
    rewrite(args.markdown, render(results))
    print(f"results: {results_path}\ntables rewritten in {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
