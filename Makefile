# Two commands: `make run` and `make test`. Both create or reuse .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
TF_EXTRA ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.gradlab-installed
CONFIG ?= configs/default.yaml
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test install bench reproduce clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(TF_EXTRA),plot,test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gradlab run $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

reproduce: $(STAMP)
	$(BIN)/python scripts/reproduce_seed.py

clean:
	rm -rf $(VENV) runs
