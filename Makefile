# The two commands a newcomer needs: `make demo` and `make test`. Both set up everything from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Run the fake windows_exporter and the proxy together, and print URLs to curl.
demo: $(STAMP)
	$(BIN)/windows-metrics-proxy demo

## Install system tools the tests drive (prometheus, promtool) when missing, then lint and test.
test: $(STAMP) system-deps
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/python -m pytest

system-deps:
	scripts/install-system-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

## Benchmarks beside nginx and exporter_exporter (issue 5): installs the bench extra and, as root,
## the peers (nginx-light, wrk, prometheus-exporter-exporter); writes benchmarks/RESULTS.md and
## benchmarks/results.png. Pass flags with BENCH_ARGS, e.g. `make bench BENCH_ARGS='--scales 1'`.
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS  ?=

.PHONY: bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) system-deps
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## The README's dashboard pictures (docs/images/dashboard-*.png): the live monitoring test run with a
## minute of healthy scrapes, its renderings of the dashboards' queries written there.
.PHONY: dashboard-images

dashboard-images: $(STAMP) system-deps
	RENDER_DASHBOARDS=docs/images $(BIN)/python -m pytest -q tests/test_monitoring_live.py
