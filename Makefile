# fastfp8: `make demo` and `make test` set everything up on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-installed
PYTHON3 ?= python3
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)

.PHONY: setup build demo test test-rust test-python test-vllm lint fmt wheel clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

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

# vLLM pins its own torch/transformers/compressed-tensors, hence a venv of its own
# (~3 min and ~9.4 GB the first time); this checkout is installed into it editable.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.deps-installed

$(VLLM_STAMP):
	$(PYTHON3) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm==0.33.0 pytest
	touch $@

test-vllm: build $(VLLM_STAMP)
	VIRTUAL_ENV=$(abspath $(VLLM_VENV)) $(VENV)/bin/maturin develop --release -q
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check python tests benches

fmt: $(STAMP)
	cargo fmt --all
	$(VENV)/bin/ruff check --fix python tests benches

# The abi3 wheel (one wheel for CPython 3.10+), e.g. to carry to the GPU machine.
wheel: $(STAMP)
	$(VENV)/bin/maturin build --release -q --out .wheels

clean:
	cargo clean
	rm -rf $(VENV) $(VLLM_VENV) .wheels .demo
