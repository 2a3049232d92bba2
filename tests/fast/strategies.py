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
* :func:`sharing_cases`: decode batches whose requests share documents
  (shared-segment decode, ``fast/shared.py``).
"""

from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

from lazyattention.reference import RopeConfig
from lazyattention.testing.strategies import (
    Case,
    DocSpec,
    RequestSpec,
    SegmentSpec,
    kernel_cases,
    kernel_edge_cases,
    realistic_cases,
    rope_configs,
    scalings,
    starts,
)

__all__ = [
    "DEVICE",
    "REALISTIC",
    "DTYPES",
    "examples",
    "fast_cases",
    "fast_edge_cases",
    "realistic_cases",
    "sharing_cases",
]

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


@st.composite
def sharing_cases(draw, realistic: bool = REALISTIC) -> tuple[Case, int]:
    """``(case, min_requests)``: a decode batch of ``B`` requests, each reading ``k`` of
    ``n`` documents in any order at any starts (gaps, equal starts, positions past
    65,536 and near 2^20, one document placed twice by one request), documents of any
    length (partial last blocks, empty ones) and stored start; at least
    ``min_requests`` requests read document 0, so something is shared.

    Small under the interpreter (a few requests, a 16-key tile crossed often), at a
    serving size in the GPU suite (16–32 requests over 2–8 documents of up to 1500
    tokens, head dim 128)."""
    if realistic:
        docs = tuple(DocSpec(draw(st.integers(1, 1500))) for _ in range(draw(st.integers(2, 8))))
        batch = draw(st.integers(16, 32))
        block_size = draw(st.sampled_from((16, 64, 128)))
        heads = draw(st.sampled_from(((32, 8), (28, 4), (8, 1))))
        rope = RopeConfig(
            head_dim=128,
            rotary_dim=draw(st.sampled_from((128, 64))),
            base=500_000.0,
            style=draw(st.sampled_from(("neox", "interleaved"))),
            scaling=draw(scalings()),
        )
        max_k, own_max = 4, 300
    else:
        stored = st.one_of(st.just(0), starts())
        docs = tuple(
            DocSpec(draw(st.integers(1 if i == 0 else 0, 40)), draw(stored)) for i in range(draw(st.integers(1, 3)))
        )
        batch = draw(st.integers(2, 5))
        block_size = draw(st.sampled_from((1, 3, 4, 5, 16, 20, 32)))
        kv = draw(st.integers(1, 2))
        heads = (kv * draw(st.sampled_from((1, 2, 4, 8))), kv)
        rope = draw(rope_configs())
        max_k, own_max = 4, 6
    min_requests = draw(st.integers(1, min(batch, 4)))
    start = starts()
    requests = []
    for r in range(batch):
        chosen = draw(st.lists(st.integers(0, len(docs) - 1), max_size=max_k))
        if r < min_requests and 0 not in chosen:
            chosen.insert(draw(st.integers(0, len(chosen))), 0)
        segments: list[SegmentSpec] = []
        for doc in chosen:
            if segments and draw(st.booleans()):
                s = draw(st.sampled_from([seg.start for seg in segments]))  # overlap: equal starts
            else:
                s = draw(start)
            segments.append(SegmentSpec(doc, s))
        own = draw(st.integers(1, own_max))
        own_start = draw(start)
        requests.append(RequestSpec(tuple(segments), own, own_start, own_start, 1))
    case = Case(docs, tuple(requests), block_size, heads[0], heads[1], rope, seed=draw(st.integers(0, 2**32 - 1)))
    return case, min_requests
