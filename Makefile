# The README's two commands on a fresh machine: `make run` (main job) and `make test`.
# TORCH defaults to the CPU wheel these machines carry locally; on a GPU host use e.g.
#   make run TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: install
	$(BIN)/python jobs/sweep.py

test: install
	$(BIN)/python -m pytest
