#!/usr/bin/env bash
# The GPU check: real `mtft train` runs of a locally built ~0.5B Qwen2-architecture model (bf16) on one
# GPU; writes the "GPU" section of BENCHMARKS.md. About 5-8 minutes on one H100/H200.
#   bench/gpu_check.sh                          every case (see bench/gpu_check.py)
#   bench/gpu_check.sh --cases padded,packed    some of them
#   bench/gpu_check.sh --device cpu             the CPU smoke mode (tiny model), what the tests run
# PYTHON picks the interpreter (default: the checkout's .venv, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$root"
exec "$PYTHON" -m bench.gpu_check "$@"
