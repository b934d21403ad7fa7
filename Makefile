# spotguard — developer entry points. Every target sets itself up: a fresh clone
# needs only Python 3.11+ and Node.js 20+.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# jsii prints a banner on every start when Node.js is older than its newest
# supported line; it is noise for us (Node 20 works), so silence it.
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION := 1
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION := 1
# Nothing here may reach AWS: no credentials are needed to synth or test.
export AWS_EC2_METADATA_DISABLED := true

.PHONY: help setup demo drill test test-unit test-integration test-infra test-drill fuzz e2e lint typecheck synth bench clean

help:
	@echo "make demo    run the local drill (no AWS account needed)"
	@echo "make test    run every test (unit, integration on moto, infrastructure, drill)"
	@echo "make e2e     deploy the staging stack to a local emulator (MiniStack) and drive it"
	@echo "make synth   synthesize cdk.out/ offline, with cdk-nag and cfn-lint"
	@echo "make fuzz    property-based fuzzing, 10,000 inputs per target (parse_event, api, verify)"
	@echo "make lint    ruff + mypy"
	@echo "make bench   run the benchmarks (JSON on stdout)"

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

setup: $(STAMP) $(NODE_STAMP)

demo drill: $(STAMP)
	$(VENV)/bin/spotguard drill $(DRILL_ARGS)

test: setup lint
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-infra: setup
	$(PY) -m pytest tests/infrastructure $(PYTEST_ARGS)

test-drill: $(STAMP)
	$(PY) -m pytest tests/drill $(PYTEST_ARGS)

# tests/fuzz runs in `make test` with the small "ci" profile (200 inputs per target).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/fuzz -p no:cacheprovider -q $(PYTEST_ARGS)

# --- e2e: cdk deploy to MiniStack (a local AWS emulator) ------------------------------
# Its own venv on Python 3.13 (the functions' runtime: MiniStack runs them with its own
# python3 and the bundled layer's cp313 wheels), pinned by requirements-e2e.lock.
E2E_VENV := .venv-e2e
E2E_STAMP := $(E2E_VENV)/.installed
E2E_PYTHON ?= $(shell for p in python3.13 $(HOME)/.pyenv/versions/3.13*/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null && { echo $$p; break; }; done)

$(E2E_STAMP): requirements-e2e.lock
	@test -n "$(E2E_PYTHON)" || { echo "make e2e needs Python 3.13 (set E2E_PYTHON=...)"; exit 1; }
	rm -rf $(E2E_VENV)
	$(E2E_PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-e2e.lock
	@touch $(E2E_STAMP)

e2e: setup $(E2E_STAMP)
	rm -rf e2e-out && mkdir e2e-out
	SPOTGUARD_E2E=1 SPOTGUARD_E2E_VENV=$(CURDIR)/$(E2E_VENV) SPOTGUARD_E2E_DIR=$(CURDIR)/e2e-out $(PY) -m pytest tests/e2e/test_deployed_stack.py \
		-p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

typecheck: $(STAMP)
	$(VENV)/bin/mypy

synth: setup
	rm -rf cdk.out
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" npx cdk synth --quiet --app "$(PY) app.py" --output cdk.out
	$(VENV)/bin/cfn-lint cdk.out/*.template.json

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "# $$b" >&2; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(E2E_VENV) node_modules cdk.out .pytest_cache .mypy_cache .ruff_cache drill-out
