"""Fixtures of the fast-path tests.

* Without a CUDA device the kernels run under the Triton interpreter: this sets
  ``TRITON_INTERPRET=1`` before anything here imports Triton (the interpreter is chosen
  when ``triton`` is imported).
* ``LAZYATTN_GPU_SUITE=1`` (with CUDA) switches the strategies to realistic shapes:
  head dim 128, thousands of tokens, batch 16+ (``scripts/gpu_suite.sh`` sets it).
* Every kernel output is poisoned: :func:`lazyattention.fast.buffers.empty` is replaced
  by an allocator that fills with NaN, so an element a kernel forgot to write shows up
  as an infinite error.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from lazyattention.fast import buffers


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Fill every buffer the fast path allocates with NaN before the kernels run."""
    monkeypatch.setattr(buffers, "empty", _nan_empty)
