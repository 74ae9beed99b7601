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
PYTEST_ARGS ?= --durations=30
# Test paths for `make test` (default: the whole suite), e.g. TESTS=tests/test_cli.py.
TESTS ?= tests
# The minimum-versions run (`make test-min`, Python 3.11): a named subset that goes
# through every compatibility path: each shim of titanax/_compat.py (test_compat),
# the version table (test_versions), checkpoints resumed across the two
# environments (test_cross_versions), meshes, tx.spmd and the collectives (vma
# types), XLA's collectives in the HLO (Shardy: Megatron's all-reduces, one DP
# reduction), the DP=2 x TP=4 GPT parity against one device, the pipeline schedules
# (shard_map, compiled memory), context parallelism (ring attention's ppermute),
# FLOP counts (jaxpr equations, cost analysis), Orbax checkpoints, the Trainer's
# fit basics, `titanax explain`/`info`, and two processes
# over jax.distributed (heartbeat, preemption sync point).
# Measured on the 2-core development machine, shared (load average 3-4): creating
# .venv-min (venv, pip install -r ci/min-versions.txt from a local package mirror,
# Titanax editable, pip check) 93 s; these tests 223 s (262 passed; the two
# cross-version checkpoint runs take 58 s of it). At load 5-7 the tests took 6.5 min
# with more in the list. The newest versions' whole suite (`make test`) takes ~18 min.
PYTHON_MIN ?= $(PYTHON)
VENV_MIN := .venv-min
BIN_MIN := $(VENV_MIN)/bin
TESTS_MIN ?= \
	tests/test_compat.py \
	tests/test_versions.py \
	tests/test_cross_versions.py \
	tests/test_mesh.py \
	tests/test_spmd.py \
	tests/test_collectives.py \
	tests/test_hlo.py \
	tests/test_flops.py \
	tests/test_gpt_parallel.py::test_reference_is_the_loss_gradient \
	'tests/test_gpt_parallel.py::test_loss_and_every_gradient_match_one_device[2-4]' \
	tests/test_gpt_parallel.py::test_trainer_adamw_steps_match_one_device \
	tests/test_gpt_parallel.py::test_tp4_megatron_all_reduces_per_block \
	tests/test_gpt_parallel.py::test_dp_tp_gradients_reduced_over_data_once \
	'tests/test_pipeline.py::test_toy_parity[2-4-gpipe]' \
	'tests/test_pipeline.py::test_toy_parity[4-8-1f1b]' \
	tests/test_pipeline.py::test_dp_x_pp_parity \
	tests/test_pipeline.py::test_hlo_boundary_permutes_and_one_dp_reduction \
	tests/test_pipeline.py::test_remat_policies_keep_gradients_and_cut_gpipe_memory \
	'tests/test_cp.py::test_parity_with_one_device[gpt]' \
	tests/test_checkpoint.py \
	--deselect tests/test_checkpoint.py::test_abstract_state_matches_init \
	--deselect tests/test_checkpoint.py::test_round_trip_bf16_and_partial_freezing \
	tests/test_trainer.py::test_parity_with_a_single_device_loop \
	tests/test_trainer.py::test_fit_compiles_only_the_first_step \
	tests/test_trainer.py::test_steps_is_a_total \
	tests/test_trainer.py::test_evaluate_matches_the_loss_without_an_update \
	tests/test_trainer.py::test_loggers_get_totals_start_up_events_and_the_compile_time_once \
	tests/test_trainer.py::test_mfu_uses_the_step_flops_against_the_given_peak \
	tests/test_cli.py::test_explain_memory_matches_the_placed_arrays \
	tests/test_cli.py::test_info \
	'tests/test_checkpoint_multiprocess.py::test_sigterm_to_one_process_stops_both_at_the_same_saved_step[loop]'
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
