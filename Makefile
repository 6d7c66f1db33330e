# Two entry points for a newcomer: `make serve` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ttsd-installed

.PHONY: setup tools serve test test-fast lint bench bench-smoke clean

setup: $(STAMP) tools

# Debian tools some tests drive: chromium + chromedriver (the status page's browser test,
# tests/test_status_page.py) and rclone (the fleet recipe, examples/fleet/publish.sh, in
# tests/test_recipes.py). Installed when missing and running as root with apt-get (CI); never
# fails the build: without them those tests skip and say why.
TOOLS := chromium chromium-driver rclone
tools:
	@missing=""; for t in chromium chromedriver rclone; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing for the tests that drive them"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -qq $(TOOLS) || \
	    { apt-get update -qq && apt-get install -y -qq $(TOOLS); }; } >/dev/null 2>&1 || \
	    echo "could not install$$missing: the tests that need them will skip"; \
	fi

# torch first, pinned to the CPU build: letting pip pick torch for transformers pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The daemon on the built-in voice, default paths (see the README); Ctrl-C stops it. Not the
# test tools: a box that only serves gets no browser.
serve: $(STAMP)
	$(BIN)/ttsd serve

# Everything CI runs: the linters, then every test, a worker per core (pytest-xdist), each test
# file on one worker (its tests share module-scoped daemons). `make test PARALLEL=` runs them in
# one process.
PARALLEL ?= -n auto --maxprocesses 4 --dist loadfile
test: setup lint
	$(BIN)/python -m pytest $(PARALLEL)

# The unit and in-process tests only (under a minute): no daemon processes, no real voice.
test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow and not daemon"

# ruff (lint and format) and mypy on ttsd/, as configured in pyproject.toml; pyflakes' checks
# (undefined and unused names) on the tests, benchmarks and examples too.
lint: setup
	$(BIN)/ruff check ttsd
	$(BIN)/ruff check --select F,RUF059 --config 'include=["tests/**/*.py","bench/**/*.py","examples/**/*.py"]' tests bench examples
	$(BIN)/ruff format --check ttsd
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/rtf.py

# Every bench script once, in its quickest real mode (a few minutes in all, mostly rtf.py's anchor
# runs): after changing bench/ or what it drives. Not in `make test`, which imports every script
# the way it runs and measures with kernel_rates.py (tests/test_bench_scripts.py).
bench-smoke: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/kernel_rates.py
	$(BIN)/python bench/fusion.py --runs 1 --threads 1
	$(BIN)/python bench/decoder_plans.py --runs 1 --threads 1
	$(BIN)/python bench/flows.py --runs 1 --threads 1
	$(BIN)/python bench/memory_parts.py --threads 1 --precision fp32
	$(BIN)/python bench/steps.py --rounds 1 --runs 1 --threads 1
	$(BIN)/python bench/rtf.py --runs 1 --cold-runs 1 --soak 5 --threads 1 --precision fp32
	$(BIN)/python bench/slow_mkl.py --rounds 1 --runs 1
	$(BIN)/python bench/serve.py --requests 3 --threads 1
	$(BIN)/python bench/voices.py --requests 10
	$(BIN)/python bench/busy.py --runs 1
	$(BIN)/python bench/busy_threads.py --rounds 1 --requests 2
	$(BIN)/python bench/hotswap.py --layouts 1x2 --repeats 1 --swaps 1 --steady 3
	$(BIN)/python bench/soak.py --minutes 0.3
	$(BIN)/python bench/intelligibility.py --repeats 1 --threads 1 --precision fp32
	$(BIN)/python bench/split.py --lengths 128 --repeats 1 --limits 256 --seeds 1 --threads 1
	$(BIN)/python bench/wyoming_vs_piper.py --rounds 1
	$(BIN)/python bench/wyoming_vs_piper.py --rounds 1 --beside cpu

clean:
	rm -rf $(VENV) build *.egg-info
