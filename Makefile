# Set-up and everyday commands. `make demo` and `make test` each create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the pinned CPU build of torch goes in first, so nothing pulls the multi-GB CUDA wheels
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu fuzz bench study report install clean gpu-suite gpu-suite-dry

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

# every hypothesis property with random seeds and many examples (FUZZ_EXAMPLES per property)
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider -m property \
		--hypothesis-show-statistics

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) benchmarks/routing_solvers.py
	$(PY) benchmarks/placement.py

study: $(STAMP)
	$(PY) benchmarks/balancer_study.py

report: $(STAMP)
	$(PY) -m moebalance report

# the GPU suite (docs/gpu.md): on a CUDA machine it needs no .venv (python3 with torch + triton); DRY=1 for a CPU dry run
gpu-suite:
	bash benchmarks/gpu_suite.sh $(if $(filter 1 true yes,$(DRY)),--dry-run)

gpu-suite-dry: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_suite.sh --dry-run

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
