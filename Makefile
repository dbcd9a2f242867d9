# Every target sets up .venv on first use, so each works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build that lies on this project's machines; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup test demo bench bench-quick lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[torch,demo,dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m jaxnorm.demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check jaxnorm torch_compat tests benchmarks
	$(BIN)/ruff format --check jaxnorm torch_compat tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
