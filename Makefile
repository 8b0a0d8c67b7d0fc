# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install bench bench-full clean

PLUGINS := $(wildcard plugins/*/pyproject.toml)

# the core with its dev tools, and every broker plug-in in plugins/ (each its own distribution)
$(STAMP): pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]" $(foreach p,$(PLUGINS),-e "$(dir $(p))[dev]")
	touch $(STAMP)

# A real OTLP/HTTP receiver with a query API for the telemetry tests (tests/otlp_collector.py):
# Datadog's APM test agent, which decodes OTLP with the official protobuf messages. It lives in a
# venv of its own so that its pinned dependencies never meet the project's.
COLLECTOR_VENV := .venv-collector
COLLECTOR_STAMP := $(COLLECTOR_VENV)/.installed
$(COLLECTOR_STAMP):
	$(PYTHON) -m venv $(COLLECTOR_VENV)
	$(COLLECTOR_VENV)/bin/pip install --quiet --upgrade pip
	$(COLLECTOR_VENV)/bin/pip install --quiet "ddapm-test-agent==1.69.1"
	touch $(COLLECTOR_STAMP)

# The official AsyncAPI 3.0.0 JSON Schema for tests/test_asyncapi.py: the one file taken from the
# npm registry's tarball of @asyncapi/specs at a pinned version (a new pin fetches it again).
ASYNCAPI_SPECS := 6.11.1
ASYNCAPI_DIR := tests/.asyncapi
ASYNCAPI_STAMP := $(ASYNCAPI_DIR)/.specs-$(ASYNCAPI_SPECS)
ASYNCAPI_TGZ := $(ASYNCAPI_DIR)/asyncapi-specs-$(ASYNCAPI_SPECS).tgz
$(ASYNCAPI_STAMP):
	rm -rf $(ASYNCAPI_DIR) && mkdir -p $(ASYNCAPI_DIR)
	npm pack --silent --pack-destination $(ASYNCAPI_DIR) @asyncapi/specs@$(ASYNCAPI_SPECS) >/dev/null
	tar -xzf $(ASYNCAPI_TGZ) -C $(ASYNCAPI_DIR) --strip-components=2 package/schemas/3.0.0.json
	rm $(ASYNCAPI_TGZ)
	touch $(ASYNCAPI_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/orders/demo.py

lint: $(STAMP)
	$(BIN)/ruff check eventfn plugins tests examples benchmarks
	$(BIN)/ruff format --check eventfn plugins

typecheck: $(STAMP)
	$(BIN)/mypy eventfn $(patsubst %/__init__.py,%,$(foreach p,$(PLUGINS),$(wildcard $(dir $(p))eventfn_*/__init__.py)))

unit: $(STAMP) $(COLLECTOR_STAMP) $(ASYNCAPI_STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

# Peer tools (FastStream, Dramatiq, arq, SAQ, Taskiq, Celery) and matplotlib for benchmarks/:
# a venv of their own, never the core's dependencies.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
# arq pins redis<6 while taskiq-redis needs redis>=8; arq runs on redis 8 (its own deps, hiredis
# aside, are already there), so it is installed without its dependency pins.
ARQ_PIN := arq==0.28.0
$(BENCH_STAMP): benchmarks/peers/requirements.txt pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e . -e plugins/redis -e plugins/nats \
		-r benchmarks/peers/requirements.txt
	$(BENCH_VENV)/bin/pip install --quiet --no-deps $(ARQ_PIN)
	touch $(BENCH_STAMP)

.PHONY: bench-deps
bench-deps: $(BENCH_STAMP)

# The benchmark suite (benchmarks/suite.py): eventfn on every broker, the peer tools beside it,
# results in benchmarks/results/*.json, plots in benchmarks/plots/, tables in RESULTS.md.
bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/suite.py

bench-full: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/suite.py --full

clean:
	rm -rf $(VENV) $(COLLECTOR_VENV) $(BENCH_VENV) $(ASYNCAPI_DIR) .pytest_cache .mypy_cache .ruff_cache demo-data
