# Quick start:  make run   (set up, train the paper's model, evaluate on validation, write a report)
#               make test  (set up, run the test suite)
# Both find the data set through PNEUMOSCAN_DATA, or DATA=/path/to/chest_xray on the command line.
PYTHON ?= python3
VENV   ?= .venv
DATA   ?= $(PNEUMOSCAN_DATA)
RUN    ?= runs/paper-$(shell date +%Y%m%d-%H%M%S)
BIN     = $(VENV)/bin
# `run` installs the package alone; `test` adds every optional extra and the test tools. Each stamp
# records what was installed, so `make run` after `make test` installs nothing more.
RUN_STAMP  = $(VENV)/.installed-run
TEST_STAMP = $(VENV)/.installed-test

.PHONY: setup setup-test run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[models]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(RUN_STAMP)

setup: $(RUN_STAMP)

setup-test: $(TEST_STAMP)

run: setup
	@test -n "$(DATA)" || { echo "make run: set PNEUMOSCAN_DATA=/path/to/chest_xray or run make run DATA=/path/to/chest_xray" >&2; exit 2; }
	$(BIN)/pneumoscan train --data "$(DATA)" --out $(RUN) --recipe paper
	@echo "report: $(RUN)/report.html"

# -rs: say why each skipped test skipped. DATA, when given, is the data set the tests read.
test: setup-test
	$(if $(DATA),PNEUMOSCAN_DATA="$(DATA)") $(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) .pytest_cache
