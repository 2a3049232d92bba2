"""Kernels that write the paged cache: the cache write, and the materialise copy.

* :func:`write_kv_kernel` — rotate new keys at their stored positions (eq. 5) and
  scatter keys and values into their slots; with ``ROTATE=False`` the keys are stored
  as given (the raw-cache variant).
* :func:`materialise` — the Block-Attention baseline (eq. 9): copy every block a request
  reads into a fresh, request-private cache, re-rotating its keys by the block's shift
  ``δ`` (a pure rotation ``R(δ)``, no attention factor), so that the copy holds keys at
  their *logical* positions and every shift becomes 0.

Shape alphabet: ``T`` tokens, ``Hkv`` KV heads, ``D`` head dim (``DP`` padded),
``N`` blocks, ``S`` block size, ``B`` requests, ``M`` blocks per request (padded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lazyattention.reference.layout import BlockMetadata

from . import buffers
from .rope import RopeTables, rotate_tile
from .rounding import emulate_rtne, round_to

__all__ = ["write_kv_kernel", "scatter_kv", "materialise"]


@triton.jit
def write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    positions_ptr,
    freq_ptr,
    partner_ptr,
    mscale_ptr,
    T,
    Hkv,
    D,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ch,
    stride_ds,
    stride_dh,
    BLOCK_T: tl.constexpr,
    DP: tl.constexpr,
    ROTATE: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """One program: ``BLOCK_T`` tokens of one KV head. Keys ``m R(pos) k`` (eq. 5)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    d = tl.arange(0, DP)
    t_ok = t < T
    mask = t_ok[:, None] & (d < D)[None, :]
    slot = tl.load(slots_ptr + t, mask=t_ok, other=0).to(tl.int64)
    k_rows = k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh
    k = tl.load(k_rows[:, None] + d[None, :], mask=mask, other=0.0)
    if ROTATE:
        pos = tl.load(positions_ptr + t, mask=t_ok, other=0).to(tl.int64)
        partner = tl.load(partner_ptr + d)[None, :]
        kp = tl.load(k_rows[:, None] + partner, mask=mask, other=0.0).to(tl.float32)
        freq = tl.load(freq_ptr + d)[None, :]
        mscale = tl.load(mscale_ptr + d)[None, :]
        k = rotate_tile(k.to(tl.float32), kp, pos[:, None], freq, mscale)
        k = round_to(k, k_cache_ptr.dtype.element_ty, EMULATE_RTNE)
    v = tl.load(v_ptr + t.to(tl.int64)[:, None] * stride_vt + h * stride_vh + d[None, :], mask=mask, other=0.0)
    tl.store(k_cache_ptr + (slot * stride_cs + h * stride_ch)[:, None] + d[None, :], k, mask=mask)
    tl.store(v_cache_ptr + (slot * stride_ds + h * stride_dh)[:, None] + d[None, :], v, mask=mask)


def scatter_kv(k, v, k_cache, v_cache, slots, positions, tables: RopeTables | None) -> None:
    """Launch :func:`write_kv_kernel`; ``tables=None`` stores the keys unrotated.

    The caches are viewed as ``[N·S, Hkv, D]``: slot ``s`` is row ``s``.
    """
    t, hkv, d = k.shape
    if t == 0:
        return
    n, s = k_cache.shape[:2]
    kc = k_cache.view(n * s, hkv, d)
    vc = v_cache.view(n * s, hkv, d)
    dp = max(16, triton.next_power_of_2(d))
    block_t = 16
    dummy = slots  # unused pointers when ROTATE is off
    write_kv_kernel[(triton.cdiv(t, block_t), hkv)](
        k_ptr=k, v_ptr=v, k_cache_ptr=kc, v_cache_ptr=vc, slots_ptr=slots, positions_ptr=positions,
        freq_ptr=tables.freq if tables is not None else dummy,
        partner_ptr=tables.partner if tables is not None else dummy,
        mscale_ptr=tables.mscale if tables is not None else dummy,
        T=t, Hkv=hkv, D=d,
        stride_kt=k.stride(0), stride_kh=k.stride(1), stride_vt=v.stride(0), stride_vh=v.stride(1),
        stride_cs=kc.stride(0), stride_ch=kc.stride(1), stride_ds=vc.stride(0), stride_dh=vc.stride(1),
        BLOCK_T=block_t, DP=dp, ROTATE=tables is not None, EMULATE_RTNE=emulate_rtne(k.dtype, k.device),
    )  # fmt: skip


@triton.jit
def _materialise_kernel(
    k_ptr,
    v_ptr,
    k_out_ptr,
    v_out_ptr,
    block_table_ptr,
    block_shift_ptr,
    block_len_ptr,
    num_blocks_ptr,
    freq_ptr,
    partner_ptr,
    D,
    M,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_on,
    stride_os,
    stride_oh,
    BLOCK_S: tl.constexpr,
    DP: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """One program: logical block ``i`` of request ``r``, one KV head, to block ``r·M + i``.

    Keys: ``R(δ) k_stored`` (eq. 9) — a pure rotation, hence a unit attention factor.
    """
    r = tl.program_id(0) // M
    i = tl.program_id(0) % M
    h = tl.program_id(1)
    if i >= tl.load(num_blocks_ptr + r):
        return
    blen = tl.load(block_len_ptr + r * M + i)
    phys = tl.load(block_table_ptr + r * M + i).to(tl.int64)
    shift = tl.load(block_shift_ptr + r * M + i).to(tl.int64)
    o = tl.arange(0, BLOCK_S)
    d = tl.arange(0, DP)
    mask = (o < blen)[:, None] & (d < D)[None, :]
    k_rows = k_ptr + phys * stride_kn + o * stride_ks + h * stride_kh
    k = tl.load(k_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    # The partner channels by a second load of the same rows (hot in L1). A product with
    # a [DP, DP] permutation matrix kept this load contiguous, but the matrix alone took
    # 256 KiB of shared memory at head dim 256 in float32, over sm_90's 227 KiB.
    kp = tl.load(k_rows[:, None] + tl.load(partner_ptr + d)[None, :], mask=mask, other=0.0).to(tl.float32)
    freq = tl.load(freq_ptr + d)[None, :]
    n = tl.zeros([BLOCK_S, 1], tl.int64) + shift
    k = rotate_tile(k, kp, n, freq, 1.0)
    v = tl.load(v_ptr + phys * stride_vn + (o * stride_vs + h * stride_vh)[:, None] + d[None, :], mask=mask, other=0.0)
    dest = (r * M + i).to(tl.int64) * stride_on + (o * stride_os + h * stride_oh)[:, None] + d[None, :]
    tl.store(k_out_ptr + dest, round_to(k, k_out_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)
    tl.store(v_out_ptr + dest, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def materialise(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: BlockMetadata,
    tables: RopeTables,
    dtype: torch.dtype,
):
    """Copy each request's blocks, keys re-rotated to logical positions (eq. 9).

    Args:
        dtype: dtype of the copy. The cache dtype is what Block-Attention writes (the
            benchmark's baseline); float32 keeps the re-rotated keys unrounded, as the
            reference's eager definition does (``fast.eager_attention``).

    Returns:
        ``k [B·M, S, Hkv, D]``, ``v [B·M, S, Hkv, D]`` and the :class:`BlockMetadata` of
        the copy: block ``i`` of request ``r`` is block ``r·M + i``, every shift 0.
    """
    _, s, hkv, d = k_cache.shape
    b, m = meta.block_table.shape
    k_out = buffers.empty((b * m, s, hkv, d), dtype, k_cache.device)
    v_out = buffers.empty((b * m, s, hkv, d), dtype, v_cache.device)
    dp = tables.freq.shape[0]
    _materialise_kernel[(b * m, hkv)](
        k_ptr=k_cache, v_ptr=v_cache, k_out_ptr=k_out, v_out_ptr=v_out,
        block_table_ptr=meta.block_table, block_shift_ptr=meta.block_shift, block_len_ptr=meta.block_len,
        num_blocks_ptr=meta.num_blocks,
        freq_ptr=tables.freq, partner_ptr=tables.partner,
        D=d, M=m,
        stride_kn=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vn=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_on=k_out.stride(0), stride_os=k_out.stride(1), stride_oh=k_out.stride(2),
        BLOCK_S=max(16, triton.next_power_of_2(s)), DP=dp,
        EMULATE_RTNE=emulate_rtne(dtype, k_cache.device),
    )  # fmt: skip
    table = torch.arange(b * m, dtype=torch.int32, device=k_cache.device).view(b, m)
    copied = meta._replace(block_table=table, block_shift=torch.zeros_like(meta.block_shift))
    return k_out, v_out, copied
