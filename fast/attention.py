"""The public attention API of the fast path, twin of ``reference/attention.py``.

Same names (:data:`~lazyattention.reference.ATTENTION_API`), signatures and semantics
as :mod:`lazyattention.reference.attention`, whose docstrings are the contract (shapes,
position convention, returns); a test enforces the names and signatures. The docstrings
here say only what the kernels add. Each function validates its inputs with the
reference's checks, then launches Triton kernels (``fast/attend.py``, ``fast/cache.py``).
Nothing here falls back to the reference: a case the kernels do not cover raises,
naming the case.

Supported: float16, bfloat16, float32 (matrix products in IEEE float32 for float32
inputs, never TF32); any even head dim (padded to a power of two inside); both RoPE
styles, partial rotary, every scaling of :class:`~lazyattention.reference.RopeConfig`.
float64 raises ``NotImplementedError``: it is the oracle's dtype, run the reference.
"""

from __future__ import annotations

import os

import torch
import triton

from lazyattention.reference import ATTENTION_API
from lazyattention.reference.checks import check_attention_inputs, check_write_inputs
from lazyattention.reference.layout import Layout
from lazyattention.reference.rope import RopeConfig

from . import attend as _attend
from . import buffers
from .cache import materialise, scatter_kv
from .rope import rope_tables

__all__ = list(ATTENTION_API)

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


def _attention(function, q, k_cache, v_cache, layout, rope, scale, *, return_lse: bool, decode: bool, mode: int):
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
        mode=mode,
        decode=decode,
        return_lse=return_lse,
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
    *,
    validate: bool = True,
) -> None:
    """:func:`lazyattention.reference.write_kv` in one kernel: rotate (in float32, cast
    to the cache dtype) and scatter. Needs contiguous caches and ``k``, ``v`` contiguous
    in ``D``. With ``validate=False`` nothing reads the device tensors back, so the
    call can be captured in a CUDA graph."""
    check_write_inputs(k, v, k_cache, v_cache, slots, positions, rope, validate)
    _check_backend("write_kv", k, v, k_cache, v_cache)
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
    """:func:`lazyattention.reference.lazy_prefill` in one kernel.

    Each program holds a tile of one request's queries for one KV head (the group's
    query heads packed in the tile) and walks the request's blocks; the query tile is
    rotated by ``p − δ`` from the pre-RoPE query each time the shift changes; online
    softmax (eq. 11). Tiles and key loads (bulk tensor copies or row gathers) are
    chosen by ``fast/plan.py``'s ``plan()``.
    """
    return _attention(
        "lazy_prefill", q, k_cache, v_cache, layout, rope, scale, return_lse=return_lse, decode=False, mode=_attend.LAZY
    )


def lazy_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.lazy_decode`, split-KV.

    Each request's key tiles are split among several programs (flash-decoding) so that
    long contexts at small batch fill the GPU; the partial results are merged by
    log-sum-exp (eq. 12) in a second small kernel. The split count depends only on the
    shapes (batch, heads, padded blocks per request), never on the data, so a call with
    fixed shapes can be captured in a CUDA graph.
    """
    return _attention(
        "lazy_decode", q, k_cache, v_cache, layout, rope, scale, return_lse=return_lse, decode=True, mode=_attend.LAZY
    )


def raw_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.raw_prefill`: the kernel of :func:`lazy_prefill`
    with every key tile rotated at its logical positions (eq. 10), the query once at
    its own; key tiles are gathered by rows (their partner channels are needed)."""
    return _attention(
        "raw_prefill", q, k_cache, v_cache, layout, rope, scale, return_lse=return_lse, decode=False, mode=_attend.RAW
    )


def raw_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.raw_decode`: :func:`lazy_decode`'s split-KV kernel
    with the raw cache's per-key rotation (eq. 10)."""
    return _attention(
        "raw_decode", q, k_cache, v_cache, layout, rope, scale, return_lse=return_lse, decode=True, mode=_attend.RAW
    )


def eager_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: Layout,
    rope: RopeConfig,
    scale: float | None = None,
    return_lse: bool = False,
):
    """:func:`lazyattention.reference.eager_attention`: a copy kernel re-rotates every
    block each request reads into a private cache (eq. 9), then the :func:`lazy_prefill`
    kernel attends with every shift 0.

    The copy and the attention are float32: the re-rotated keys are never rounded back
    to a 16-bit dtype, where the definition rounds each rotated score operand to the
    input dtype (docs/concepts/numerics.md), so this path is at least as precise and
    within the tolerance rule; the output is cast to ``q.dtype``. (The Block-Attention
    baseline of ``benchmarks/kernels.py`` copies in the cache dtype instead, as a
    serving engine would.)
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
        mode=_attend.LAZY,  # every shift is 0 now: the query is rotated at its own position
        decode=False,
        return_lse=return_lse,
    )
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def merge_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
):
    """:func:`lazyattention.reference.merge_attention` in one kernel, the one that also
    merges decode's split-KV partials."""
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
