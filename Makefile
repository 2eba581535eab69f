# One-command set-up: `make train` and `make test` create .venv and install polyrl on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.polyrl-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-vllm

$(STAMP): pyproject.toml scripts/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c scripts/constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/polyrl train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# the vllm sampler's tests, in a separate environment with vLLM (built on first use; see .ci/vllm)
test-vllm:
	.ci/vllm $(PYTEST_ARGS)
