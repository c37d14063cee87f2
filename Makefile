# Every target sets itself up: `make demo` or `make test` alone work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mtft-installed
TORCH  := torch==2.13.0

.PHONY: setup demo test test-fast lint clean bench bench-full gpu-check

setup: $(STAMP)

# torch goes in first and pinned, so nothing below can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/mtft train

test: setup
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check mtft tests bench
	$(BIN)/ruff format --check mtft tests bench

# Benchmarks (BENCHMARKS.md): quick ~15 min on 2 CPU cores; BENCH_MODE=full (or bench-full) ~2.5 h
# (python -m bench.run --mode full --only PART,... reruns some parts and keeps the others).
# Both rewrite the tables of BENCHMARKS.md; results and sweep run dirs go to bench/results/<mode>/
# (results.json is committed: `python -m bench.run --mode full --render-only` re-renders from it).
BENCH_MODE ?= quick

bench: setup
	$(BIN)/python -m bench.run --mode $(BENCH_MODE)

bench-full: setup
	$(BIN)/python -m bench.run --mode full

# On a machine with a CUDA GPU (and a CUDA build of torch in the venv): ~0.5B model, 5-8 minutes;
# rewrites the GPU section of BENCHMARKS.md. GPU_CHECK_ARGS="--cases padded,packed" runs some cases.
gpu-check: setup
	PYTHON=$(BIN)/python bench/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
	[ ! -d bench/results ] || find bench/results -mindepth 2 -maxdepth 2 ! -name results.json -exec rm -rf {} +  # run dirs; results.json is committed
