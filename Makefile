# Tessera's entry points. `make demo` and `make test` work on a fresh machine: they
# create the project's virtual environment with the pinned PyTorch, then build.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
STAMP := $(VENV)/.tessera-requirements
# torch-sys finds libtorch through the Python on PATH (LIBTORCH_USE_PYTORCH=1).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
BIN := target/release/tessera
CARGO_FLAGS := --release --locked

.PHONY: setup build demo test lint ci clean

$(STAMP): python/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r python/requirements.txt
	cp python/requirements.txt $(STAMP)

setup: $(STAMP)

build: setup
	cargo build $(CARGO_FLAGS)

demo: build
	$(BIN) demo

test: build
	cargo test $(CARGO_FLAGS) --workspace

lint: setup
	cargo fmt --all --check
	cargo clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

ci: test lint

clean:
	cargo clean
	rm -rf runs
