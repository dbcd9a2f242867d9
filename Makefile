# Every target sets up .venv on first use, so each works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build that lies on this project's machines; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

# The floor environment (`make test-floor`): the lowest declared versions on Python 3.10, the
# anomalib 0.x user's stack. torch for Python 3.10 comes from PyPI (a CUDA build, ~2.7 GB).
FLOOR_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.10.*/bin/python3.10) python3.10)
FLOOR_VENV ?= .venv-floor
FLOOR_CONSTRAINTS ?= ci/floor-constraints.txt
# The integration test with real anomalib 0.7.0 (`make test-anomalib`), on Python 3.11.
ANOMALIB_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.11.*/bin/python3.11) python3.11)
ANOMALIB_VENV ?= .venv-anomalib
# The integration test with real anomalib 1.2.0 and 1.1.0 (`make test-anomalib1`), on Python 3.11.
ANOMALIB1_VENV ?= .venv-anomalib1
# The integration test with real anomalib 2.7.0 (`make test-anomalib2`), on Python 3.11.
ANOMALIB2_VENV ?= .venv-anomalib2

.PHONY: setup test docs demo bench bench-quick bench-replot lint clean setup-floor test-floor \
	setup-anomalib test-anomalib setup-anomalib1 test-anomalib1 setup-anomalib2 test-anomalib2 \
	bench-anomalib2 ci

setup: $(VENV)/.installed

# One line per step (pip is quiet, and the whole takes a minute or more).
$(VENV)/.installed: pyproject.toml Makefile
	@echo "setup 1/4: creating a virtual environment in $(VENV) ($(PYTHON))"
	@$(PYTHON) -m venv $(VENV)
	@echo "setup 2/4: upgrading pip"
	@$(BIN)/pip install --quiet --upgrade pip
	@echo "setup 3/4: installing $(TORCH) (the longest step)"
	@$(BIN)/pip install --quiet "$(TORCH)"
	@echo "setup 4/4: installing jaxnorm (editable) with its torch, demo and dev extras"
	@$(BIN)/pip install --quiet -e ".[torch,demo,dev]"
	@touch $@
	@echo "setup: done; $(VENV) is ready"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The documentation site (docs/), warnings as errors; open docs/_build/html/index.html.
docs: setup
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

setup-floor: $(FLOOR_VENV)/.installed

$(FLOOR_VENV)/.installed: pyproject.toml Makefile $(FLOOR_CONSTRAINTS)
	rm -rf $(FLOOR_VENV)
	$(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/pip install --quiet -c $(FLOOR_CONSTRAINTS) -e ".[torch,demo,test]"
	$(FLOOR_VENV)/bin/python ci/check_versions.py $(FLOOR_CONSTRAINTS)
	touch $@

# The whole suite on the floors. Tests that need a newer release skip and say why (the
# `lightning` namespace, flax's per-metric masks). Deselected: bit-equality of sharded and
# unsharded normalize on a 4x2 mesh, which jax 0.6.0's XLA:CPU misses by 1 ulp; the 1dev and
# 8dev meshes are tested.
FLOOR_DESELECT := --deselect \
	"tests/jaxnorm/test_hook_sharded.py::test_normalized_outputs_stay_sharded_and_equal_the_unsharded_run[4x2dev]"
test-floor: setup-floor
	$(FLOOR_VENV)/bin/python -c "import torch_compat, pytorch_lightning, torchmetrics"
	$(FLOOR_VENV)/bin/python -m pytest $(FLOOR_DESELECT) $(PYTEST_ARGS)

setup-anomalib: $(ANOMALIB_VENV)/.installed

$(ANOMALIB_VENV)/.installed: pyproject.toml Makefile ci/anomalib-requirements.txt \
		ci/anomalib-constraints.txt
	rm -rf $(ANOMALIB_VENV)
	$(ANOMALIB_PYTHON) -m venv $(ANOMALIB_VENV)
	$(ANOMALIB_VENV)/bin/pip install --quiet --upgrade pip
	$(ANOMALIB_VENV)/bin/pip install --quiet -c ci/anomalib-constraints.txt -r ci/anomalib-requirements.txt
	$(ANOMALIB_VENV)/bin/pip install --quiet --no-deps anomalib==0.7.0
	# The README's line for anomalib 0.x users; check_versions proves it moved none of the pins.
	$(ANOMALIB_VENV)/bin/pip install --quiet -e ".[torch,test]" "numpy<2"
	$(ANOMALIB_VENV)/bin/python ci/check_versions.py ci/anomalib-constraints.txt
	$(ANOMALIB_VENV)/bin/python -c "import anomalib, imgaug, timm, torch_compat"
	touch $@

# Real anomalib 0.7.0 models with anomalib's callback and with ours (tests_anomalib/).
test-anomalib: setup-anomalib
	TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 $(ANOMALIB_VENV)/bin/python -m pytest tests_anomalib \
		$(PYTEST_ARGS)

setup-anomalib1: $(ANOMALIB1_VENV)/.installed

# anomalib 1.1.0 (the design with one shared MinMax) goes to its own folder beside the venv,
# put before 1.2.0 on the path by the second pass of test-anomalib1: it is pure Python and
# needs nothing 1.2.0 does not.
ANOMALIB110 := $(ANOMALIB1_VENV)/anomalib-1.1.0
$(ANOMALIB1_VENV)/.installed: pyproject.toml Makefile ci/anomalib1-requirements.txt \
		ci/anomalib1-constraints.txt
	rm -rf $(ANOMALIB1_VENV)
	$(ANOMALIB_PYTHON) -m venv $(ANOMALIB1_VENV)
	$(ANOMALIB1_VENV)/bin/pip install --quiet --upgrade pip
	$(ANOMALIB1_VENV)/bin/pip install --quiet -c ci/anomalib1-constraints.txt \
		-r ci/anomalib1-requirements.txt
	$(ANOMALIB1_VENV)/bin/pip install --quiet --no-deps anomalib==1.2.0
	$(ANOMALIB1_VENV)/bin/pip install --quiet --no-deps --target $(ANOMALIB110) anomalib==1.1.0
	# The README's line for anomalib 1.x users; check_versions proves it moved none of the pins.
	$(ANOMALIB1_VENV)/bin/pip install --quiet -e ".[torch,test]" "numpy<2"
	$(ANOMALIB1_VENV)/bin/python ci/check_versions.py ci/anomalib1-constraints.txt
	$(ANOMALIB1_VENV)/bin/python -c "import anomalib.models, torch_compat.anomalib1"
	touch $@

# Real anomalib 1.2.0 (Padim, PatchCore) with anomalib's callback and with ours
# (tests_anomalib1/), then the same tests with anomalib 1.1.0, the older design.
test-anomalib1: setup-anomalib1
	$(ANOMALIB1_VENV)/bin/python -m pytest tests_anomalib1 $(PYTEST_ARGS)
	PYTHONPATH=$(ANOMALIB110) $(ANOMALIB1_VENV)/bin/python -m pytest tests_anomalib1 $(PYTEST_ARGS)

setup-anomalib2: $(ANOMALIB2_VENV)/.installed

$(ANOMALIB2_VENV)/.installed: pyproject.toml Makefile ci/anomalib2-requirements.txt \
		ci/anomalib2-constraints.txt
	rm -rf $(ANOMALIB2_VENV)
	$(ANOMALIB_PYTHON) -m venv $(ANOMALIB2_VENV)
	$(ANOMALIB2_VENV)/bin/pip install --quiet --upgrade pip
	$(ANOMALIB2_VENV)/bin/pip install --quiet -c ci/anomalib2-constraints.txt \
		-r ci/anomalib2-requirements.txt
	# The line of docs/anomalib2.md for anomalib 2.x users; check_versions proves it moved
	# none of the pins.
	$(ANOMALIB2_VENV)/bin/pip install --quiet -c ci/anomalib2-constraints.txt -e ".[torch,test]"
	$(ANOMALIB2_VENV)/bin/python ci/check_versions.py ci/anomalib2-constraints.txt
	$(ANOMALIB2_VENV)/bin/python -c "import anomalib, torchvision, torch_compat.anomalib2"
	touch $@

# Real anomalib 2.7.0 models with anomalib's PostProcessor and with ours (tests_anomalib2/).
test-anomalib2: setup-anomalib2
	$(ANOMALIB2_VENV)/bin/python -m pytest tests_anomalib2 $(PYTEST_ARGS)

# The postprocessor and threshold benchmark cases (ours against anomalib 2.7.0's PostProcessor
# and F1AdaptiveThreshold).
bench-anomalib2: setup-anomalib2
	$(ANOMALIB2_VENV)/bin/python -m benchmarks --cases postprocessor,threshold $(BENCH_ARGS)

demo: setup
	$(BIN)/python -m jaxnorm.demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

# Rebuilds the README block, docs/_generated/ tables and plot from benchmarks/results/*.json.
bench-replot: setup
	$(BIN)/python -m benchmarks --replot

lint: setup
	$(BIN)/ruff check jaxnorm torch_compat tests benchmarks tests_anomalib tests_anomalib1 tests_anomalib2 ci examples docs/conf.py
	$(BIN)/ruff format --check jaxnorm torch_compat tests benchmarks tests_anomalib tests_anomalib1 tests_anomalib2 ci examples docs/conf.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(ANOMALIB_VENV) $(ANOMALIB1_VENV) $(ANOMALIB2_VENV) .pytest_cache .hypothesis docs/_build
