# One venv, installed from pyproject.toml; every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install up test lint check bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/keyveil up $(ARGS)

# Debian's chromium for the browser test (Playwright drives it; nothing is downloaded).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test

# Every benchmark in one run; writes docs/benchmarks/README.md and its PNG plots.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(VENV) .keyveil .pytest_cache .mypy_cache .ruff_cache
