# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs. TORCH pins the build to install (default: the CPU-friendly 2.13.0 wheel);
# TRITON is only needed on the CPU, where tests run Triton kernels under TRITON_INTERPRET=1.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
PY := $(VENV)/bin/python

.PHONY: demo test lint gpu-test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m qknorm demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
	$(MAKE) lint

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check qknorm tests benchmarks examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
