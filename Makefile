# SimMerge — every step a fresh machine needs. `make demo` then `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
# Where demo state lives (catalog database, signatures, predictor); kept out of ~/.simmerge.
DEMO_HOME ?= $(CURDIR)/.cache/demo-home
DEMO_ZOO ?= $(CURDIR)/.cache/zoo-ci-0
# Signature cache and artifacts for benchmarks and `make predictor` (the demo recreates its own home).
BENCH_HOME ?= $(CURDIR)/.cache/bench-home
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test lint format bench bench-merge bench-features bench-service bench-selection \
	bench-score-catalog labels labels-ci labels-holdout predictor clean

venv: $(STAMP)

# torch is installed first and pinned (constraints.txt) so pip takes the CPU build on disk.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,mergekit,ray]'
	touch $@

demo: venv
	$(BIN)/python -m service.demo --home $(DEMO_HOME) --zoo $(DEMO_ZOO)

test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark (each writes its own section of BENCHMARKS.md), then the slow tests.
bench: bench-merge bench-features bench-service bench-selection bench-score-catalog
	$(BIN)/pytest -q -m slow

bench-features: venv
	$(PIP) -e '.[bench]'
	$(BIN)/python -m bench.bench_features

bench-service: venv
	$(PIP) -e '.[bench]'
	$(BIN)/python -m bench.bench_service

bench-merge: venv
	$(PIP) -e '.[bench]'
	$(BIN)/python -m bench.bench_merge

# Ground truth: the full zoo and its labels (resumable: re-running skips finished plans).
LABEL_ZOO ?= $(CURDIR)/.cache/zoo-full-0
LABELS ?= $(CURDIR)/.cache/labels-full-0.parquet
LABEL_WORKERS ?= $(shell nproc)

labels: venv
	$(BIN)/simmerge zoo build $(LABEL_ZOO) --size full --seed 0 --force --no-progress
	$(BIN)/python -m bench.headroom --zoo $(LABEL_ZOO) --labels $(LABELS) --workers $(LABEL_WORKERS)

# Labelled catalogs for the selector benchmarks: the ci zoo (small, the predictor's fallback), and a
# held-out catalog: a full-size zoo built with another seed and another task subset (~15 min).
CI_ZOO ?= $(CURDIR)/.cache/zoo-ci-0
CI_LABELS ?= $(CURDIR)/.cache/labels-ci-0.parquet
HOLDOUT_ZOO ?= $(CURDIR)/.cache/zoo-full-1
HOLDOUT_LABELS ?= $(CURDIR)/.cache/labels-full-1.parquet
HOLDOUT_TASKS ?= reverse,sort,swap,dedupe,revshift

labels-ci: venv
	$(BIN)/simmerge zoo build $(CI_ZOO) --size ci --seed 0 --force --no-progress
	$(BIN)/simmerge label --zoo $(CI_ZOO) --out $(CI_LABELS) --no-progress

labels-holdout: venv
	$(BIN)/simmerge zoo build $(HOLDOUT_ZOO) --size full --seed 1 --tasks $(HOLDOUT_TASKS) --force --no-progress
	$(BIN)/simmerge label --zoo $(HOLDOUT_ZOO) --out $(HOLDOUT_LABELS) --workers $(LABEL_WORKERS) --no-progress

# Rebuild the predictor shipped in models/default (full-zoo labels when present, else the ci ones).
predictor: labels-ci
	$(BIN)/python -m models.build_default --labels $(LABELS) --labels $(CI_LABELS) --home $(BENCH_HOME)

# The selector benchmarks train on the full zoo's labels when `make labels` has made them.
TRAIN_LABELS = $(if $(wildcard $(LABELS)),$(LABELS),$(CI_LABELS))

bench-selection: labels-ci labels-holdout
	$(BIN)/python -m bench.bench_selection --labels $(TRAIN_LABELS) --holdout-labels $(HOLDOUT_LABELS) --home $(BENCH_HOME)


bench-score-catalog: venv
	$(BIN)/python -m bench.bench_score_catalog

clean:
	rm -rf .cache .pytest_cache .ruff_cache
