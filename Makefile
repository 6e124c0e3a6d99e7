# Every target sets up .venv itself, so a fresh clone needs only `make demo` or `make test`.
# TORCH picks the PyTorch build: the default is the CPU wheel (never a multi-GB CUDA download on a
# CPU-only machine). On a CUDA machine: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv demo test test-all lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Main job. Until the Boltzmann-generator pipeline exists: a short MD dataset of the default
# system, the P4Inv linear-layer benchmark (paper Fig. 2) and the -I(101) problem (Fig. 5).
demo: venv
	$(PY) -m p4bg.simulate --ns 0.2 --out data/demo_alanine_dipeptide_600K --resume
	$(PY) benchmarks/linear_layers.py
	$(PY) benchmarks/linear_problems.py --problems neg_identity

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Fast suite: what CI runs.
test: venv lint
	$(PY) -m pytest -m "not slow" -q

# Everything, slow tests included.
test-all: venv lint
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/md_throughput.py
	$(PY) benchmarks/energy_throughput.py
	$(PY) benchmarks/flow_step.py
	$(PY) benchmarks/linear_layers.py
	$(PY) benchmarks/linear_problems.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
