"""`make bench`: run the benchmarks and rewrite the tables of BENCHMARKS.md.

    python -m bench.run --mode quick   # ~10 minutes on 2 CPU cores: fewer repetitions and steps
    python -m bench.run --mode full    # ~45 minutes: the numbers committed in BENCHMARKS.md

Results also go to bench/results/<mode>/results.json (with the sweep's run dirs next to it). Only the
blocks between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers in BENCHMARKS.md are
rewritten; the prose around them is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import data, generation, overhead, quality, throughput
from bench.common import ROOT, Setup, machine, quiet


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
    s_steps: int = 0  # steps per run of the embedded scenarios' sweeps (0: skip)
    s_eval_interval: int = 25


# Packed rows per step in the quality comparison: 8 rows of 256 tokens hold about the tokens of the
# 16 unpacked sequences of a plain step (mean length ~125), so both train on the same budget.
PACKED_ROWS = 8

MODES = {
    "quick": Mode(
        3, 14, 3, (2, 4, 8, 16, 32), 1, 10, 3, (4,), 0, (1,), 30, 10, False, data_n=50_000, gen=(32, 32, 2)
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
        s_steps=150,
    ),
    # for tests/test_bench.py: a couple of steps of everything, the sweep left out
    "smoke": Mode(1, 3, 1, (2,), 1, 3, 1, (), 0, (), 0, 0, False),
}


def run_all(mode_name: str, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    mode = MODES[mode_name]
    quiet()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "mode": mode_name,
        "settings": asdict(mode),
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    setup = Setup.load()
    results["model_parameters"] = sum(p.numel() for p in setup.model().parameters())
    results["train_examples"] = len(setup.lengths)
    results["batch_size"] = setup.cfg.trainer.batch_size
    results["max_length"] = setup.cfg.data.max_length
    log(f"throughput: {mode.tp_reps} reps x {len(throughput.SIDES)} sides x {mode.tp_steps} steps")
    t0 = time.perf_counter()
    results["throughput"] = throughput.run(setup, mode.tp_reps, mode.tp_steps, mode.tp_warmup, log)
    results["throughput"]["wall_s"] = time.perf_counter() - t0
    if mode.data_n:
        results["data"] = data.run(mode.data_n, setup.model_path, (1, 2), log)
    if mode.gen[0]:
        results["generation"] = generation.run(setup, *mode.gen[:2], 16, mode.gen[2], log)
    log(f"balancer overhead: T in {mode.oh_tasks}, {mode.oh_reps} reps x {mode.oh_steps} steps")
    t0 = time.perf_counter()
    results["overhead"] = overhead.run(setup, mode.oh_tasks, mode.oh_reps, mode.oh_steps, mode.oh_warmup, log)
    if mode.accum:
        results["overhead"]["accum"] = overhead.run_accum(
            setup, mode.accum, mode.oh_reps, max(4, mode.oh_steps // 2), mode.oh_warmup, log
        )
    log("lean LM head vs full, paired batch by batch")
    results["overhead"]["lean"] = overhead.run_lean(setup, mode.oh_reps + 1, max(4, mode.oh_steps // 2))
    results["overhead"]["rss"] = {}
    for T in mode.rss_tasks:
        log(f"peak RSS at T={T}")
        results["overhead"]["rss"][str(T)] = overhead.peak_rss(T, 6, 2)
    results["overhead"]["wall_s"] = time.perf_counter() - t0
    if mode.q_seeds:
        t0 = time.perf_counter()
        sweep_dir = out_dir / "sweep"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        log(f"quality: 4 balancers x seeds {mode.q_seeds}, {mode.q_steps} steps each")
        quality.sweep(sweep_dir, mode.q_seeds, mode.q_steps, mode.q_eval_interval, mode.jobs)
        table = quality.report(sweep_dir)
        runs = quality.summaries(sweep_dir)
        results["quality"] = {
            "report_md": table,
            "sweep_dir": str(sweep_dir.relative_to(ROOT))
            if sweep_dir.is_relative_to(ROOT)
            else str(sweep_dir),
            "steps": mode.q_steps,
            "seeds": list(mode.q_seeds),
            "train_tokens": sorted({r["train_tokens"] for r in runs}),
            "runs": [_run_row(r) for r in runs],
        }
        if mode.q_grouped:
            grouped_dir = out_dir / "sweep_grouped"
            shutil.rmtree(grouped_dir, ignore_errors=True)
            log("quality: uniform with data.group_by_length=true")
            quality.sweep(
                grouped_dir,
                mode.q_seeds,
                mode.q_steps,
                mode.q_eval_interval,
                mode.jobs,
                extra=["data.group_by_length=true"],
                balancers="uniform",
            )
            results["quality"]["grouped_runs"] = [_run_row(r) for r in quality.summaries(grouped_dir)]
            packed_dir = out_dir / "sweep_packed"
            shutil.rmtree(packed_dir, ignore_errors=True)
            log(f"quality: uniform with data.packing=true, {PACKED_ROWS} rows a step")
            quality.sweep(
                packed_dir,
                mode.q_seeds,
                mode.q_steps,
                mode.q_eval_interval,
                mode.jobs,
                extra=["data.packing=true", f"trainer.batch_size={PACKED_ROWS}"],
                balancers="uniform",
            )
            results["quality"]["packed_runs"] = [_run_row(r) for r in quality.summaries(packed_dir)]
        results["quality"]["wall_s"] = time.perf_counter() - t0
    if mode.s_steps:
        results["scenarios"] = run_scenarios(mode, out_dir, log)
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["load_avg_end"] = machine()["load_avg"]
    return results


def run_scenarios(mode: Mode, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Every balancer on every embedded scenario, each scenario compared by one `mtft report`."""
    out: dict[str, Any] = {"steps": mode.s_steps, "seeds": list(mode.q_seeds), "by_data": {}}
    for sc in quality.SCENARIOS:
        t0 = time.perf_counter()
        log(f"scenario {sc.data}: 4 balancers x seeds {mode.q_seeds}, {mode.s_steps} steps each")
        sc_dir = out_dir / sc.data
        shutil.rmtree(sc_dir, ignore_errors=True)
        report_md = quality.scenario(sc_dir, sc, mode.q_seeds, mode.s_steps, mode.s_eval_interval, mode.jobs)
        out["by_data"][sc.data] = {
            "report_md": report_md,
            "dir": str(sc_dir.relative_to(ROOT)) if sc_dir.is_relative_to(ROOT) else str(sc_dir),
            "wall_s": time.perf_counter() - t0,
        }
    return out


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
    blocks["run"] = "\n".join(
        [
            f"Mode **{mode}** (`make bench{'' if mode == 'quick' else ' BENCH_MODE=' + mode}`), started "
            f"{results['started']}, {results['wall_s'] / 60:.1f} minutes in all.",
            "",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['platform']}",
            f"- software: Python {m['python']}, torch {m['torch']} (torch threads: {m['torch_threads']}; "
            f"OMP_NUM_THREADS={m['omp_num_threads'] or 'unset'}), transformers {m['transformers']}",
            f"- load average at start / end: {m['load_avg']} / {m.get('load_avg_end')} (the machine is "
            "shared with other work; every comparison is paired inside one process run)",
            f"- model: the embedded tiny Llama ({results['model_parameters'] / 1e6:.2f}M parameters), data: "
            f"codetasks ({results['train_examples']:,} training examples), micro-batch "
            f"{results['batch_size']} sequences, fp32 on CPU",
        ]
    )
    blocks["throughput"] = render_throughput(results["throughput"], results["batch_size"])

    oh = results["overhead"]
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
        "Step k of a balancer's run is paired with step k of the uniform run of the same repetition (same "
        "batch); a ratio is the median over those pairs, then over repetitions. Step times are medians over "
        "all timed steps.",
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
    blocks["overhead"] = "\n".join(rows)

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
    else:
        blocks["quality"] = "(not run in this mode)"
    blocks["data"] = data.render(results["data"]) if "data" in results else "(not run in this mode)"
    blocks["generation"] = (
        generation.render(results["generation"]) if "generation" in results else "(not run in this mode)"
    )
    blocks["scenarios"] = render_scenarios(results)
    blocks["targets"] = render_targets(results)
    return blocks


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
    if "scenarios" not in results:
        return "(not run in this mode)"
    scenarios = results["scenarios"]
    by_data = {sc.data: sc for sc in quality.SCENARIOS}
    parts = []
    for name, r in scenarios["by_data"].items():
        sc = by_data[name]
        body = r["report_md"].split("## Validation loss per task")[0].replace("# mtft report", "").strip()
        parts += [
            f"### `data={name}`",
            "",
            f"Claim under test: {sc.claim} (task of interest: `{sc.focus}`). Budget: "
            f"{scenarios['steps']} steps x {quality.SCENARIO_BATCH} sequences per run, seeds "
            f"{', '.join(map(str, r.get('seeds', scenarios['seeds'])))}; {r['wall_s'] / 60:.1f} minutes. "
            f"`mtft report {r['dir']}/*` printed:",
            "",
            body.replace("## Task weights", "#### Task weights"),
            "",
        ]
    return "\n".join(parts).rstrip()


def render_targets(results: dict[str, Any]) -> str:
    r = results["throughput"]["ratios"]
    oh = results["overhead"]["by_tasks"]
    T4 = oh.get("4") or next(iter(oh.values()))
    Ts = list(oh)
    Tmax = max(Ts, key=int)

    def status(ok: bool) -> str:
        return "met" if ok else "**missed**"

    gn = ", ".join(f"T={T}: {_x(oh[T]['gradnorm']['ratio'])}" for T in Ts)
    rows = [
        "| target | measured | status |",
        "|---|---:|---|",
        f"| mtft ≥ 0.9x bare PyTorch loop (tokens/s) | {_x(r['mtft/bare'])} | {status(r['mtft/bare'] >= 0.9)} |",
        f"| mtft ≥ 1.0x Hugging Face Trainer | {_x(r['mtft/hf'])} | {status(r['mtft/hf'] >= 1.0)} |",
        f"| `data.packing=true` ≥ 1.8x plain batches (useful tokens/s, codetasks) | {_x(r['mtft_packed/mtft'])} | "
        f"{status(r['mtft_packed/mtft'] >= 1.8)} |",
        f"| with packing on both sides: mtft ≥ 0.9x bare loop, ≥ 1.0x HF Trainer | {_x(r['mtft_packed/bare_packed'])}, "
        f"{_x(r['mtft_packed/hf_packed'])} | {status(r['mtft_packed/bare_packed'] >= 0.9 and r['mtft_packed/hf_packed'] >= 1.0)} |",
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
        "--only-scenarios",
        action="store_true",
        help="run only the embedded scenarios' sweeps and rewrite only their block (the rest of "
        "results.json is kept)",
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
    if args.only_scenarios:
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results["scenarios"] = run_scenarios(MODES[args.mode], out_dir, lambda s: print(s, flush=True))
        results_path.write_text(json.dumps(results, indent=1))
        rewrite(args.markdown, {"scenarios": render_scenarios(results)})
        print(f"results: {results_path}\nscenario tables rewritten in {args.markdown}")
        return 0
    if args.render_only:
        results = json.loads(results_path.read_text())
    else:
        results = run_all(args.mode, out_dir, log=lambda s: print(s, flush=True))
        results_path.write_text(json.dumps(results, indent=1))
    rewrite(args.markdown, render(results))
    print(f"results: {results_path}\ntables rewritten in {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
