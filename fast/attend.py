"""The host side of the attention kernel: :func:`attend` launches one attention call.

:func:`attend` serves every fast attention function: it takes the call's tiles from
:func:`~lazyattention.fast.plan.plan`, writes the rotated query with
:func:`_query_kernel` where the plan needs it, launches the attention kernel
(``fast/kernels.py``, where the kernel's design is described) with every argument by
name, and merges the splits (:func:`~lazyattention.fast.merge.merge_partials`) when
the plan splits the keys.

Shape alphabet: ``B`` requests, ``H`` heads, ``Hkv`` KV heads, ``G = H / Hkv``, ``Tq``
query tokens, ``D`` head dim (``DP`` padded to a power of two), ``N`` blocks,
``S`` block size, ``M`` blocks per request (padded), ``P`` splits.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from lazyattention.reference.layout import BlockMetadata

from . import buffers
from .kernels import LAZY, LOG2E, NONE, RAW, _attention_kernel, _query_kernel, cache_descriptors
from .merge import merge_partials
from .plan import Plan, multiprocessors, plan, prefill_splits
from .rope import RopeTables
from .rounding import dot_dtype, emulate_rtne

__all__ = ["LAZY", "RAW", "NONE", "Plan", "plan", "prefill_splits", "multiprocessors", "attend", "merge_partials",
           "default_scale"]  # fmt: skip


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: BlockMetadata,
    tables: RopeTables,
    max_queries: int,
    scale: float,
    mode: int,
    decode: bool,
    return_lse: bool,
    tiles: Plan | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
):
    """Launch the attention kernel (after the query kernel, and before the merge when
    decode splits the keys).

    Args:
        q: ``[Tq, H, D]`` pre-RoPE queries (``Tq = B`` for decode).
        k_cache, v_cache: ``[N, S, Hkv, D]``.
        meta: the layout's :class:`BlockMetadata` on ``q``'s device.
        tables: rotation tables padded to this call's ``DP``.
        max_queries: the largest ``num_queries`` of a request.
        scale: softmax scale.
        mode: :data:`LAZY`, :data:`RAW` or :data:`NONE`.
        tiles: a :class:`Plan` to use instead of :func:`plan`'s (the shared path's rest,
            split by its own cap; benchmark sweeps).
        out, lse: where to write the results (any strides but a contiguous last
            dimension, e.g. one slot of a merge's partials, float32: ``fast/shared.py``);
            new tensors when ``None``.

    Returns:
        ``out [Tq, H, D]`` (in ``q.dtype`` when new) and ``lse [Tq, H]`` float32 (or ``None``).
    """
    tq, h, d = q.shape
    _, s, hkv, _ = k_cache.shape
    b, m = meta.block_table.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("lazyattention.fast needs the head dimension of q, k_cache and v_cache contiguous")
    pl = tiles or plan(h, hkv, d, s, q.dtype, q.device, decode, b * hkv, m * s, max_queries, mode == RAW)
    if tables.freq.shape[0] != pl.dp:
        raise ValueError(f"rope tables padded to {tables.freq.shape[0]} channels, the plan needs {pl.dp}")
    if pl.flat and s % pl.block_n:
        raise ValueError(f"the flat key loop needs key tiles inside one block: block size {s}, key tile {pl.block_n}")
    if mode == RAW:
        pl = pl._replace(tma=False)  # the raw keys' partner channels are gathered anyway
    k_desc, v_desc = cache_descriptors(k_cache, v_cache, pl)
    out = buffers.empty((tq, h, d), q.dtype, q.device) if out is None else out
    lse = buffers.empty((tq, h), torch.float32, q.device) if lse is None else lse
    blocks_per_split = triton.cdiv(m, pl.splits)
    if pl.splits > 1:
        part = buffers.empty((tq, h, pl.splits, d), torch.float32, q.device)
        part_lse = buffers.empty((tq, h, pl.splits), torch.float32, q.device)
        dest, dest_lse = part, part_lse
        stride_op = part.stride(2)
    else:
        dest, dest_lse = out, lse
        stride_op = 0
    if pl.direct and pl.block_q != 1:
        raise ValueError(f"the direct query rotation needs one token per query tile (decode), not {pl.block_q}")
    if pl.direct:
        y_desc, y_rows_per_w = None, 0
    else:
        y = _rotated_query(q, meta, tables, max_queries, mode, hkv, pl.gp)
        y_rows_per_w = hkv * tq * pl.gp
        y_desc = TensorDescriptor(y, [y.shape[0] * y_rows_per_w, pl.dp], [pl.dp, 1], [pl.block_q * pl.gp, pl.dp])
    grid = (triton.cdiv(max_queries, pl.block_q), b, hkv * pl.splits)
    _attention_kernel[grid](
        y_desc=y_desc, q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, k_desc=k_desc, v_desc=v_desc,
        out_ptr=dest, lse_ptr=dest_lse,
        block_table_ptr=meta.block_table, block_pos_ptr=meta.block_pos, block_shift_ptr=meta.block_shift,
        block_len_ptr=meta.block_len, num_blocks_ptr=meta.num_blocks, num_segment_blocks_ptr=meta.num_segment_blocks,
        query_start_ptr=meta.query_start, cu_queries_ptr=meta.cu_queries,
        freq_ptr=tables.freq, partner_ptr=tables.partner, mscale_ptr=tables.mscale,
        qk_scale=scale * LOG2E, y_rows_per_w=y_rows_per_w, Tq=tq,
        stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_kn=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vn=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_ot=dest.stride(0), stride_oh=dest.stride(1), stride_op=stride_op,
        stride_lt=dest_lse.stride(0), stride_lh=dest_lse.stride(1),
        stride_meta=meta.block_table.stride(0),
        G=h // hkv, D=d, blocks_per_split=blocks_per_split, splits=pl.splits,
        BLOCK_Q=pl.block_q, GP=pl.gp, BLOCK_N=pl.block_n, DP=pl.dp, S=s,
        MODE=mode, TMA=k_desc is not None, DIRECT=pl.direct, FLAT=pl.flat and mode == LAZY, SPLIT=pl.splits > 1,
        DOT_DTYPE=dot_dtype(q.dtype, q.device),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WRITE_LSE=return_lse or pl.splits > 1,
        EMULATE_RTNE=emulate_rtne(dest.dtype, q.device),
        num_warps=pl.num_warps, num_stages=pl.num_stages,
    )  # fmt: skip
    if pl.splits > 1:
        merge_partials(part, part_lse, out, lse)
    return out, (lse if return_lse else None)


def _rotated_query(q, meta: BlockMetadata, tables: RopeTables, max_queries: int, mode: int, num_kv_heads: int,
                   gp: int):  # fmt: skip
    """``y [W, Hkv, Tq, GP, DP]`` float32 from :func:`_query_kernel`: ``W = 2`` (the query
    and its partner channels) for :data:`LAZY`, 1 otherwise."""
    tq, h, d = q.shape
    dp = tables.freq.shape[0]
    y = buffers.empty((2 if mode == LAZY else 1, num_kv_heads, tq, gp, dp), torch.float32, q.device)
    # 16-row tiles: at 64 rows the exact angle reduction of a [64, DP] tile took 255
    # registers and spilled 108 bytes (sm_90, D = 128), and one request of 128 queries
    # over 8 × 512 keys took 65.6 µs on an H200 against 58.8 µs with 16 rows.
    block_t = max(1, 16 // gp)
    grid = (triton.cdiv(max_queries, block_t), meta.cu_queries.shape[0] - 1, num_kv_heads)
    _query_kernel[grid](
        q_ptr=q, y_ptr=y, query_start_ptr=meta.query_start, cu_queries_ptr=meta.cu_queries,
        freq_ptr=tables.freq, partner_ptr=tables.partner, mscale_ptr=tables.mscale,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_yw=y.stride(0), stride_yh=y.stride(1),
        stride_yt=y.stride(2), G=h // num_kv_heads, D=d,
        BLOCK_T=block_t, GP=gp, DP=dp, ROTATE=mode != NONE, PARTNER=mode == LAZY,
    )  # fmt: skip
    return y


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale``, or ``1/sqrt(D)`` when ``None`` — as the reference."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
