# Two entry points for a fresh clone: `make run` and `make test`. Both install into .venv first.
.PHONY: run test kill-matrix install lint ui clean

VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(STAMP)

## Run the main job (every asset, in order) on the embedded default config (tide.toml).
run: $(STAMP)
	$(VENV)/bin/tide run

## Run the test suite: Chromium for the browser tests, import contracts, lint, then pytest (slow tests included).
test: $(STAMP)
	bash scripts/install_chromium.sh
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

## SIGKILL `tide run` inside every asset partition and resume (~20 min; make test runs a reduced set).
kill-matrix: $(STAMP)
	$(VENV)/bin/python -m pytest -m killmatrix -q tests/test_kill_matrix.py

ui: $(STAMP)
	$(VENV)/bin/tide ui

clean:
	rm -rf warehouse  # the warehouse holds its Dagster instance too (warehouse/.dagster)
