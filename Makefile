# Two entry points for a newcomer: `make serve` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ttsd-installed

.PHONY: setup serve test bench clean

setup: $(STAMP)

# torch first, pinned to the CPU build: letting pip pick torch for transformers pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The daemon on the built-in voice, default paths (see the README); Ctrl-C stops it.
serve: setup
	$(BIN)/ttsd serve

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/rtf.py

clean:
	rm -rf $(VENV) build *.egg-info
