"""The public attention API of the fast path, twin of ``reference/attention.py``.

Same names, signatures and semantics as :mod:`lazyattention.reference`; a test
enforces it. Each function validates its inputs with the reference's checks, then
launches Triton kernels (``fast/attend.py``, ``fast/cache.py``). Nothing here falls back
to the reference: a case the kernels do not cover raises, naming the case.

Position convention (eq. 6): the cache stores keys rotated at their stored positions;
each block carries ``δ = logical − stored``; queries arrive pre-RoPE.

Shape alphabet: ``B`` requests, ``H`` query heads, ``Hkv`` KV heads, ``Tq`` query
tokens, ``T`` written tokens, ``D`` head dim, ``N`` physical blocks, ``S`` block size.

Supported: float16, bfloat16, float32 (matrix products in IEEE float32 for float32
inputs, never TF32); any even head dim (padded to a power of two inside); both RoPE
styles, partial rotary, every scaling of :class:`~lazyattention.reference.RopeConfig`.
float64 raises ``NotImplementedError``: it is the oracle's dtype, run the reference.
"""

from __future__ import annotations

import os

import torch
import triton

from lazyattention.reference.checks import check_attention_inputs, check_write_inputs
from lazyattention.reference.layout import Layout
from lazyattention.reference.rope import RopeConfig
from . import attend as _attend
from . import buffers
from .cache import materialise, scatter_kv
from .rope import check_int_positions, rope_tables

__all__ = [
    "write_kv",
    "lazy_prefill",
    "lazy_decode",
    "raw_prefill",
    "raw_decode",
    "eager_attention",
    "merge_attention",
]

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_backend(function: str, *tensors: torch.Tensor) -> None:
    """Raise for the cases the kernels do not run: float64, and CPU tensors without
    the Triton interpreter."""
    for t in tensors:
        if t.dtype == torch.float64:
            raise NotImplementedError(
                f"lazyattention.fast.{function}: float64 is not supported by the Triton kernels "
                "(it is the oracle's dtype); use lazyattention.reference for float64"
            )
        if t.dtype not in FAST_DTYPES:
            raise TypeError(f"lazyattention.fast.{function}: unsupported dtype {t.dtype}; supported: fp16, bf16, fp32")
    device = tensors[0].device
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"lazyattention.fast.{function}: CPU tensors need the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton), or move the tensors to CUDA"
        )
    if device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"lazyattention.fast.{function}: device type {device.type!r} is not supported")


def _tables(rope: RopeConfig, device: torch.device):
    return rope_tables(rope, max(16, triton.next_power_of_2(rope.head_dim)), device)


def _attention(function, q, k_cache, v_cache, layout, rope, scale, return_lse, decode, mode):
    check_attention_inputs(q, k_cache, v_cache, layout, rope, scale, decode)
    _check_backend(function, q, k_cache, v_cache)
    meta = layout.metadata(q.device)
    max_queries = max(req.num_queries for req in layout.requests)
    out, lse = _attend.attend(
        q,
        k_cache,
        v_cache,
        meta,
        _tables(rope, q.device),
        max_queries,
        _attend.default_scale(q.shape[-1], scale),
        mode,
        decode,
        return_lse,
    )
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- cache write


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    rope: RopeConfig | None,
) -> None:
    """Write new tokens' keys and values into the paged cache, in place (one kernel).

    Keys are rotated at ``positions`` (eq. 5, the *stored* positions, ``0..L-1`` for a
    segment prefilled alone) in float32 and cast to the cache dtype; ``rope=None``
    stores them unrotated (the raw-cache variant).

    Args:
        k: ``[T, Hkv, D]`` pre-RoPE keys.
        v: ``[T, Hkv, D]`` values.
        k_cache: ``[N, S, Hkv, D]``, written at ``slots``.
        v_cache: ``[N, S, Hkv, D]``, written at ``slots``.
        slots: ``[T]`` flat slot indices ``block * S + offset``, distinct.
        positions: ``[T]`` stored positions, in ``[0, 2^31 - 1)``.
        rope: the model's RoPE, or ``None`` for unrotated keys.
    """
    check_write_inputs(k, v, k_cache, v_cache, slots, positions, rope)
    _check_backend("write_kv", k, v, k_cache, v_cache)
    check_int_positions(positions, "write_kv positions")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("lazyattention.fast.write_kv needs contiguous caches and k, v contiguous in D")
    tables = _tables(rope, k.device) if rope is not None else None
    scatter_kv(k, v, k_cache, v_cache, slots, positions, tables)


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
    """Deferred-RoPE attention of a batch of requests' query tokens (eq. 8), one kernel.

    Each program holds a tile of one request's queries for one KV head (the group's
    query heads packed in the tile) and walks the request's blocks; the query tile is
    rotated by ``p − δ`` from the pre-RoPE query each time the shift changes, so the
    scores are ``scale · <m R(p − δ) q, k_stored>``; online softmax (eq. 11).

    Args:
        q: ``[Tq, H, D]`` **pre-RoPE** queries, requests concatenated in layout order.
        k_cache: ``[N, S, Hkv, D]`` keys stored rotated at their stored positions.
        v_cache: ``[N, S, Hkv, D]``.
        layout: which blocks each request reads, at which shift.
        rope: the model's RoPE.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        ``out [Tq, H, D]`` in ``q.dtype``; with ``return_lse``, also ``lse [Tq, H]``
        float32.
    """
    return _attention("lazy_prefill", q, k_cache, v_cache, layout, rope, scale, return_lse, False, _attend.LAZY)


def lazy_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Deferred-RoPE attention of one new token per request (eq. 8), split-KV.

    Each request's key tiles are split among several programs (flash-decoding) so that
    long contexts at small batch fill the GPU; the partial results are merged by
    log-sum-exp (eq. 12) in a second small kernel.

    Args:
        q: ``[B, H, D]`` pre-RoPE queries, one per request.
        k_cache: ``[N, S, Hkv, D]``.
        v_cache: ``[N, S, Hkv, D]``.
        layout: every request with ``num_queries == 1``.
        rope: the model's RoPE.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
        return_lse: also return ``lse [B, H]``.

    Returns:
        ``out [B, H, D]`` (and ``lse [B, H]`` float32).
    """
    return _attention("lazy_decode", q, k_cache, v_cache, layout, rope, scale, return_lse, True, _attend.LAZY)


def raw_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Raw-cache variant (eq. 10): the cache holds **unrotated** keys; the kernel
    rotates every key tile at its logical positions, the query at its own.

    Arguments and returns as :func:`lazy_prefill`, except that ``k_cache`` was written
    with ``write_kv(..., rope=None)``.
    """
    return _attention("raw_prefill", q, k_cache, v_cache, layout, rope, scale, return_lse, False, _attend.RAW)


def raw_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Raw-cache variant of :func:`lazy_decode` (eq. 10): ``q [B, H, D]``, unrotated cache."""
    return _attention("raw_decode", q, k_cache, v_cache, layout, rope, scale, return_lse, True, _attend.RAW)


def eager_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The materialise path (eq. 9), Block-Attention's: copy every block each request
    reads into a private cache with its keys re-rotated by ``δ`` to their logical
    positions, then attend with the query rotated at its own position.

    Like the reference's definition, the copy and the attention are float32 (the
    re-rotated keys are never rounded back to a 16-bit dtype); the output is cast to
    ``q.dtype``. (The Block-Attention baseline of ``benchmarks/kernels.py`` copies in
    the cache dtype instead, as a serving engine would.)

    Works for prefill (``q [Tq, H, D]``) and decode (``q [B, H, D]``, one query per
    request). Arguments and returns as :func:`lazy_prefill`.
    """
    check_attention_inputs(q, k_cache, v_cache, layout, rope, scale, False)
    _check_backend("eager_attention", q, k_cache, v_cache)
    tables = _tables(rope, q.device)
    k_copy, v_copy, meta = materialise(k_cache, v_cache, layout.metadata(q.device), tables, torch.float32)
    out, lse = _attend.attend(
        q.to(torch.float32),
        k_copy,
        v_copy,
        meta,
        tables,
        max(req.num_queries for req in layout.requests),
        _attend.default_scale(q.shape[-1], scale),
        _attend.LAZY,  # every shift is 0 now: the query is rotated at its own position
        False,
        return_lse,
    )
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def merge_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
):
    """Combine attention over two disjoint key sets by their log-sum-exps (eq. 12).

    ``out = out_a·e^(lse_a − lse) + out_b·e^(lse_b − lse)`` with
    ``lse = log(e^lse_a + e^lse_b)``; a part that saw no key has ``lse = −inf`` and
    weight 0. The same kernel merges decode's split-KV partials.

    Args:
        out_a: ``[T, H, D]``.
        lse_a: ``[T, H]``.
        out_b: ``[T, H, D]``.
        lse_b: ``[T, H]``.

    Returns:
        ``out [T, H, D]`` in ``out_a.dtype`` and ``lse [T, H]`` float32.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:2] != lse_a.shape:
        raise ValueError(
            f"merge_attention needs out [T, H, D] and lse [T, H] pairs of equal shapes, got "
            f"{tuple(out_a.shape)}, {tuple(lse_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_b.shape)}"
        )
    _check_backend("merge_attention", out_a, out_b)
    t, h, d = out_a.shape
    part = torch.stack([out_a.to(torch.float32), out_b.to(torch.float32)], dim=2)  # [T, H, 2, D]
    part_lse = torch.stack([lse_a.to(torch.float32), lse_b.to(torch.float32)], dim=2)  # [T, H, 2]
    out = buffers.empty((t, h, d), out_a.dtype, out_a.device)
    lse = buffers.empty((t, h), torch.float32, out_a.device)
    _attend.merge_partials(part, part_lse, out, lse)
    return out, lse
