"""The data pipeline on a generated chat mixture: tokenization throughput and peak memory.

A JSONL file of N multi-turn conversations (system prompt, two exchanges, `messages` format) is read
and tokenized with the ChatML template by mtft's own path (`build_mixture` + `tokenize_mixture`, no
cache), in a fresh process per measurement so peak RSS is its own. The reference is the same file
held as Python objects (`json.loads` of every line), the memory a list-based pipeline starts from.

    python -m bench.data 200000 <tiny model dir>   # prints one JSON line per measurement
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # not bench.common: the reference child must stay light

WORDS = [
    "the",
    "a",
    "model",
    "task",
    "loss",
    "batch",
    "token",
    "query",
    "table",
    "select",
    "join",
    "row",
    "column",
    "value",
    "function",
    "return",
]


def generate(path: Path, n: int, seed: int = 0) -> int:
    """Write `n` conversations of varied length; returns the file's size in bytes."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with path.open("w") as fh:
        for _ in range(n):
            messages = [{"role": "system", "content": sentence(3, 10)}]
            for _ in range(2):
                messages += [
                    {"role": "user", "content": sentence(5, 40)},
                    {"role": "assistant", "content": sentence(5, 80)},
                ]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path.stat().st_size


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Peak anonymous memory (RssAnon, sampled every 20 ms): what the process must hold. VmHWM also
    counts the pages of memory-mapped files it read, which the OS can drop at any time."""

    def __init__(self) -> None:
        self.peak, self._stop = _status_mb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def _child_python(path: Path) -> dict[str, Any]:
    base, peak = _status_mb("RssAnon"), AnonPeak()
    with path.open() as fh:
        records = [json.loads(line) for line in fh]
    return {"rows": len(records), "base_mb": base, "peak_mb": peak.stop(), "hwm_mb": _status_mb("VmHWM")}


def _child_mtft(path: Path, model_dir: str, num_proc: int) -> dict[str, Any]:
    from mtft.data.config import DataConfig, TaskConfig
    from mtft.data.mixture import build_mixture, tokenize_mixture
    from mtft.data.templates import CHATML
    from mtft.models.config import ModelConfig
    from mtft.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir, ModelConfig(name_or_path=model_dir))
    base, peak = _status_mb("RssAnon"), AnonPeak()
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        cfg = DataConfig(source="files", num_proc=num_proc, tasks={"chat": TaskConfig(train=[str(path)])})
        data = tokenize_mixture(build_mixture(cfg, Path(cache)), tokenizer, 512, Path(cache), template=CHATML)
        wall = time.perf_counter() - started
        import pyarrow.compute as pc

        tokens = sum(
            pc.sum(pc.list_value_length(ds.with_format("arrow")[:]["input_ids"])).as_py()
            for ds in (data.train, data.validation)
        )
        rows = len(data.train) + len(data.validation)
        peak_mb = peak.stop()
    return {
        "rows": rows,
        "tokens": tokens,
        "wall_s": wall,
        "base_mb": base,
        "peak_mb": peak_mb,
        "hwm_mb": _status_mb("VmHWM"),
    }


def _measure(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.data", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(n: int, model_dir: str, num_procs: tuple[int, ...], log=print) -> dict[str, Any]:
    """Generate `n` conversations, then measure the Python-objects reference and mtft per num_proc."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        size = generate(path, n)
        log(f"data: {n:,} conversations, {size / 1e6:.0f} MB of JSONL")
        out: dict[str, Any] = {
            "conversations": n,
            "file_mb": size / 1e6,
            "python": _measure("python", str(path)),
        }
        for num_proc in num_procs:
            log(f"data: tokenizing with data.num_proc={num_proc}")
            out[f"mtft_{num_proc}"] = _measure("mtft", str(path), model_dir, str(num_proc))
    return out


def render(results: dict[str, Any]) -> str:
    py = results["python"]
    held = py["peak_mb"] - py["base_mb"]
    rows = [
        f"{results['conversations']:,} generated conversations (system prompt + 2 exchanges, `messages` JSONL, "
        f"{results['file_mb']:.0f} MB), read and tokenized with the ChatML template by `build_mixture` + "
        "`tokenize_mixture` in a fresh process each (cold cache). Anonymous memory is what a process must "
        "hold; VmHWM also counts the pages of memory-mapped Arrow files it has read, which the OS drops "
        "under pressure (with `data.num_proc=2` the workers' memory is their own, not shown):",
        "",
        "| pipeline | conversations/s | tokens/s | peak anonymous memory above start | peak RSS (VmHWM) |",
        "|---|---:|---:|---:|---:|",
        f"| the file as Python objects (`json.loads` per line), the reference | — | — | {held:,.0f} MB | "
        f"{py['hwm_mb']:,.0f} MB |",
    ]
    for key, m in results.items():
        if key.startswith("mtft_"):
            rows.append(
                f"| mtft, `data.num_proc={key[5:]}` | {m['rows'] / m['wall_s']:,.0f} | {m['tokens'] / m['wall_s']:,.0f} | "
                f"{m['peak_mb'] - m['base_mb']:,.0f} MB | {m['hwm_mb']:,.0f} MB |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "python":
        print(json.dumps(_child_python(Path(rest[0]))))
    elif kind == "mtft":
        print(json.dumps(_child_mtft(Path(rest[0]), rest[1], int(rest[2]))))
    else:  # python -m bench.data N MODEL_DIR: the whole measurement
        print(json.dumps(run(int(kind), rest[0], (1, 2))))
