"""The GPU check (`bench/gpu_check.sh`, `make gpu-check`): tokens/s, MFU and peak memory of real
`mtft train` runs of a ~0.5B Qwen2-architecture model on one GPU, written to BENCHMARKS.md's GPU section.

The model is built here from `Qwen2Config` with Qwen2.5-0.5B's shape and random weights (nothing is
downloaded) and the embedded tokenizer; the data is codetasks. Every case is one `mtft train` process
with its own timeout, so a failing or missing feature (flash-attn, bitsandbytes, DeepSpeed,
`data.packing`) costs that case only; cases whose requirement is absent are skipped with the reason.
MFU = 6 N useful tokens/s / the GPU's peak dense bf16 FLOP/s (N: all parameters; attention FLOPs are
not counted), for full finetuning only (LoRA does no weight-gradient work on frozen weights).
`--device cpu --size tiny` runs the same machinery on a tiny model (how it is tested without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, median
from mtft.core.rundir import CHECKPOINTS, METRICS, MODEL, SUMMARY

# Peak dense bf16 tensor-core FLOP/s (vendor datasheets, without sparsity), matched on the device name.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}
SIZES = {  # Qwen2.5-0.5B's shape (494M parameters with its 151,936-token vocabulary), and a CPU-sized one
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=0),
}  # fmt: skip
TIMED_FROM = 5  # the first steps (allocator warm-up, kernels selection) are not timed


def _importable(module: str) -> Callable[[Args], str | None]:
    def check(args: Args) -> str | None:
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - any failure to import means the case cannot run
            return f"{module} is not importable ({type(e).__name__})"
        return None

    return check


def _packing(args: Args) -> str | None:
    from mtft.data.config import DataConfig

    return None if "packing" in DataConfig.__dataclass_fields__ else "this mtft has no data.packing"


def _cuda(args: Args) -> str | None:
    return None if args.device == "cuda" else "needs a CUDA GPU"


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...] = ()
    needs: tuple[Callable[[Args], str | None], ...] = ()
    torchrun: bool = False  # DeepSpeed: one rank started by torchrun
    full_finetuning: bool = True  # MFU is reported


CASES = [
    Case("padded"),
    Case("packed", ("data.packing=true",), (_packing,)),
    Case("flash_attention_2", ("model.attn_implementation=flash_attention_2",), (_cuda, _importable("flash_attn"))),
    Case("lora", ("peft=lora",), full_finetuning=False),
    Case("qlora", ("peft=qlora",), (_cuda, _importable("bitsandbytes")), full_finetuning=False),
    Case("zero2", ("deepspeed=zero2",), (_cuda, _importable("deepspeed")), torchrun=True),
    Case("zero3", ("deepspeed=zero3",), (_cuda, _importable("deepspeed")), torchrun=True),
    Case("coba", ("balancer=coba", "balancer.warmup_steps=2")),
    Case("famo", ("balancer=famo",)),
    Case("gradnorm", ("balancer=gradnorm",)),
]  # fmt: skip
BALANCER_CASES = ("coba", "famo", "gradnorm")  # compared step by step with `padded` (uniform)


@dataclass
class Args:
    device: str
    size: str
    cases: list[Case]
    steps: int
    batch_size: int
    max_length: int
    timeout: int
    out: Path
    markdown: Path
    extra: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> Args:
    by_name = {c.name: c for c in CASES}
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 0.5b on cuda, tiny on cpu")
    p.add_argument("--cases", default="all", help=f"comma-separated, from: {', '.join(by_name)}")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per case")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--max-length", type=int, default=512, help="data.max_length")
    p.add_argument("--timeout", type=int, default=150, help="seconds per case before it is stopped")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    p.add_argument(
        "--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help="file whose GPU section to rewrite"
    )
    p.add_argument("extra", nargs="*", help="more `mtft train` overrides for every case")
    a = p.parse_args(argv)
    names = list(by_name) if a.cases == "all" else [n.strip() for n in a.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(by_name)}")
    if a.steps <= TIMED_FROM or a.batch_size < 1 or a.max_length < 16 or a.timeout < 1:
        p.error(f"--steps must exceed {TIMED_FROM}; --batch-size >= 1, --max-length >= 16, --timeout >= 1")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here (use --device cpu for the CPU smoke mode)")
    size = a.size or ("0.5b" if a.device == "cuda" else "tiny")
    cases = [by_name[n] for n in names]
    return Args(
        a.device, size, cases, a.steps, a.batch_size, a.max_length, a.timeout, a.out, a.markdown, a.extra
    )


def peak_flops(device_name: str) -> float | None:
    """The GPU's peak dense bf16 FLOP/s from its name (the longest matching key), or None if unknown."""
    hits = [k for k in PEAK_BF16 if k in device_name]
    return PEAK_BF16[max(hits, key=len)] if hits else None


def build_model(size: str, out_dir: Path) -> tuple[Path, int]:
    """A Qwen2-architecture model with random weights and the embedded tokenizer, saved like a Hub model."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bench.common import Setup

    model_dir = out_dir / f"qwen2-{size}"
    tokenizer = AutoTokenizer.from_pretrained(Setup.load().model_path)
    shape = dict(SIZES[size])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, sum(p.numel() for p in model.parameters())


def command(case: Case, args: Args, model_dir: Path, run_dir: Path) -> list[str]:
    overrides = [
        "model=hf", f"model.name_or_path={model_dir}",
        *(("model.dtype=bfloat16", "trainer.precision=bf16") if args.device == "cuda" else ("model.dtype=float32",)),
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch_size}", f"data.max_length={args.max_length}",
        f"trainer.eval_interval={args.steps}", "trainer.eval_batches=1", "trainer.save_interval=null",
        f"hydra.run.dir={run_dir}", *case.overrides, *args.extra,
    ]  # fmt: skip
    if case.torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "-m", "mtft", "train", *overrides]  # fmt: skip
    return [sys.executable, "-m", "mtft", "train", *overrides]


def read_run(run_dir: Path) -> dict[str, Any]:
    """Per-step times and tokens of the timed steps, tokens/s, and the peak GPU memory, from the run dir."""
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line]
    steps = [
        r for r in rows if r.get("split") == "train" and r.get("task") == "all" and r.get("tokens_per_s")
    ]
    timed = [r for r in steps if r["step"] > TIMED_FROM]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in timed]
    summary = json.loads((run_dir / SUMMARY).read_text())
    return {
        "step_s": seconds,
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(seconds),
        "peak_gpu_memory_mb": summary.get("peak_gpu_memory_mb"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
    }


def run_case(case: Case, args: Args, model_dir: Path) -> dict[str, Any]:
    for need in case.needs:
        reason = need(args)
        if reason:
            return {"status": f"skipped: {reason}"}
    run_dir = args.out / "runs" / case.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{case.name}.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    try:
        with log.open("w") as f:
            cmd = command(case, args, model_dir, run_dir)
            proc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.timeout, check=False
            )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.timeout} s (log: {log})"}
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        return {"status": f"failed (exit {proc.returncode}): {last[0][:200]}"}
    result = {"status": "ok", "wall_s": wall, **read_run(run_dir)}
    for heavy in (CHECKPOINTS, MODEL):  # ~6 GB per case at 0.5B (weights, AdamW states): disk is finite
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    return result


def mfu(tokens_per_s: float, params: int, peak: float | None) -> float | None:
    return 6 * params * tokens_per_s / peak if peak else None


def render(results: dict[str, Any]) -> str:
    """The GPU section's block: one row per case, the balancer ratios, and the issue's targets."""
    peak, params = results["peak_flops"], results["parameters"]
    cases = results["cases"]
    lines = [
        f"Run {results['started']} on **{results['device_name']}** (peak dense bf16 "
        f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}), {results['software']}; model: Qwen2 "
        f"architecture, {params:,} parameters, random weights; codetasks, {results['batch_size']} "
        f"sequences x data.max_length {results['max_length']}, {results['steps']} steps per case "
        f"(timed from step {TIMED_FROM + 1}); {results['wall_s'] / 60:.1f} minutes in all.",
        "",
        "| case | useful tokens/s | MFU | peak GPU memory | status |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in cases.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | — | — | — | {r['status']} |")
            continue
        m = mfu(r["tokens_per_s"], params, peak) if r.get("full_finetuning") else None
        mem = r.get("peak_gpu_memory_mb")
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {f'{m:.1%}' if m is not None else '—'} | "
            f"{f'{mem / 1024:.1f} GiB' if mem else '—'} | ok |"
        )
    base = cases.get("padded", {})
    ratios = {}
    for name in BALANCER_CASES:
        r = cases.get(name, {})
        if r.get("status") == "ok" and base.get("status") == "ok":
            ratios[name] = median([x / u for x, u in zip(r["step_s"], base["step_s"], strict=False)])
    lines += ["", "| target | measured | status |", "|---|---:|---|"]
    packed = cases.get("packed", {})
    m = mfu(packed["tokens_per_s"], params, peak) if packed.get("status") == "ok" else None
    lines.append(
        f"| packed bf16 full finetuning MFU ≥ 35% | {f'{m:.1%}' if m is not None else '—'} | "
        f"{'not measured' if m is None else ('met' if m >= 0.35 else '**missed**')} |"
    )
    for name, limit in (("coba", 1.05), ("famo", 1.05), ("gradnorm", 1.6)):
        x = ratios.get(name)
        verdict = "not measured" if x is None else ("met" if x <= limit else "**missed**")
        lines.append(
            f"| {name} ≤ {limit}x uniform step time (T=4, paired steps) | {f'{x:.2f}x' if x else '—'} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import platform

    import torch

    from bench.run import rewrite

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.processor() or 'unknown'})"
    )
    print(f"building the {args.size} Qwen2 model in {args.out}", flush=True)
    model_dir, params = build_model(args.size, args.out)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device_name": name,
        "peak_flops": peak_flops(name) if args.device == "cuda" else None,
        "software": f"torch {torch.__version__}",
        "parameters": params,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "cases": {},
    }
    for case in args.cases:
        print(f"case {case.name} ...", flush=True)
        r = run_case(case, args, model_dir)
        r["full_finetuning"] = case.full_finetuning
        results["cases"][case.name] = r
        print(
            f"  {r['status']}" + (f", {r['tokens_per_s']:,.0f} tokens/s" if r["status"] == "ok" else ""),
            flush=True,
        )
    results["wall_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    rewrite(args.markdown, {"gpu": render(results)})
    print(f"results: {args.out / 'results.json'}; GPU section rewritten in {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
