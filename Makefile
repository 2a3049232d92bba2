# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install what they need first: torch 2.13.0's CPU build from
# PyTorch's CPU index before anything else (a plain `pip install torch` from PyPI serves
# the CUDA build on Linux, several GB), then the package with its dev and docs extras
# (triton 3.6.0, numpy<2.4, ruff). On a GPU machine pick another index, e.g.
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
PYTHON      ?= python3
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

.PHONY: setup demo test lint docs serve-docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-deps --index-url $(TORCH_INDEX) torch==2.13.0  # its dependencies come from PyPI next
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
	rm -rf $(VENV) site build .pytest_cache .hypothesis
