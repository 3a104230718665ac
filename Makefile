# Two commands do everything, each with its own setup: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
# No network at run or test time: the hub is only read from the local cache.
export HF_HUB_OFFLINE ?= 1
# The quick main job: MIRA on the embedded testbed (the default config) with a short budget (lr raised from 0.01
# so 20 steps show a visible change).
RUN_ARGS ?= method.num_steps=10 method.opt_steps=20 method.lr=0.05 prompts.limit=3

# make reproduce-tables [SCALE=testbed|paper] [EXPERIMENT="mechanism compute_matched"] [JOBS=n: runs at a time]
SCALE ?= testbed
EXPERIMENT ?=

.PHONY: install run lint format test bench bench-gpu reproduce-tables clean

install: $(STAMP)

# torch first, pinned, then everything under constraints.txt: otherwise pip may pull a newer torch + CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: install
	$(PY) -m framework.run $(RUN_ARGS)

# ruff (pyproject.toml: pycodestyle + pyflakes, 120 columns; ruff's formatter) on the whole tree; `make test` runs it
# first, `make format` rewrites the tree into the formatter's style.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff format src tests benchmarks

# The suite runs on every core (pytest-xdist; each worker one CPU thread, conftest.py), at most 4 workers: about
# 5-7 minutes of pytest on 2 cores. `make test PYTEST_ARGS="-n 0 tests/test_x.py"` runs one file in this process.
PYTEST_ARGS ?= -n auto --maxprocesses 4
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

reproduce-tables: install
	$(PY) -m framework.analysis.experiments --scale $(SCALE) $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) $(if $(JOBS),--jobs $(JOBS))

bench: install
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_batch.py
	$(PY) benchmarks/bench_monitor.py
	$(PY) benchmarks/bench_grpo.py
	$(PY) benchmarks/bench_full_size.py

# The full-size path on a CUDA device (random weights, nothing downloaded): make bench-gpu [BENCH_GPU_ARGS="--model sd15"]
bench-gpu: install
	$(PY) benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
