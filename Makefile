# Titanax developer commands. Two of them are all a fresh clone needs:
#
#   make demo    create .venv if missing, install, run the demo
#   make test    create .venv if missing, install with the dev extras, run the tests
#
# Everything runs inside .venv; nothing is installed outside it. `make test-min` runs
# the tests again in a second environment, .venv-min, with the oldest supported
# versions (every package pinned in ci/min-versions.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The demo: a CNN on digits (data parallel, seconds), then a GPT with DP x TP (a minute).
DEMO ?= examples/mnist_dp/train.py --model cnn && $(BIN)/python examples/gpt/train.py --dp 2 --tp 4 --steps 600
PYTEST_ARGS ?=
# Test paths for `make test` (default: the whole suite), e.g. TESTS=tests/test_cli.py.
TESTS ?= tests
# The minimum-versions run (`make test-min`): the tests whose code paths differ
# between the supported versions (see TESTS_MIN below), on Python 3.11.
PYTHON_MIN ?= $(PYTHON)
VENV_MIN := .venv-min
BIN_MIN := $(VENV_MIN)/bin
TESTS_MIN ?= tests
BENCH ?= benchmarks/overhead.py benchmarks/gpt.py benchmarks/checkpoint.py benchmarks/pipeline.py
LINT_PATHS := $(wildcard titanax models examples tests benchmarks tools)

.DEFAULT_GOAL := help

.PHONY: help venv .venv install dev demo test venv-min test-min lint format typecheck \
        docs docs-serve bench pre-commit clean distclean

help:  ## List the targets.
	@grep -E '^[a-zA-Z_. -]+:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

# --- the virtual environment ---------------------------------------------------------

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "Titanax needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." \
		     "Run e.g. 'make PYTHON=python3.12 ...'."; exit 1; }
	$(PYTHON) -m venv $(VENV) || { \
		echo "Could not create $(VENV); on Debian/Ubuntu install python3-venv."; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip

venv .venv: $(BIN)/python  ## Create .venv if it is missing.

# Install stamps: each re-runs when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	@touch $@

$(VENV)/.installed-examples: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[examples]"
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev]"
	@touch $@

$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[docs]"
	@touch $@

install: $(VENV)/.installed  ## Install Titanax (editable) into .venv.

dev: $(VENV)/.installed-dev  ## Install Titanax with the dev extras.

# --- the two commands of the Quickstart ------------------------------------------------

demo: $(VENV)/.installed-examples  ## Run the demo script (DEMO=path.py for another).
	$(BIN)/python $(DEMO)

test: $(VENV)/.installed-dev  ## Run the tests (TESTS=tests/test_x.py ..., PYTEST_ARGS=...).
	$(BIN)/python -m pytest -q $(TESTS) $(PYTEST_ARGS)

# --- the minimum supported versions ------------------------------------------------

# The pins are wheels for CPython 3.11 (PyYAML 6.0 has none for 3.12).
$(BIN_MIN)/python:
	@$(PYTHON_MIN) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
		echo "$(VENV_MIN) is pinned for Python 3.11; '$(PYTHON_MIN)' is" \
		     "$$($(PYTHON_MIN) --version 2>&1). Run e.g. 'make PYTHON_MIN=python3.11 ...'."; \
		exit 1; }
	$(PYTHON_MIN) -m venv $(VENV_MIN) || { \
		echo "Could not create $(VENV_MIN); on Debian/Ubuntu install python3-venv."; exit 1; }

# Exactly the pinned set, then Titanax itself (editable, no dependencies); pip check
# fails if pyproject.toml's bounds and the pins disagree.
$(VENV_MIN)/.installed: pyproject.toml ci/min-versions.txt | $(BIN_MIN)/python
	$(BIN_MIN)/pip install -r ci/min-versions.txt
	$(BIN_MIN)/pip install --no-deps -e .
	$(BIN_MIN)/pip check
	@touch $@

venv-min: $(VENV_MIN)/.installed  ## Create .venv-min: the tested minimum versions.

# Needs .venv too: tests/test_cross_versions.py resumes checkpoints across the two.
test-min: $(VENV_MIN)/.installed $(VENV)/.installed-dev  ## Run TESTS_MIN on the minimum versions.
	$(BIN_MIN)/python -m pytest -q $(TESTS_MIN) $(PYTEST_ARGS)

# --- checks --------------------------------------------------------------------------

lint: $(VENV)/.installed-dev  ## ruff check and ruff format --check.
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(VENV)/.installed-dev  ## Apply ruff's fixes and formatting.
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

typecheck: $(VENV)/.installed-dev  ## pyright.
	$(BIN)/pyright

pre-commit: $(VENV)/.installed-dev  ## Install the git pre-commit hooks.
	$(BIN)/pre-commit install

docs: $(VENV)/.installed-docs  ## Build the docs into site/ (strict: warnings fail).
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.installed-docs  ## Serve the docs locally with live reload.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(VENV)/.installed-dev  ## Run the benchmarks (or BENCH=path.py).
	@set -e; for script in $(BENCH); do \
		echo "== $$script"; $(BIN)/python $$script; done

# --- cleaning ------------------------------------------------------------------------

clean:  ## Remove build outputs and caches (keeps .venv).
	rm -rf build dist site *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . \( -path ./$(VENV) -o -path ./$(VENV_MIN) \) -prune -o -name __pycache__ \
		-type d -exec rm -rf {} +

distclean: clean  ## Also remove .venv and .venv-min.
	rm -rf $(VENV) $(VENV_MIN)
