# Quick start:  make run   (set up, train the paper's model, evaluate on validation, write a report)
#               make test  (set up, run the test suite)
PYTHON ?= python3
VENV   ?= .venv
DATA   ?= $(or $(PNEUMOSCAN_DATA),../shared/data/chest_xray)
RUN    ?= runs/paper-$(shell date +%Y%m%d-%H%M%S)
BIN     = $(VENV)/bin

.PHONY: setup run test clean

$(BIN)/pneumoscan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/pneumoscan

run: setup
	$(BIN)/pneumoscan train --data $(DATA) --out $(RUN) --recipe paper
	@echo "report: $(RUN)/report.html"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
