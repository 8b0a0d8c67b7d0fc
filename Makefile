# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install bench bench-big clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/orders/demo.py

lint: $(STAMP)
	$(BIN)/ruff check eventfn tests examples benchmarks
	$(BIN)/ruff format --check eventfn

typecheck: $(STAMP)
	$(BIN)/mypy eventfn

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/burst.py --write

bench-big: $(STAMP)
	$(BIN)/python benchmarks/burst.py --big --write

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-data
