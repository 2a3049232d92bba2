"""Strategies and helpers of the fast-path tests, on top of ``tests/strategies.py``.

The structure of a case (:class:`tests.strategies.Case`) and the way tensors are built
from it (:func:`tests.strategies.build`) are shared with the reference tests, so both
suites draw the same layouts. This module adds what only the fast path needs:

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

from lazyattention.reference import RopeConfig
from tests.strategies import Case, DocSpec, RequestSpec, SegmentSpec, cases, scalings

__all__ = ["DEVICE", "REALISTIC", "DTYPES", "examples", "fast_cases", "fast_edge_cases", "realistic_cases"]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: Realistic shapes: only compiled, only when asked for (the GPU suite).
REALISTIC = DEVICE.type == "cuda" and os.environ.get("LAZYATTN_GPU_SUITE") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def examples(interpreted: int, compiled: int) -> int:
    """Examples per test: few under the interpreter (CPU time), more when compiled."""
    return compiled if DEVICE.type == "cuda" else interpreted


@st.composite
def realistic_cases(draw, decode: bool = False) -> Case:
    """A serving-sized batch: 16–20 requests over 4–8 shared documents of 100–1500
    tokens, placed packed, reordered, gapped or past 65,536; own tokens 16–300; head dim
    128 with 32 query heads over 8 KV heads (or a group of 7 over 4); block sizes that
    give both the one-shift and the straddling key tiles."""
    docs = tuple(DocSpec(draw(st.integers(100, 1500))) for _ in range(draw(st.integers(4, 8))))
    requests = []
    for _ in range(draw(st.integers(16, 20))):
        chosen = draw(st.lists(st.integers(0, len(docs) - 1), min_size=1, max_size=4))
        packed = draw(st.booleans())
        position = draw(st.sampled_from((0, 70_000, 2**20 - 5000)))
        segments = []
        for doc in chosen:
            segments.append(SegmentSpec(doc, position))
            gap = 0 if packed else draw(st.integers(0, 50))
            position += docs[doc].length + gap
        if not packed:
            segments.reverse()  # placed out of order
        own = draw(st.integers(16, 300))
        requests.append(
            RequestSpec(tuple(segments), own, position, position, 1 if decode else draw(st.integers(1, own)))
        )
    heads = draw(st.sampled_from(((32, 8), (28, 4))))
    rope = RopeConfig(
        head_dim=128,
        rotary_dim=draw(st.sampled_from((128, 64))),
        base=500_000.0,
        style=draw(st.sampled_from(("neox", "interleaved"))),
        scaling=draw(scalings()),
    )
    return Case(
        docs,
        tuple(requests),
        draw(st.sampled_from((16, 64, 128))),
        heads[0],
        heads[1],
        rope,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def fast_cases(decode: bool = False) -> st.SearchStrategy[Case]:
    """Realistic cases in the GPU suite, the shared small cases otherwise."""
    if REALISTIC:
        return realistic_cases(decode=decode)
    return cases(decode=decode, block_sizes=(1, 3, 4, 5, 16, 20, 32), max_doc_length=24)


def fast_edge_cases() -> dict[str, Case]:
    """Named edges for the kernels, each with one query per request (decode-valid)."""

    def one(docs, segs, own_length, own_start, block_size, heads, rope, own_stored=None):
        stored = own_start if own_stored is None else own_stored
        req = RequestSpec(tuple(SegmentSpec(d, s) for d, s in segs), own_length, own_start, stored, 1)
        return Case(tuple(docs), (req,), block_size, heads[0], heads[1], rope, seed=1)

    near_max = 2**31 - 100
    return {
        # G = 3: the group is padded to 4 rows per token and the padding masked.
        "gqa_3": one([DocSpec(9)], [(0, 4)], 5, 20, 4, (6, 2), RopeConfig(head_dim=96)),
        # Keys stored near 2^31 and placed at 0: p − δ overflows int32.
        "shift_past_int32": one(
            [DocSpec(6, stored_start=near_max)], [(0, 0)], 3, 10, 4, (2, 1), RopeConfig(head_dim=64)
        ),
        # A block larger than the key tile: several tiles of one block, one shift.
        "block_larger_than_tile": one(
            [DocSpec(37), DocSpec(5)],
            [(1, 100), (0, 3)],
            4,
            140,
            40,
            (4, 2),
            RopeConfig(head_dim=80, rotary_dim=32, style="interleaved"),
        ),
        "head_dim_256": one([DocSpec(7)], [(0, 65_540)], 2, 65_600, 3, (4, 1), RopeConfig(head_dim=256)),
    }
