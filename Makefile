# Two entry points (README): `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_RECIPE ?= recipes/digits_demo.yaml

.PHONY: setup demo baseline test lint clean

$(BIN)/compress: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/compress

# The demo baseline: digits_cnn trained on scikit-learn's digits (seconds on 2 cores).
runs/digits-base/model.pt: $(BIN)/compress recipes/digits_baseline.yaml
	$(BIN)/compress run recipes/digits_baseline.yaml --out runs/digits-base --overwrite

baseline: runs/digits-base/model.pt

demo: runs/digits-base/model.pt
	$(BIN)/compress run $(DEMO_RECIPE) --out runs/demo --overwrite
	@echo "report: runs/demo/report.md"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check compress tests benchmarks

clean:
	rm -rf runs .pytest_cache
