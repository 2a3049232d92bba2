"""The CPU-speed backend: the reference's attention API, vectorised PyTorch.

Same names, signatures and semantics as :mod:`lazyattention.reference.attention`
(:data:`~lazyattention.reference.ATTENTION_API`), whose docstrings are the contract; a
test enforces the names and signatures, and property tests hold every function to the
one tolerance rule against the float64 oracle. The reference scores a request with
one ``[H, Tq, Tk]`` matrix filled shift by shift; this backend computes the same
function in two vectorised ways and picks one by the size of the work:

* **block-wise** (decode, and prefill of a few query tokens): every cached block
  carries its shift δ (eq. 6), so the query is rotated by ``p − δ`` once per block
  (eq. 8), all blocks of all requests at once, and the scores, the mask (eq. 7), the
  softmax and the weighted sum (eq. 11) are a handful of batched tensor operations —
  no loop over requests, segments or shifts;
* **part-wise** (long prefills): one fused attention call (PyTorch's CPU flash
  attention, the kernel behind ``scaled_dot_product_attention`` on the CPU) per part of
  a request — each segment with the query rotated by its own δ, the own tokens
  before the queries, and the causal diagonal — whose partial results are merged by
  their log-sum-exps (eq. 12). No ``[Tq, Tk]`` matrix is ever materialised, so a
  document's first prefill costs what full attention's prefill of the same tokens does.

The choice depends only on shapes, never on values, and both ways compute eq. (8)
exactly as the reference defines it (the rotated query rounded to the input dtype,
float32 arithmetic, float64 for float64 inputs); both are tested. The fused kernel
that returns a log-sum-exp is PyTorch's CPU flash attention, so the part-wise way runs
on CPU tensors; on another device a long prefill raises, naming the case (use
``lazyattention.fast`` on CUDA). Nothing falls back to the reference.

Shape alphabet as in the reference: ``B`` requests, ``H`` query heads, ``Hkv`` KV
heads, ``G = H / Hkv``, ``Tq`` query tokens, ``D`` head dim, ``N`` physical blocks,
``S`` block size; here also ``M`` blocks of the longest request and ``Tm`` queries of
the request with most queries.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch

from lazyattention.reference import ATTENTION_API
from lazyattention.reference.attention import _operand, compute_dtype, merge_attention, write_kv  # noqa: F401 (write_kv re-exported)
from lazyattention.reference.checks import check_attention_inputs
from lazyattention.reference.layout import Layout, Placement, RequestLayout
from lazyattention.reference.rope import RopeConfig, apply_rope, rope_cos_sin, rotate, rotate_by, with_attention_factor

__all__ = list(ATTENTION_API)  # write_kv and merge_attention are the reference's own: already vectorised

#: The block-wise way holds a rotated query per block, ``B·M·Tm·H·D`` numbers, and its
#: scores, ``B·H·Tm·M·S``. Past this many rotated-query numbers (16 MiB in float32) a
#: call goes part-wise, which holds neither: a decode step and a question after cached
#: documents stay block-wise, a document's own prefill goes part-wise.
BLOCKWISE_MAX_ELEMENTS = 1 << 22

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


# --------------------------------------------------------------------------- block-wise


@dataclass(frozen=True)
class BlockPlan:
    """What the block-wise way needs of a layout, the same for every layer of a step.

    Built once per layout, device, RoPE and compute dtype by :func:`block_plan`.

    Args:
        rows: ``[B, Tm]`` index into ``q`` of each request's queries, padded.
        has_query: ``[B, Tm]`` which of ``rows`` are real queries.
        blocks: ``[B·M]`` physical block ids, request by request, padded with block 0.
        cos: ``[B, M, 1, Tm, 1, F]`` cosines of the angles ``p − δ`` of each block (eq. 8).
        sin: as ``cos``.
        bias: ``[B, 1, Tm, 1, M·S]`` 0 where a query sees a key (eq. 7), −inf elsewhere
            (padding and slots past a block's valid length included).
        unwritten: ``[R]`` the rows of the gathered keys and values, viewed as
            ``[B·M·Hkv·S, D]``, that lie past their block's valid length: they may hold
            anything, NaN included (a weight of 0 times NaN is NaN), so they are zeroed.
    """

    rows: torch.Tensor
    has_query: torch.Tensor
    blocks: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    bias: torch.Tensor
    unwritten: torch.Tensor


#: Plans by layout (a layout never changes after construction; the entry goes with it).
_plans: weakref.WeakKeyDictionary[Layout, dict] = weakref.WeakKeyDictionary()


def block_plan(layout: Layout, device: torch.device, rope: RopeConfig, cdt: torch.dtype, num_kv_heads: int):
    """The :class:`BlockPlan` of ``layout`` (built on first use, then reused by every layer)."""
    plans = _plans.setdefault(layout, {})
    key = (device, rope, cdt, num_kv_heads)
    if key not in plans:
        plans[key] = _build_block_plan(layout, device, rope, cdt, num_kv_heads)
    return plans[key]


def _build_block_plan(
    layout: Layout, device: torch.device, rope: RopeConfig, cdt: torch.dtype, num_kv_heads: int
) -> BlockPlan:
    meta = layout.metadata(device)
    table, shift = meta.block_table.long(), meta.block_shift.long()
    M = table.shape[1]
    S = layout.block_size
    counts = meta.cu_queries[1:] - meta.cu_queries[:-1]
    Tm = max(req.num_queries for req in layout.requests)

    t = torch.arange(Tm, device=device)
    has_query = t[None, :] < counts[:, None]  # [B, Tm]
    rows = (meta.cu_queries[:-1, None] + t[None, :]).clamp(max=layout.num_queries - 1).long()
    q_pos = meta.query_start[:, None].long() + t[None, :]  # [B, Tm]
    cos, sin = rope_cos_sin(q_pos[:, None, :] - shift[:, :, None], rope, cdt)  # R(p − δ), eq. (8)

    # Eq. (7): a key is visible if it lies inside its block's valid length and is a
    # segment token, or an own token at or before the query.
    s = torch.arange(S, device=device)
    valid = s[None, None, :] < meta.block_len[:, :, None]  # [B, M, S]
    k_pos = meta.block_pos[:, :, None].long() + s[None, None, :]
    is_own = torch.arange(M, device=device)[None, :] >= meta.num_segment_blocks[:, None]  # [B, M]
    causal = k_pos[:, None, :, :] <= q_pos[:, :, None, None]  # [B, Tm, M, S]
    visible = valid[:, None] & (~is_own[:, None, :, None] | causal)
    return BlockPlan(
        rows=rows,
        has_query=has_query,
        blocks=table.flatten(),
        cos=cos[:, :, None, :, None, :],
        sin=sin[:, :, None, :, None, :],
        bias=torch.zeros(visible.shape, dtype=cdt, device=device)
        .masked_fill(~visible, float("-inf"))
        .flatten(-2)[:, None, :, None],
        unwritten=torch.nonzero((~valid)[:, :, None, :].expand(-1, -1, num_kv_heads, -1).flatten()).flatten(),
    )


def _blockwise(q, k_cache, v_cache, layout: Layout, rope: RopeConfig, scale: float, return_lse: bool):
    """Eqs. (7), (8), (11) over all requests and blocks at once; ``out [Tq, H, D]`` and
    ``lse [Tq, H]`` (``None`` unless asked for)."""
    dtype, cdt = q.dtype, compute_dtype(q.dtype)
    S, Hkv = k_cache.shape[1:3]
    plan = block_plan(layout, q.device, rope, cdt, Hkv)
    B, Tm = plan.rows.shape
    M = plan.blocks.shape[0] // B
    _, H, D = q.shape

    G = H // Hkv
    # Query head h = k·G + g reads KV head k. Every tensor keeps KV heads ahead of the
    # tokens, so the products below are batched matrix products over (B, M, Hkv).
    q_pad = q.to(cdt)[plan.rows].view(B, Tm, Hkv, G, D).transpose(1, 2)  # [B, Hkv, Tm, G, D]
    q_rot = rotate_by(q_pad[:, None].expand(B, M, Hkv, Tm, G, D), plan.cos, plan.sin, rope)  # R(p − δ) q, eq. (8)
    q_rot = _operand(with_attention_factor(q_rot, rope), dtype).view(B, M, Hkv, Tm * G, D)
    # Whole blocks, KV heads ahead of slots: [B, M, Hkv, S, D] (index_select along the
    # blocks copies whole rows, several times faster than indexing slot by slot).
    keys = torch.index_select(k_cache.transpose(1, 2), 0, plan.blocks).view(B, M, Hkv, S, D).to(cdt)
    values = torch.index_select(v_cache.transpose(1, 2), 0, plan.blocks).view(B, M, Hkv, S, D).to(cdt)
    keys.view(-1, D).index_fill_(0, plan.unwritten, 0.0)  # finite, so that the bias hides them
    values.view(-1, D).index_fill_(0, plan.unwritten, 0.0)

    scores = torch.matmul(q_rot, keys.transpose(-1, -2)) * scale  # [B, M, Hkv, Tm·G, S]
    scores = scores.view(B, M, Hkv, Tm, G, S).permute(0, 2, 3, 4, 1, 5).reshape(B, Hkv, Tm, G, M * S)
    scores = scores + plan.bias  # eq. (7)
    probs = torch.softmax(scores, dim=-1)  # eq. (11); a padded query's row (all hidden) is NaN, dropped below
    values = values.transpose(1, 2).reshape(B, Hkv, M * S, D)
    out = torch.matmul(probs.view(B, Hkv, Tm * G, M * S), values).view(B, Hkv, Tm, G, D)
    out = out.transpose(1, 2).reshape(B, Tm, H, D)[plan.has_query]
    if not return_lse:
        return out, None
    lse = torch.logsumexp(scores, dim=-1).transpose(1, 2).reshape(B, Tm, H)
    return out, lse[plan.has_query]


# --------------------------------------------------------------------------- part-wise


def _gather(p: Placement, cache: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
    """Tokens ``first..last−1`` of a placement as stored: ``[L, Hkv, D]``."""
    blocks = torch.tensor(p.blocks, dtype=torch.long, device=cache.device)
    return cache[blocks].flatten(0, 1)[first : p.length if last is None else last]


def _fused(q_rot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool):
    """One fused attention call; ``q_rot [Tq, H, D]``, ``keys``/``values [L, Hkv, D]``.

    Without a mask the ``G`` query heads of a KV head are folded into the query axis,
    so the keys are read as stored; the causal diagonal (``L == Tq``) repeats them per
    query head instead. Returns ``out [Tq, H, D]`` and ``lse [Tq, H]``.
    """
    Tq, H, D = q_rot.shape
    Hkv = keys.shape[1]
    G = H // Hkv
    if causal:
        k = keys.repeat_interleave(G, dim=1).transpose(0, 1)[None]
        v = values.repeat_interleave(G, dim=1).transpose(0, 1)[None]
        out, lse = _flash(q_rot.transpose(0, 1)[None], k, v, is_causal=True, scale=scale)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1)
    qf = q_rot.view(Tq, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * Tq, D)
    out, lse = _flash(qf, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], scale=scale)
    out = out.view(Hkv, G, Tq, D).permute(2, 0, 1, 3).reshape(Tq, H, D)
    return out, lse.view(Hkv, G, Tq).permute(2, 0, 1).reshape(Tq, H)


def _request_partwise(q, k_cache, v_cache, req: RequestLayout, rope, scale, dtype, keys_mode):
    """One request's queries ``[Tq, H, D]`` (compute dtype) attended part by part."""
    q_pos = torch.arange(req.num_queries, device=q.device) + req.query_start
    at_p = _operand(apply_rope(q, q_pos, rope), dtype) if keys_mode != "lazy" else None
    own, n_before = req.own, req.own.length - req.num_queries
    # (placement, first, last, causal): each segment, the own tokens before the
    # queries, and the causal diagonal of the queries' own tokens.
    pieces = [(seg, 0, seg.length, False) for seg in req.segments if seg.length]
    if n_before:
        pieces.append((own, 0, n_before, False))
    pieces.append((own, n_before, own.length, True))
    parts = []
    for p, first, last, causal in pieces:
        keys = _gather(p, k_cache, first, last).to(q.dtype)
        values = _gather(p, v_cache, first, last).to(q.dtype)
        if keys_mode == "lazy":  # R(p − δ) q against keys as stored (eq. 8)
            q_rot = _operand(apply_rope(q, q_pos - p.shift, rope), dtype)
        else:  # eq. (9): keys re-rotated by δ; eq. (10): raw keys rotated at their logical positions
            k_at = torch.arange(first, last, device=q.device) + p.start
            keys = rotate(keys, p.shift, rope) if keys_mode == "eager" else apply_rope(keys, k_at, rope)
            keys, q_rot = _operand(keys, dtype), at_p
        parts.append(_fused(q_rot, keys, values, scale, causal))
    return functools.reduce(lambda a, b: merge_attention(*a, *b), parts)  # eq. (12), part by part


def _partwise(q, k_cache, v_cache, layout: Layout, rope, scale, keys_mode):
    if q.device.type != "cpu":
        raise NotImplementedError(
            f"lazyattention.sdpa: a long prefill on {q.device.type} needs CPU tensors (its fused kernel is "
            "PyTorch's CPU flash attention); use lazyattention.fast on CUDA"
        )
    cdt = compute_dtype(q.dtype)
    outs, lses, first = [], [], 0
    for req in layout.requests:
        q_r = q[first : first + req.num_queries].to(cdt)
        first += req.num_queries
        out, lse = _request_partwise(q_r, k_cache, v_cache, req, rope, scale, q.dtype, keys_mode)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


# --------------------------------------------------------------------------- dispatch


def _blockwise_fits(q: torch.Tensor, layout: Layout) -> bool:
    rows = layout.metadata(q.device).block_table.shape[1]  # M, from the layout's cached metadata
    tm = max(req.num_queries for req in layout.requests)
    return layout.batch_size * rows * tm * q.shape[1] * q.shape[2] <= BLOCKWISE_MAX_ELEMENTS


def _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode, keys_mode):
    check_attention_inputs(q, k_cache, v_cache, layout, rope, scale, decode)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if keys_mode == "lazy" and _blockwise_fits(q, layout):
        out, lse = _blockwise(q, k_cache, v_cache, layout, rope, scale, return_lse)
    else:
        out, lse = _partwise(q, k_cache, v_cache, layout, rope, scale, keys_mode)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- public


def lazy_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.lazy_prefill`, block-wise for a few query tokens,
    part-wise (one fused call per segment, merged by eq. 12) for long prefills."""
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=False, keys_mode="lazy")


def lazy_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.lazy_decode`, all requests and blocks at once."""
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=True, keys_mode="lazy")


def raw_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.raw_prefill`, part-wise: each part's keys rotated
    at their logical positions (eq. 10), one fused call per part."""
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=False, keys_mode="raw")


def raw_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.raw_decode`, part-wise as :func:`raw_prefill`."""
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=True, keys_mode="raw")


def eager_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.eager_attention`, part-wise: each part's keys
    re-rotated by its δ (eq. 9), one fused call per part."""
    return _attention(q, k_cache, v_cache, layout, rope, scale, return_lse, decode=False, keys_mode="eager")
