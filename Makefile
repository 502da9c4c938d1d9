# One-line targets; every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck pytest bench bench-admission bench-scale bench-queue bench-engine openapi clean

run: $(VENV)/.installed
	$(BIN)/dreamserve serve

test: $(VENV)/.installed-test lint typecheck pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench && $(BIN)/ruff format --check src tests bench && $(BIN)/lint-imports --no-logo

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# Four workers: on two cores they overlap the tests' waits on servers, sockets and databases.
# Branch coverage of src/dreamserve, the black-box servers included ([tool.coverage] in
# pyproject.toml); `.venv/bin/pytest tests/...` runs without it.
pytest: $(VENV)/.installed-test
	$(BIN)/pytest -n 4 --cov --cov-report=term-missing:skip-covered

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/api.py

bench-admission: $(VENV)/.installed-bench
	$(BIN)/python bench/admission.py

bench-scale: $(VENV)/.installed-bench
	$(BIN)/python bench/scale.py

bench-queue: $(VENV)/.installed-bench
	$(BIN)/python bench/queued.py

bench-engine: $(VENV)/.installed-bench
	$(BIN)/python bench/engine.py

openapi: $(VENV)/.installed
	$(BIN)/dreamserve openapi > openapi.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .coverage .coverage.*

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[server]' && touch $@

$(VENV)/.installed-bench: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]' && touch $@ $(VENV)/.installed-test $(VENV)/.installed

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]' && touch $@ $(VENV)/.installed
