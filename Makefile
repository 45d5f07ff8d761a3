# Two commands on a fresh machine:  `make run`  and  `make test`.
# TORCH_SPEC picks the torch build; the default is the CPU wheel available on this machine.
# Users with a GPU: `make run TORCH_SPEC="torch>=2.4"` (or install torch first, then `make run`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# pytest-xdist workers for `make test` (each gets its share of the cores; see tests/conftest.py)
TEST_WORKERS ?= 2
STAMP := $(VENV)/.moelab-installed

.PHONY: run test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/moelab run digits-jacobs

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests

bench: $(STAMP)
	$(BIN)/moelab bench layer

clean:
	rm -rf $(VENV) build dist src/*.egg-info
