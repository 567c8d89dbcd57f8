# The two-command quick start: `make demo` and `make test` (fresh machine, Python 3.10+, make).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test lint type unit bench chaos serve-example clean help

help:
	@echo "make demo   - create $(VENV), install, run 'model-loader demo'"
	@echo "make test   - create $(VENV), install with test extras, run ruff, mypy --strict and pytest"
	@echo "make bench  - run the benchmark suite (prints JSON and a table)"
	@echo "make chaos  - the long form of the resilience tests (benchmarks/chaos.py)"
	@echo "make serve-example - the FastAPI example (set MODEL_LOADER_SOURCES first)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "model_loader needs Python 3.10+; run make PYTHON=python3.X")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.demo-deps: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e ".[demo]"
	@touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e ".[all,test]"
	@touch $@

demo: $(VENV)/.demo-deps
	$(BIN)/model-loader demo

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

type: $(VENV)/.test-deps
	$(BIN)/mypy

test: lint type
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(VENV)/.test-deps
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# s3fs lives in its own venv: aiobotocore pins botocore and would downgrade boto3 in .venv
bench: $(VENV)/.test-deps
	$(PIP) install --quiet -e ".[bench]"
	test -x .venv-s3fs/bin/python || ($(PYTHON) -m venv .venv-s3fs && .venv-s3fs/bin/pip install --quiet s3fs)
	BENCH_S3FS_PYTHON=.venv-s3fs/bin/python $(BIN)/python benchmarks/run_all.py

chaos: $(VENV)/.test-deps
	$(BIN)/python benchmarks/chaos.py

serve-example: $(VENV)/.demo-deps
	$(BIN)/uvicorn --app-dir examples fastapi_app:app --host 127.0.0.1 --port $${PORT:-8000}

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
