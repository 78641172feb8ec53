# Set-up and everyday commands. `make demo` creates .venv and installs the package; `make test` adds the test tools
# and the Hugging Face integration. The `moebalance` command is then .venv/bin/moebalance (`source
# .venv/bin/activate` puts it on the PATH).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the pinned CPU build of torch goes in first, so nothing pulls the multi-GB CUDA wheels
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-gpu fuzz bench study report install install-test clean gpu-suite gpu-suite-dry

# the package and what it needs to run (what `make demo` uses)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# plus pytest, hypothesis and transformers (the test suite, the benchmarks)
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $(TEST_STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m moebalance demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q

# every hypothesis property with random seeds and many examples (FUZZ_EXAMPLES per property)
FUZZ_EXAMPLES ?= 1000
fuzz: $(TEST_STAMP)
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider -m property \
		--hypothesis-show-statistics

test-gpu: $(TEST_STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(TEST_STAMP)
	$(PY) benchmarks/routing_solvers.py
	$(PY) benchmarks/placement.py

study: $(STAMP)
	$(PY) benchmarks/balancer_study.py

# in a checkout the report sits with the benchmarks' JSON (the command's own default is ./moebalance_results)
report: $(STAMP)
	$(PY) -m moebalance report --results benchmarks/results --out benchmarks/results/report.md

# the GPU suite (docs/gpu.md): on a CUDA machine it needs no .venv (python3 with torch + triton); DRY=1 for a CPU dry run
gpu-suite:
	bash benchmarks/gpu_suite.sh $(if $(filter 1 true yes,$(DRY)),--dry-run)

gpu-suite-dry: $(TEST_STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_suite.sh --dry-run

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
