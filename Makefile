# Two commands do everything on a fresh machine: `make demo` and `make test`. Each builds the environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install when the environment has none: PyPI's wheel for this version is the CUDA build on
# Linux; an existing torch (visible through --system-site-packages) is kept as it is.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.bigbatch-installed
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test lint mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

# A tiny BERT pretrained with LAMB at a global batch of 4,096 on 2 CPU ranks (ZeRO-1), through the deepspeed launcher.
demo: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus 2 --module bigbatch train tiny

test: $(STAMP)
	$(PY) -m pytest -v --durations=15 tests

# the project's own [tool.ruff] settings (pyproject.toml)
lint: $(STAMP)
	$(PY) -m ruff check .

# Mutation testing ([tool.mutmut] in pyproject.toml: the parts, and the fast tests each mutant runs against). Not in
# CI. One part: `make mutate PART='bigbatch.plan.timing*'`; scores and survivors: bench/results/mutation.md.
PART ?=
mutate: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[mutate]"
	OMP_NUM_THREADS=1 $(PY) -m mutmut run $(PART)
	$(PY) -m mutmut results

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
