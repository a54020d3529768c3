# Two commands: `make demo` (the main job) and `make test` (the whole suite). Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m ddetr demo

test: $(BIN)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(BIN)/.installed-dev
	$(BIN)/python benchmarks/ms_deform_attn.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
