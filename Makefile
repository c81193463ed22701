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
# pytest-xdist: test processes (auto: one a core); each test file runs whole in one of
# them (its module fixtures, e.g. the demo's instance/demo/, are set up once).
TEST_WORKERS ?= auto

.PHONY: run demo test test-fast lint mutation install install-dev clean

run: install
	PATH="$(abspath $(BIN)):$$PATH" HOST=$(HOST) $(BIN)/honcho start --port $(PORT)

demo: install
	$(BIN)/python demo/run.py --port $(PORT)

test: install-dev lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# ruff (lint and format check) over the repository, mypy over webhook/ (pyproject.toml).
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-fast: install-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not chaos and not browser"

# Mutation testing (mutmut; pyproject.toml's [tool.mutmut] says which files and tests):
# signature, segment, routing and tokens whole, and recommend.py's consent and exclusion
# steps. Results stay in mutants/ (`$(BIN)/mutmut show <name>`); docs/mutation.md lists
# the survivors. MUTATION_JOBS: mutants tested at once.
MUTATION_JOBS ?= 2
MUTATED := "webhook.signature.*" "webhook.segment.*" "webhook.routing.*" "webhook.tokens.*" \
	"webhook.recommend.*_answer__mutmut_*" "webhook.recommend.*_profile_and_ask__mutmut_*" \
	"webhook.recommend.*_apply__mutmut_*" "webhook.recommend.*_popular__mutmut_*" \
	"webhook.recommend.*may_write_back__mutmut_*"

mutation: install-dev
	$(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTATED)
	@$(BIN)/mutmut results --all true | awk -F': ' '$$2 != "not checked" { \
		split($$1, part, "."); module = part[2]; total[module]++; \
		if ($$2 == "killed") killed[module]++; } \
		END { for (m in total) printf "%-10s %4d/%-4d killed (%.1f %%)\n", m, killed[m], total[m], \
		100 * killed[m] / total[m] }'

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
