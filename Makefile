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

.PHONY: demo test test-gpu fuzz lint format typecheck bench study report install install-test clean gpu-suite gpu-suite-dry

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

# ruff (its configuration is in pyproject.toml): lint and the formatter's check; `make format` rewrites the files
LINT_PATHS := moebalance solvers kernels integrations tests benchmarks
lint: $(TEST_STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

format: $(TEST_STAMP)
	$(PY) -m ruff format $(LINT_PATHS)

# mypy on the core (moebalance/ and solvers/). mypy cannot map folders to packages as pyproject's package-dir does,
# so the package is linked together under build/typecheck; the report names the files in the checkout
TYPECHECK_DIR := build/typecheck
typecheck: $(TEST_STAMP)
	rm -rf $(TYPECHECK_DIR) && mkdir -p $(TYPECHECK_DIR)/moebalance
	for f in moebalance/*; do [ "$${f##*/}" = __pycache__ ] || ln -s "$(CURDIR)/$$f" $(TYPECHECK_DIR)/moebalance/; done
	for d in solvers kernels integrations; do ln -s "$(CURDIR)/$$d" $(TYPECHECK_DIR)/moebalance/$$d; done
	$(PY) -m mypy -p moebalance --exclude '/moebalance/(kernels|integrations)/' > $(TYPECHECK_DIR)/report.txt; \
		rc=$$?; sed -e 's#^$(TYPECHECK_DIR)/moebalance/solvers/#solvers/#' -e 's#^$(TYPECHECK_DIR)/moebalance/#moebalance/#' \
		$(TYPECHECK_DIR)/report.txt; exit $$rc

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
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache $(TYPECHECK_DIR) *.egg-info
