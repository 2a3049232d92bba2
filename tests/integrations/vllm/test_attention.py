"""The backend's step computation without vLLM: the plan's layouts over vLLM's packed cache.

vLLM hands the backend q and k rotated at their sequence positions; the plan stores
documents at their local positions and places them at logical ones. These tests feed
:func:`paged_attention` exactly that and compare with the definition computed directly
in float64: every document token attends its own document causally at local
positions, every own token attends every placed document and its own tokens causally
at logical positions. Steps are split where vLLM's chunked prefill may split them
(inside a document, at the prompt's first token) and end with a decode step.

The cache is vLLM 0.32's per-layer tensor, logical ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]`` with K and V packed, in three of its physical layouts.
No vLLM here: this module runs in the main suite too, with ``lazyattention.fast``
under the Triton interpreter, which is how the GPU backend's kernels are checked on
a CPU (the GPU backend itself cannot run in this workplace); on a machine with CUDA
the same case runs the compiled kernels on the GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from lazyattention import reference, sdpa
from lazyattention.integrations.vllm.attention import build_metadata, paged_attention
from lazyattention.integrations.vllm.plan import LaidDocument, RequestPlan, Segment
from lazyattention.reference import RopeConfig, apply_rope, assert_close

S, H, HKV, D = 16, 4, 2, 32
ROPE = RopeConfig(head_dim=D)

# Documents of 20 and 45 tokens laid at 0 and 32 (padded to blocks), the prompt from 80;
# placed reordered and apart: the second document first, the first at 300, and the
# first once more overlapping the second.
PLAN = RequestPlan(
    documents=(LaidDocument("x", 20, 0), LaidDocument("y", 45, 32)),
    segments=(Segment(1, 0), Segment(0, 300), Segment(0, 10)),
    own_vllm_start=80,
    own_start=400,
    block_size=S,
)
PROMPT = 9
TOTAL = PLAN.own_vllm_start + PROMPT + 1  # prompt, then one decoded token


def _kernels(name: str):
    if name == "reference":
        return reference
    if name == "sdpa":
        return sdpa
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("lazyattention.fast on CPU needs TRITON_INTERPRET=1 before Triton is imported")
    import lazyattention.fast

    return lazyattention.fast


def _tokens(seed: int):
    """Pre-RoPE q, k, v of the whole sequence (pads included), float64."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(TOTAL, h, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV)]


def _definition(q, k, v, t: int) -> torch.Tensor:
    """Output of sequence token ``t`` by the definition (float64, eq. 7 and 11)."""
    scale = 1 / math.sqrt(D)
    if t < PLAN.own_vllm_start:  # a document token: its document alone, local positions
        a = _document_at(t).vllm_start
        idx = torch.arange(a, t + 1)
        qp, kp = torch.tensor([t - a]), idx - a
    else:
        parts, pos = [], []
        for s in PLAN.segments:
            doc = PLAN.documents[s.doc]
            parts.append(torch.arange(doc.vllm_start, doc.vllm_start + doc.length))
            pos.append(torch.arange(doc.length) + s.start)
        own = torch.arange(PLAN.own_vllm_start, t + 1)
        parts.append(own)
        pos.append(own - PLAN.own_vllm_start + PLAN.own_start)
        idx, kp = torch.cat(parts), torch.cat(pos)
        qp = torch.tensor([t - PLAN.own_vllm_start + PLAN.own_start])
    qr = apply_rope(q[t : t + 1], qp, ROPE)  # [1, H, D]
    kr = apply_rope(k[idx], kp, ROPE).repeat_interleave(H // HKV, dim=1)  # [K, H, D]
    vv = v[idx].repeat_interleave(H // HKV, dim=1)
    w = torch.softmax(torch.einsum("qhd,khd->hqk", qr, kr) * scale, dim=-1)
    return torch.einsum("hqk,khd->qhd", w, vv)[0]


# Step ends: all at once then a decode; split inside a document and at the prompt; split in the prompt.
SPLITS = [(89, 90), (40, 80, 89, 90), (80, 84, 89, 90)]


def _kv_cache(layout: str, num_blocks: int, dtype, device) -> torch.Tensor:
    """vLLM's logical per-layer cache ``[N, Hkv, S, 2D]`` (K and V packed), NaN-filled,
    in one of vLLM's physical layouts: ``LBNHC`` (vLLM's default), ``LBHNC`` (the packed
    ``(num_blocks, num_kv_heads, block_size, 2 * head_size)`` stored as it reads), and
    ``BLHNC`` (blocks outermost, a second layer between one block and the next)."""
    nan = float("nan")
    if layout == "LBNHC":
        return torch.full((num_blocks, S, HKV, 2 * D), nan, dtype=dtype, device=device).permute(0, 2, 1, 3)
    if layout == "LBHNC":
        return torch.full((num_blocks, HKV, S, 2 * D), nan, dtype=dtype, device=device)
    if layout == "BLHNC":
        return torch.full((num_blocks, 2, HKV, S, 2 * D), nan, dtype=dtype, device=device)[:, 1]
    raise ValueError(layout)


CASES = [
    *(("reference", s, "LBNHC") for s in SPLITS),
    ("reference", SPLITS[1], "LBHNC"),
    ("reference", SPLITS[2], "BLHNC"),
    *(("sdpa", s, "LBNHC") for s in SPLITS),  # the CPU plugin's backend
    ("sdpa", SPLITS[1], "LBHNC"),
    ("fast", SPLITS[1], "LBHNC"),  # the interpreter is slow: one run of it, on the packed layout
]


@pytest.mark.parametrize(("kernels_name", "splits", "layout"), CASES, ids=str)
def test_steps_match_the_definition(kernels_name, splits, layout):
    dtype = torch.float32
    kernels = _kernels(kernels_name)
    device = "cuda" if kernels_name == "fast" and torch.cuda.is_available() else "cpu"  # else the interpreter
    q64, k64, v64 = _tokens(seed=len(splits))
    seq = torch.arange(TOTAL)
    q_seq, k_seq = apply_rope(q64, seq, ROPE), apply_rope(k64, seq, ROPE)  # what vLLM's model hands over
    q_seq, k_seq, v_seq = (x.to(device, dtype) for x in (q_seq, k_seq, v64))
    num_blocks = math.ceil(TOTAL / S)
    row = torch.randperm(num_blocks + 3, generator=torch.Generator().manual_seed(1))[:num_blocks].tolist()
    kv_cache = _kv_cache(layout, num_blocks + 3, dtype, device)
    assert kv_cache.shape == (num_blocks + 3, HKV, S, 2 * D)
    slots = torch.tensor([row[p // S] * S + p % S for p in range(TOTAL)], device=device)
    done = 0
    for end in splits:
        pieces = PLAN.step_layouts(done, end - done, row)
        meta = build_metadata(pieces, S, slots[done:end], device)
        step = slice(done, end)
        out = paged_attention(kernels, q_seq[step], k_seq[step], v_seq[step], kv_cache, meta, ROPE, D**-0.5).cpu()
        oracle = torch.stack([_definition(q64, k64, v64, t) for t in range(done, end)])
        in_dtype = None
        if kernels is not reference:
            ref_cache = kv_cache.clone()
            in_dtype = paged_attention(
                reference, q_seq[step], k_seq[step], v_seq[step], ref_cache, meta, ROPE, D**-0.5
            ).cpu()
        keep = torch.tensor([not _is_pad(t) for t in range(done, end)])
        assert_close(
            out[keep], oracle[keep], None if in_dtype is None else in_dtype[keep], dtype, name=f"step {done}..{end}"
        )
        done = end


def _document_at(t: int) -> LaidDocument:
    return max((d for d in PLAN.documents if d.vllm_start <= t), key=lambda d: d.vllm_start)


def _is_pad(t: int) -> bool:
    """Pad tokens' outputs are never read (vLLM samples only the last prompt token)."""
    return t < PLAN.own_vllm_start and t - _document_at(t).vllm_start >= _document_at(t).length


def test_a_cache_that_is_not_packed_is_refused():
    from lazyattention.integrations.vllm.attention import split_kv_cache

    with pytest.raises(ValueError, match=r"packed \[num_blocks, num_kv_heads, block_size, 2 \* 32\]"):
        split_kv_cache(torch.zeros(2, 4, HKV, S, D), D)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        split_kv_cache(torch.zeros(4, 2 * D, HKV, S).permute(0, 2, 3, 1), D)
