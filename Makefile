# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,ray]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsecure simulate --config configs/simulation.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check fedsecure server client tests bench scripts
	$(BIN)/mypy fedsecure/privacy fedsecure/crypto fedsecure/attestation fedsecure/transport

bench: $(STAMP)
	$(BIN)/python bench/bench_round.py
	$(BIN)/python bench/bench_dp_step.py
	$(BIN)/python bench/bench_utility.py
	$(BIN)/python bench/bench_engines.py
	$(BIN)/python bench/bench_seal.py

clean:
	rm -rf $(VENV) runs .pytest_cache
