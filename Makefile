# Two commands on a fresh machine with Python 3.11: `make run` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev run test sync-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"

run: install
	$(BIN)/python run_notebooks.py

# pytest's exit 5 (no tests collected) is a failure here, like every other non-zero exit.
test: install-dev
	$(BIN)/python -m pytest tests -q
	$(BIN)/nbdev-test --n-workers 0

# Notebooks are the source of truth: cleaning and exporting them must leave git status unchanged.
sync-check: install-dev
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export
	@if [ -n "$$(git status --porcelain -- nbs pipeline_lib)" ]; then \
	  echo "nbdev-clean/nbdev-export changed files: notebooks and pipeline_lib are out of sync:"; \
	  git status --porcelain -- nbs pipeline_lib; exit 1; fi
