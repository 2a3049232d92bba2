# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install what they need first (torch 2.13.0 CPU build before
# anything else, so pip never pulls a multi-GB CUDA build; triton 3.6.0; numpy<2.4).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint docs serve-docs bench gpu-suite clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lazyattention demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

serve-docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
