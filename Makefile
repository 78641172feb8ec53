# Set-up and everyday commands. `make demo` and `make test` each create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the pinned CPU build of torch goes in first, so nothing pulls the multi-GB CUDA wheels
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu bench study report install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m moebalance demo

test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) benchmarks/routing_solvers.py
	$(PY) benchmarks/placement.py

study: $(STAMP)
	$(PY) benchmarks/balancer_study.py

report: $(STAMP)
	$(PY) -m moebalance report

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
