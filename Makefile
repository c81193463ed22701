# Two commands: `make run` (install and start on the embedded default: the Procfile's web
# and worker processes, through honcho; Ctrl-C stops both) and `make test`;
# `make demo` starts on a generated shop instead (its own database, instance/demo/);
# `make test-fast` leaves out the slow, chaos and browser tests (pytest.ini's markers);
# `make test` runs `make lint` (ruff, mypy) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: run demo test test-fast lint install install-dev clean

run: install
	PATH="$(abspath $(BIN)):$$PATH" HOST=$(HOST) $(BIN)/honcho start --port $(PORT)

demo: install
	$(BIN)/python demo/run.py --port $(PORT)

test: install-dev lint
	$(BIN)/python -m pytest

# ruff (lint and format check) over the repository, mypy over webhook/ (pyproject.toml).
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow and not chaos and not browser"

install: $(VENV)/.requirements
install-dev: $(VENV)/.requirements-dev

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.requirements: requirements.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.requirements-dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.requirements $@

clean:
	rm -rf $(VENV) instance .pytest_cache webhook/static/shop
