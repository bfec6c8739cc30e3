# Two commands on a fresh machine with Python 3.11: `make run` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install install-dev run test test-fast sync-check lab chromium

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

# The inner loop: unit and property tests only, under 2 minutes on 2 cores (markers in pyproject.toml).
test-fast: install-dev
	$(BIN)/python -m pytest tests -q -m "not slow and not e2e and not browser"

# Notebooks are the source of truth: cleaning and exporting them must leave git status unchanged.
sync-check: install-dev
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export
	@if [ -n "$$(git status --porcelain -- nbs pipeline_lib)" ]; then \
	  echo "nbdev-clean/nbdev-export changed files: notebooks and pipeline_lib are out of sync:"; \
	  git status --porcelain -- nbs pipeline_lib; exit 1; fi

# JupyterLab from the repo root with the venv's kernel: notebooks run top to bottom on their defaults (cwd nbs/).
lab: install
	$(BIN)/jupyter lab

# Debian's Chromium for tests/test_jupyterlab.py (Playwright drives it; nothing downloads a browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	@chromium --version 2>/dev/null
