"""Strategies and helpers of the fast-path tests, on top of ``lazyattention.testing``.

The structure of a case (:class:`~lazyattention.testing.strategies.Case`), the way
tensors are built from it, the realistic cases and the kernels' edges live in the
package (``lazyattention check`` uses them too). This module adds the test suite's
choices:

* :data:`DEVICE` and :data:`REALISTIC`: CUDA when there is one (compiled kernels), the
  CPU under the Triton interpreter otherwise; ``LAZYATTN_GPU_SUITE=1`` on a GPU selects
  realistic shapes (:func:`realistic_cases`).
* :func:`fast_cases`: the shared small cases under the interpreter, realistic ones in
  the GPU suite.
* :func:`fast_edge_cases`: edges beyond the shared ones that only a kernel can get wrong
  (a non-power-of-two GQA group, ``p − δ`` past the int32 range, a block larger than a
  key tile, head dim 256).
* :func:`examples`: how many Hypothesis examples a test may take here.
"""

from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

from lazyattention.testing.strategies import Case, kernel_cases, kernel_edge_cases, realistic_cases

__all__ = ["DEVICE", "REALISTIC", "DTYPES", "examples", "fast_cases", "fast_edge_cases", "realistic_cases"]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: Realistic shapes: only compiled, only when asked for (the GPU suite).
REALISTIC = DEVICE.type == "cuda" and os.environ.get("LAZYATTN_GPU_SUITE") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def examples(interpreted: int, compiled: int) -> int:
    """Examples per test: few under the interpreter (CPU time), more when compiled."""
    return compiled if DEVICE.type == "cuda" else interpreted


def fast_cases(decode: bool = False) -> st.SearchStrategy[Case]:
    """Realistic cases in the GPU suite, the shared small cases otherwise."""
    return kernel_cases(decode=decode, realistic=REALISTIC)


def fast_edge_cases() -> dict[str, Case]:
    """Named edges for the kernels (:func:`lazyattention.testing.strategies.kernel_edge_cases`)."""
    return kernel_edge_cases()
