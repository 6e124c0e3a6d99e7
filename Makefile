# Every target sets up .venv itself, so a fresh clone needs only `make demo` or `make test`.
# TORCH picks the PyTorch build: the default is the CPU wheel (never a multi-GB CUDA download on a
# CPU-only machine). On a CUDA machine: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv demo test test-all lint bench bench-paper clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Main job on the default system (python -m p4bg.demo, runs/demo/): 600 K MD of alanine
# dipeptide, a spline + P4Inv Boltzmann generator trained on it and annealed to 300 K, 300,000
# samples, and report/report.md comparing them with plain 300 K MD of the same CPU seconds (run
# beside it on the other core) and with the 300 K reference shipped in systems/. About 15
# minutes on 2 cores; rerunning continues where it stopped; a GPU is used when there is one.
demo: venv
	$(PY) -m p4bg.demo

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Fast suite: what CI runs.
test: venv lint
	$(PY) -m pytest -m "not slow" -q

# Everything, slow tests included.
test-all: venv lint
	$(PY) -m pytest -q

# The product's speed, side by side (docs/benchmarks.md): minutes.
bench: venv
	$(PY) benchmarks/linear_layers.py
	$(PY) benchmarks/flow_step.py
	$(PY) benchmarks/energy_throughput.py
	$(PY) benchmarks/md_throughput.py
	$(PY) -m p4bg.simulate --ns 4 --save-every-ps 0.04 --out data/demo_alanine_dipeptide_600K --resume
	$(PY) benchmarks/train_step.py --data data/demo_alanine_dipeptide_600K

# The paper's experiments (hours; docs/results.md §1-4).
bench-paper: venv
	$(PY) benchmarks/linear_problems.py
	$(PY) benchmarks/densities_2d.py --steps 2000 --out docs/results
	bash benchmarks/paper_bg.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
