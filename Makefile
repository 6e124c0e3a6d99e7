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

# Main job on the default system: a 4 ns MD dataset of alanine dipeptide at 600 K saved every
# 0.04 ps (100,000 frames: frames are cheap, and more of them keep the short run from
# overfitting; about two minutes), then the paper's P4Inv Boltzmann generator trained with the
# `quick` preset (cosine-decayed learning rate; about 4 minutes on 2 cores), 20,000 samples from
# it and the report against the MD test frames (runs/demo_p4inv/report/report.md). Re-running
# continues where it stopped.
DEMO_DATA ?= data/demo_alanine_dipeptide_600K
DEMO_RUN ?= runs/demo_p4inv
demo: venv
	$(PY) -m p4bg.simulate --ns 4 --save-every-ps 0.04 --out $(DEMO_DATA) --resume
	if [ -f $(DEMO_RUN)/checkpoint.pt ]; then $(PY) -m p4bg.train --resume $(DEMO_RUN); \
	else $(PY) -m p4bg.train --preset quick --mixing=p4inv --data $(DEMO_DATA) --out $(DEMO_RUN); fi
	$(PY) -m p4bg.sample $(DEMO_RUN) --n 20000 --overwrite
	$(PY) -m p4bg.analyze $(DEMO_RUN) --reference $(DEMO_DATA)

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
	$(PY) -m p4bg.simulate --ns 4 --save-every-ps 0.04 --out $(DEMO_DATA) --resume
	$(PY) benchmarks/train_step.py --data $(DEMO_DATA)

# The paper's experiments (hours; docs/results.md §1-4).
bench-paper: venv
	$(PY) benchmarks/linear_problems.py
	$(PY) benchmarks/densities_2d.py --steps 2000 --out docs/results
	bash benchmarks/paper_bg.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
