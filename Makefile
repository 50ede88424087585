# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch, installed first and pinned: an unpinned torch pulls gigabytes of CUDA.
TORCH := torch==2.13.0
# Local state (demo source and warehouse, Dagster instance) lives under TC_HOME.
TC_HOME ?= $(CURDIR)/.tc_platform
DAGSTER_HOME ?= $(TC_HOME)/dagster_home
# The dbt project (reporting marts) ships inside the package; its manifest is parsed on first
# use into ~/.cache/tc-platform/dbt (TC_DBT_CACHE), so no target here prepares it.
DBT_DIR := tc_assets/dbt_metrics

.PHONY: demo test dev rescore install install-test lint format bench screenshots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Generate a few synthetic rounds, run them through Dagster, print the results.
demo: install
	TC_HOME=$(TC_HOME) DAGSTER_HOME=$(DAGSTER_HOME) $(VENV)/bin/tc-platform demo

## Run the test suite (installs the test extras first).
test: install-test
	$(PY) -m pytest

## The Dagster UI (and daemon) on http://127.0.0.1:3000 over the demo's source and warehouse.
dev: install
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || cp tc_assets/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	TC_HOME=$(TC_HOME) DAGSTER_HOME=$(DAGSTER_HOME) $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

## Re-score every round of the instance (after the scoring code changed): a backfill of
## score_round over all round partitions, one queued run per round, which the daemon of
## `make dev` launches within the run queue's limit.
rescore: install
	TC_HOME=$(TC_HOME) DAGSTER_HOME=$(DAGSTER_HOME) $(VENV)/bin/dagster job backfill \
		-w workspace.yaml -j score_round --all all --noprompt

## Screenshots of the UI over the demo for the README (headless Chromium: Debian's `chromium`).
screenshots: install
	test -f $(TC_HOME)/demo/warehouse.duckdb || $(MAKE) demo
	TC_HOME=$(TC_HOME) DAGSTER_HOME=$(DAGSTER_HOME) $(PY) scripts/screenshots.py

lint: install-test
	$(VENV)/bin/ruff check tc_assets tests benchmarks
	$(VENV)/bin/ruff format --check tc_assets tests benchmarks

format: install-test
	$(VENV)/bin/ruff check --fix tc_assets tests benchmarks
	$(VENV)/bin/ruff format tc_assets tests benchmarks

## Full-size benchmarks (5,000 stocks, 420 features, 5,000 models): minutes each.
bench: install
	$(PY) benchmarks/metrics_bench.py
	$(PY) benchmarks/tc_bench.py

clean:
	rm -rf $(TC_HOME) .pytest_cache .ruff_cache $(DBT_DIR)/target $(DBT_DIR)/logs
