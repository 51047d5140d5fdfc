# Two commands do everything: `make demo` runs the whole chain on a small default,
# `make test` runs the tests. Both create and fill the project-local environment .venv first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Fewer tests while working: make test PYTEST_ARGS='-m "not slow"'
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install demo test test-quick bench clean-demo

install: $(STAMP)

# torch is installed first and pinned: without a GPU that release resolves to a local CPU build,
# where an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bumblebee demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean-demo:
	rm -rf runs/demo
