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

.PHONY: setup build demo test lint ci clean fuzz nettools browser datasets

$(STAMP): python/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r python/requirements.txt
	cp python/requirements.txt $(STAMP)

setup: $(STAMP)

build: setup
	cargo build $(CARGO_FLAGS)

demo: build
	$(BIN) demo

# The experiments' prepared data sets (docs/results.md, data/README.md), each prepared
# once: runs/data/tinyshakespeare and runs/data/brown. For example
# `tessera experiment sweep --data runs/data/brown --out runs/brown-sweep.jsonl`.
datasets: runs/data/tinyshakespeare/manifest.json runs/data/brown/manifest.json

runs/data/%/manifest.json: data/%.txt | build
	$(BIN) data prepare --input $< --out $(@D)

# The emulated-internet test (crates/tessera/tests/internet.rs) builds network
# namespaces with iproute2 and nftables; as root, install them if missing.
nettools:
	@if ! command -v nft >/dev/null || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing iproute2 and nftables for the emulated-internet test"; \
	    apt-get install -y -qq iproute2 nftables >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq iproute2 nftables >/dev/null; }; \
	  else \
	    echo "make: iproute2/nftables missing and not installable here: the emulated-internet test will say so"; \
	  fi; \
	fi

# The dashboard's browser test (crates/tessera/tests/dashboard.rs) drives Debian's
# Chromium; as root, install it if missing (under CI=true the test fails without it).
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the dashboard's browser test"; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null; }; \
	  else \
	    echo "make: chromium missing and not installable here: the browser test will say so"; \
	  fi; \
	fi

test: build nettools browser
	cargo test $(CARGO_FLAGS) --workspace

lint: setup
	cargo fmt --all --check
	cargo clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

ci: test lint

# Fuzzing (fuzz/): every decoder of untrusted bytes, one target after another, each for
# FUZZ_SECONDS or FUZZ_RUNS executions, whichever comes first (FUZZ_TARGETS: a subset).
# Needs a nightly toolchain; not part of `make test`. See fuzz/README.md.
FUZZ_SECONDS ?= 60
FUZZ_RUNS ?= -1
FUZZ_TARGETS ?=

fuzz:
	@rustup run nightly rustc --version >/dev/null 2>&1 || \
		{ echo "make fuzz needs a nightly toolchain: rustup toolchain install nightly"; exit 1; }
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_RUNS=$(FUZZ_RUNS) fuzz/run.sh $(FUZZ_TARGETS)

clean:
	cargo clean
	rm -rf runs
