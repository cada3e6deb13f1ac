# One venv, installed from pyproject.toml. `make up` installs only what running needs;
# `make test` / `make lint` add the test extras, `make bench` the benchmark extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-stamp
TESTING := $(VENV)/.test-stamp
BENCHING := $(VENV)/.bench-stamp
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install up test lint check bench bench-peers clean browser config-docs event-schema

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TESTING): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(RUNTIME)

$(BENCHING): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@ $(RUNTIME)

# Everything a developer needs: running, tests, lint and benchmarks.
install: $(TESTING) $(BENCHING)

up: $(RUNTIME)
	$(BIN)/keyveil up $(ARGS)

# Debian's chromium for the browser test (Playwright drives it; nothing is downloaded).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: $(TESTING) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(TESTING)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test

# Regenerate docs/configuration.md from the settings models (a test fails when stale).
config-docs: $(RUNTIME)
	$(BIN)/keyveil env reference --output docs/configuration.md

# Regenerate docs/events.schema.json from the event models (a test fails when stale).
event-schema: $(RUNTIME)
	$(BIN)/python -m shared.eventschema > docs/events.schema.json

# Every benchmark in one run; writes docs/benchmarks/README.md and its PNG plots.
bench: $(TESTING) $(BENCHING)
	$(BIN)/python -m benchmarks.report

# LiteLLM's proxy in a venv of its own (never part of `make test`), then the proxy
# benchmark with the same load through keyveil and LiteLLM in one run: the ratio.
PEERS := .venv-peers
LITELLM := litellm[proxy]==1.106.12
$(PEERS)/.stamp: Makefile
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet '$(LITELLM)'
	touch $@

bench-peers: $(TESTING) $(BENCHING) $(PEERS)/.stamp
	$(BIN)/python -m benchmarks.report --only proxy --peers

clean:
	rm -rf $(VENV) $(PEERS) .keyveil .pytest_cache .mypy_cache .ruff_cache
