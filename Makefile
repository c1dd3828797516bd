# brainsex-book: two commands.
#   make book   set up .venv, run every chapter on the embedded phantom (profile demo), build _build/html
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# This machine's torch: a CPU build that pip finds on local disk. pyproject.toml keeps a range instead,
# so Colab and Binder keep the torch they already have.
TORCH_PIN ?= torch==2.13.0
PROFILE   ?= demo
ARGS      ?=
# two workers: the book-building tests stay together on one (see tests/conftest.py), the unit tests take the other
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: all book test install browser lint bench bench-fresh clean

all: book

# constraints.txt: the exact versions the book was built and tested with, so a fresh clone computes the same numbers
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv installs the 1.7 GB of dependencies several times faster than pip (measured: benchmarks/fresh_clone.py);
	@# pip stays the fallback. uv does not read pip's configuration, so pip's find-links (where this
	@# machine keeps its CPU torch wheel) is handed over explicitly. --compile-bytecode, as pip does: where
	@# PYTHONDONTWRITEBYTECODE is set, every process (each chapter's kernel, each worker) would otherwise
	@# compile torch, monai, ... from source on import (measured: 15.8 s against 6.4 s for their imports);
	@# on both commands: uv compiles only the packages each command installs.
	if $(BIN)/python -m pip install -q uv; then \
	  fl="$${UV_FIND_LINKS:-$${PIP_FIND_LINKS:-}}"; \
	  $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $${fl:+--find-links "$$fl"} -c constraints.txt $(TORCH_PIN) && \
	  $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $${fl:+--find-links "$$fl"} -c constraints.txt -e ".[dev]"; \
	else false; fi || { \
	  echo "uv install failed; falling back to pip"; \
	  $(BIN)/python -m pip install -q -c constraints.txt $(TORCH_PIN) && $(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"; }
	touch $@

install: $(VENV)/.installed

book: install
	$(BIN)/brainsex build --profile $(PROFILE) $(ARGS)

# Debian chromium + chromedriver for the headless browser tests; the tests skip with a reason if this fails.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "chromium could not be installed: browser tests will be skipped"; \
	else echo "chromium not found and cannot be installed here: browser tests will be skipped"; fi

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# performance table (benchmarks/results/); run on an otherwise idle machine
bench: install
	$(BIN)/python -m benchmarks $(ARGS)

# wall time of `make test` and `make book` from fresh clones of HEAD (benchmarks/results/fresh_clone.md)
bench-fresh:
	$(PYTHON) -m benchmarks.fresh_clone $(ARGS)

lint: install
	$(BIN)/ruff check src tests notebooks benchmarks

clean:
	rm -rf _build runs/smoke
