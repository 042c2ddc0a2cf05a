# fastfp8: `make demo` and `make test` set everything up on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-installed
PYTHON3 ?= python3
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
# pip keeps no second copy of every wheel it installs: a CI machine's disk is not ours to fill
# (torch and vLLM's CUDA wheels are gigabytes).
export PIP_NO_CACHE_DIR := 1

.PHONY: setup build demo test test-rust test-python test-vllm test-latest lint lock lock-vllm fmt wheel clean

setup: $(STAMP)

# The versions the tests last passed with (requirements-dev.lock), not whatever is newest
# today: a new torch, transformers or ruff release cannot break a clean checkout.
$(STAMP): requirements-dev.txt requirements-dev.lock
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -c requirements-dev.lock
	touch $@

# Pins what .venv has now (after a `pip install -U` that passed `make test`) into the lock.
# Needs uv (pip install uv).
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^fastfp8' > .lock-constraints.tmp
	uv pip compile requirements-dev.txt -c .lock-constraints.tmp --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --annotation-style line -o .lock.tmp
	sed -i 's/, -c .lock-constraints.tmp//; s/-c .lock-constraints.tmp, //; s/  # via -c .lock-constraints.tmp$$//' .lock.tmp
	{ grep '^#' requirements-dev.lock; cat .lock.tmp; } > .lock.new
	mv .lock.new requirements-dev.lock
	rm -f .lock-constraints.tmp .lock.tmp

# Builds the Rust extension (release) into the venv as an editable install.
build: $(STAMP)
	$(VENV)/bin/maturin develop --release -q

demo: build
	$(PY) -m fastfp8.demo

test: build test-rust test-python test-vllm

test-rust:
	cargo test --workspace -q

test-python: build
	$(PY) -m pytest -q

# vLLM pins its own torch/transformers/compressed-tensors, hence a venv of its own; this
# checkout is installed into it editable. uv installs it (~2 min): its files are hard links
# into a cache inside the venv, dropped afterwards, so the venv's ~9.5 GB is all it takes.
# A machine with less free disk than VLLM_MIN_FREE_GB skips the vLLM suite, saying so loudly
# (FASTFP8_REQUIRE_VLLM=1 makes that an error) instead of failing halfway through an install.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.deps-installed
VLLM_MIN_FREE_GB ?= 12
VLLM_UV    := UV_CACHE_DIR=$(VLLM_VENV)/.uv-cache UV_LINK_MODE=hardlink $(VENV)/bin/uv

$(VLLM_STAMP): requirements-vllm.lock | $(STAMP)
	$(PYTHON3) -m venv $(VLLM_VENV)
	$(VLLM_UV) pip install -q --python $(VLLM_VENV)/bin/python -r requirements-vllm.lock
	$(VLLM_UV) cache clean -q
	touch $@

# The vLLM venv's pins, from requirements-vllm.in (its pytest kept equal to the dev lock's).
lock-vllm: $(STAMP)
	grep -oE '^pytest==[^ ]+' requirements-dev.lock > .lock-vllm-pytest.tmp
	$(VENV)/bin/uv pip compile requirements-vllm.in -c .lock-vllm-pytest.tmp --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --annotation-style line -o requirements-vllm.lock
	sed -i 's/-c .lock-vllm-pytest.tmp, //; s/, -c .lock-vllm-pytest.tmp//' requirements-vllm.lock
	rm -f .lock-vllm-pytest.tmp

test-vllm: build
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ ! -f $(VLLM_STAMP) ] && [ "$$free" -lt $(VLLM_MIN_FREE_GB) ]; then \
		echo "*** SKIPPED: the vLLM suite (tests/vllm): its venv needs ~$(VLLM_MIN_FREE_GB) GB free, this disk has $$free GB ***"; \
		if [ "$${FASTFP8_REQUIRE_VLLM:-0}" = 1 ]; then exit 1; fi; \
	else \
		$(MAKE) --no-print-directory vllm-suite; \
	fi

.PHONY: vllm-suite
vllm-suite: $(VLLM_STAMP)
	VIRTUAL_ENV=$(abspath $(VLLM_VENV)) $(VENV)/bin/maturin develop --release -q
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	@# the native module's stub, once it exists, against the built module (needs `make build`)
	if [ -f python/fastfp8/_native.pyi ]; then $(PY) -m mypy.stubtest fastfp8._native; fi

# The newest release of every dependency, on purpose (the lock is ignored): what the next
# `make lock` would pin. A separate venv, so that .venv keeps the tested versions.
LATEST_VENV ?= .venv-latest

test-latest:
	$(PYTHON3) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -r requirements-dev.txt
	VIRTUAL_ENV=$(abspath $(LATEST_VENV)) $(LATEST_VENV)/bin/maturin develop --release -q
	$(LATEST_VENV)/bin/ruff check python tests benches
	$(LATEST_VENV)/bin/python -m pytest -q
	$(LATEST_VENV)/bin/pip freeze --exclude-editable

fmt: $(STAMP)
	cargo fmt --all
	$(VENV)/bin/ruff check --fix python tests benches

# The abi3 wheel (one wheel for CPython 3.10+), e.g. to carry to the GPU machine.
wheel: $(STAMP)
	$(VENV)/bin/maturin build --release -q --out .wheels

clean:
	cargo clean
	rm -rf $(VENV) $(VLLM_VENV) $(LATEST_VENV) .wheels .demo
