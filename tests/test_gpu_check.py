"""The GPU check (bench/gpu_check.sh) as far as it runs without a GPU: arguments, the peak-FLOPs table,
the report, and its CPU mode training one tiny case through the real `mtft train`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CODETASKS, ROOT

sys.path.insert(0, str(ROOT))  # `bench` is a top-level folder of the checkout, not part of the wheel

from bench import gpu_check  # noqa: E402

# `mtft train` overrides for the CPU mode's run: 6 steps of 2 see 12 examples, and tokenizing all of
# codetasks at its max length would cost more than the run.
FEW_EXAMPLES = [
    *(f"data.tasks.{task}.max_train_samples=16" for task in CODETASKS),
    *(f"data.tasks.{task}.max_val_samples=8" for task in CODETASKS),
]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cpu", "--cases", "padded,nope"], "unknown case(s) ['nope']"),
        (["--device", "cpu", "--steps", "5"], "--steps must exceed 5"),
        (["--device", "cuda"], "no CUDA device here"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cpu_defaults_to_the_tiny_model_and_every_case():
    args = gpu_check.parse_args(["--device", "cpu"])
    assert args.size == "tiny" and [c.name for c in args.cases] == [c.name for c in gpu_check.CASES]


def test_peak_flops_by_device_name():
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops("Some Future Accelerator") is None


def test_report_computes_mfu_and_paired_balancer_ratios():
    ok = {"status": "ok", "full_finetuning": True, "peak_gpu_memory_mb": 2048.0}
    results = {
        "started": "today", "device_name": "NVIDIA H100 80GB HBM3", "peak_flops": 989e12,
        "software": "torch", "parameters": 500_000_000, "batch_size": 16, "max_length": 512,
        "steps": 30, "wall_s": 60.0,
        "cases": {
            "padded": {**ok, "tokens_per_s": 100_000.0, "step_s": [1.0, 2.0, 1.0]},
            "packed": {**ok, "tokens_per_s": 120_000.0, "step_s": [1.0, 1.0, 1.0]},
            "lora": {**ok, "full_finetuning": False, "tokens_per_s": 150_000.0, "step_s": [1.0]},
            "coba": {**ok, "tokens_per_s": 90_000.0, "step_s": [1.1, 2.2, 1.0]},
            "qlora": {"status": "skipped: bitsandbytes is not importable (ImportError)"},
        },
    }  # fmt: skip
    text = gpu_check.render(results)
    assert "| padded | 100,000 | 30.3% | 2.0 GiB | ok |" in text  # 6 * 5e8 * 1e5 / 989e12
    assert "| lora | 150,000 | — |" in text  # no MFU for adapters
    assert "| packed bf16 full finetuning MFU ≥ 35% | 36.4% | met |" in text
    assert "| coba ≤ 1.05x uniform step time (T=4, paired steps) | 1.10x | **missed** |" in text
    assert "| gradnorm ≤ 1.6x uniform step time (T=4, paired steps) | — | not measured |" in text
    assert "| qlora | — | — | — | skipped: bitsandbytes is not importable (ImportError) |" in text


@pytest.mark.slow
def test_cpu_mode_trains_a_tiny_case_and_rewrites_the_gpu_section(mtft_env, tmp_path: Path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(
        "# Benchmarks\n\nkept\n\n## GPU\n\n<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\n\nafter\n"
    )
    out = tmp_path / "gpu"
    cmd = [str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--cases", "padded,qlora", "--steps", "6",
           "--batch-size", "2", "--max-length", "64", "--out", str(out), "--markdown", str(markdown),
           *FEW_EXAMPLES]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**mtft_env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.endswith("<!-- /bench:gpu -->\n\nafter\n")
    assert "old" not in text and "| qlora | — | — | — | skipped: needs a CUDA GPU |" in text
    padded = json.loads((out / "results.json").read_text())["cases"]["padded"]
    assert padded["status"] == "ok" and padded["tokens_per_s"] > 0 and len(padded["step_s"]) == 1
    config = json.loads((out / "qwen2-tiny" / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    run_dir = out / "runs" / "padded"
    assert (run_dir / "summary.json").is_file() and (run_dir / "metrics.jsonl").is_file()  # a real run dir
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()  # freed after reading
