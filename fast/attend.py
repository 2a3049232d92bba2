"""The attention kernel behind every fast attention function, and the split merge.

One Triton kernel serves prefill and decode, lazy, raw and materialised keys. It
mirrors ``reference/attention.py``: a program takes a tile of one request's queries,
walks that request's cached blocks (segments first, own tokens last) and keeps an online
softmax (eq. 11). What changes between the functions is a compile-time ``MODE``:

* ``LAZY`` (eq. 8): keys as stored; the *query* tile is rotated by ``p − δ`` from the
  pre-RoPE query, once per run of blocks with equal shift ``δ``, never per key.
* ``RAW`` (eq. 10): keys stored unrotated; every key tile is rotated at its logical
  positions (the ablation), the query once at its own position.
* ``NONE``: no rotation at all — the same kernel with RoPE switched off, the baseline
  that measures what the rotation costs. Not reachable from the public API.

The eager/materialise path (eq. 9) re-rotates the keys into a fresh cache with every
shift 0 (``fast/cache.py``) and then runs ``LAZY``: with ``δ = 0``, ``R(p − δ) q`` is
exactly the query at its own position.

**Tiles.** Grid ``(query tiles, B, Hkv · splits)``. GQA is packed into the M dimension
(:func:`plan`): row ``r`` of a ``[BLOCK_M, DP]`` query tile is query token
``r // GP`` and head ``r % GP`` of the KV head's group of ``G = H / Hkv`` heads, so a key
tile, loaded once, serves the whole group. ``GP`` is ``G`` padded to a power of two (at
least 16 for decode, where ``BLOCK_Q = 1``); padded rows are masked.

**Key tiles over paged blocks, in runs of equal shift.** A request's blocks are walked
in *runs*: maximal ranges of consecutive blocks with one shift ``δ`` (a segment; the own
tokens). At the start of a run the query tile is rotated by ``p − δ`` (eq. 8) from the
pre-RoPE query — once per run, never per key — and an inner loop walks the run's slots
``[first·S, end·S)`` in key tiles of ``BLOCK_N`` slots, whatever the block size: slot
``j`` is token ``o = j mod S`` of block ``i = j // S`` (each row gathers its block's
physical id), valid while ``o < block_len[i]`` and ``j`` is inside the run. That inner
loop holds nothing but loads, two matrix products and the softmax update, so the
compiler software-pipelines it. Runs are found with a vector scan of the block shifts
(:func:`_shift_run_end`).

**Masks** (eq. 7): a key is visible when it is a valid slot and either belongs to a
segment block (``i < num_segment_blocks``) or its logical position is ``<=`` the
query's. Own blocks wholly after a tile's last query are never visited.

**Decode** uses the same kernel with ``BLOCK_Q = 1`` and splits each request's blocks
among ``splits`` programs (flash-decoding): each writes the attention over its own keys
and their log-sum-exp, and :func:`_merge_kernel` combines the parts (eq. 12).

Shape alphabet: ``B`` requests, ``H`` heads, ``Hkv`` KV heads, ``G = H / Hkv``, ``Tq``
query tokens, ``D`` head dim (``DP`` padded to a power of two), ``N`` blocks,
``S`` block size, ``M`` blocks per request (padded), ``P`` splits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..reference.layout import BlockMetadata
from . import buffers
from .rope import RopeTables, rope_cos_sin, rotate_tile
from .rounding import emulate_rtne, round_to

__all__ = ["LAZY", "RAW", "NONE", "Plan", "plan", "attend", "merge_partials"]

LAZY = 0
RAW = 1
NONE = 2

LOG2E = 1.4426950408889634  # the kernel works in base 2: scores carry scale · log2(e)


# --------------------------------------------------------------------------- device code


@triton.jit
def _rotated_query(
    x,
    xp,
    n_tok,
    freq,
    mscale,
    qk_scale,
    BLOCK_Q: tl.constexpr,
    GP: tl.constexpr,
    DP: tl.constexpr,
    ROTATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """The query tile ``m R(n) q · qk_scale`` in the dot dtype, ``[BLOCK_M, DP]``.

    ``x`` is the pre-RoPE query tile and ``xp`` the same tile read from a copy of the
    query whose channels were permuted to their rotation partners on the host
    (``q[..., partner]``): both loads are contiguous and vectorised, where a gather of the
    partner channels would need one address per element, and those addresses alone
    overflow the register file. The callers reload both from memory at each run rather
    than keep a float32 copy in registers: a run starts rarely, and the tile is hot in
    L1/L2. Angles are computed per token (``n_tok [BLOCK_Q, 1]``) and broadcast over the
    ``GP`` heads of the group, so trigonometry costs ``1/G`` of the tile.
    """
    x = x.to(tl.float32)
    if ROTATE:
        cos, sin = rope_cos_sin(n_tok, freq)  # exact reduction, fast/rope.py
        cos = tl.reshape(tl.broadcast_to(cos[:, None, :], (BLOCK_Q, GP, DP)), (BLOCK_Q * GP, DP))
        sin = tl.reshape(tl.broadcast_to(sin[:, None, :], (BLOCK_Q, GP, DP)), (BLOCK_Q * GP, DP))
        x = (x * cos + xp.to(tl.float32) * sin) * mscale
    return (x * qk_scale).to(DOT_DTYPE)


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One step of the online softmax (eq. 11) in base 2; ``s`` already masked.

    Rows that have seen no visible key yet keep ``m = −inf``; their exponentials are
    taken against 0 so that no ``−inf − (−inf)`` NaN appears.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _shift_run_end(shift_row, i, shift, end_block, SCAN: tl.constexpr):
    """First block after ``i`` whose shift differs from ``shift`` (or ``end_block``).

    Scans ``SCAN`` blocks' shifts per step, so a segment of many blocks costs a few
    vector loads, not one dependent load per block.
    """
    run_end = end_block
    k = i + 1
    while k < run_end:
        idx = k + tl.arange(0, SCAN)
        sh = tl.load(shift_row + idx, mask=idx < run_end, other=shift)
        run_end = tl.minimum(run_end, tl.min(tl.where(sh != shift, idx, run_end), 0))
        k += SCAN
    return run_end


@triton.jit
def _key_tile(
    q, m_i, l_i, acc, j0, slot_end,
    k_ptr, v_ptr, block_table_row, block_pos_row, block_len_row,
    num_seg, q_pos, q_pos_min, kv_head, d, d_ok, freq, partner, mscale,
    stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
    S: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile: slots ``j0 .. j0 + BLOCK_N`` of a run ending at slot ``slot_end``.

    Every key of the tile has the run's shift, whose rotation is already in ``q``.
    Masks are applied only when the tile needs them: a slot past the run or past its
    block's valid length, or an own key after some query of the tile (eq. 7).
    """
    j = j0 + tl.arange(0, BLOCK_N)
    i = j // S  # the request's block of each slot
    o = j % S
    in_run = j < slot_end
    phys = tl.load(block_table_row + i, mask=in_run, other=0).to(tl.int64)
    blen = tl.load(block_len_row + i, mask=in_run, other=0)
    kpos = tl.load(block_pos_row + i, mask=in_run, other=0) + o  # logical positions
    valid = in_run & (o < blen)
    kv_mask = valid[:, None] & d_ok[None, :]
    k_rows = k_ptr + phys * stride_kn + o * stride_ks + kv_head * stride_kh
    v_rows = v_ptr + phys * stride_vn + o * stride_vs + kv_head * stride_vh
    k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if MODE == 1:
        # Raw cache (eq. 10): rotate every key at its logical position, m R(pos) k.
        kp = tl.load(k_rows[:, None] + partner, mask=kv_mask, other=0.0).to(tl.float32)
        k = rotate_tile(k.to(tl.float32), kp, kpos.to(tl.int64)[:, None], freq, mscale)
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
    is_seg = i < num_seg
    all_valid = tl.min(valid.to(tl.int32), 0) > 0
    latest_own = tl.max(tl.where(is_seg, -1, kpos), 0)
    if not (all_valid & (latest_own <= q_pos_min)):
        visible = valid[None, :] & (is_seg[None, :] | (kpos[None, :] <= q_pos[:, None]))  # eq. (7)
        s = tl.where(visible, s, float("-inf"))
    return _softmax_update(s, v, m_i, l_i, acc, DOT_DTYPE, PRECISION)


@triton.jit(do_not_specialize=["G", "D", "blocks_per_split", "splits"])
def _attention_kernel(
    # tensors
    q_ptr,
    qp_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    # BlockMetadata, [B, M] and [B] / [B + 1] int32
    block_table_ptr,
    block_pos_ptr,
    block_shift_ptr,
    block_len_ptr,
    num_blocks_ptr,
    num_segment_blocks_ptr,
    query_start_ptr,
    cu_queries_ptr,
    # RopeTables, [DP]
    freq_ptr,
    partner_ptr,
    mscale_ptr,
    # scalars
    qk_scale,
    stride_qt,
    stride_qh,
    stride_pt,
    stride_ph,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_op,
    stride_lt,
    stride_lh,
    stride_meta,
    G,
    D,
    blocks_per_split,
    splits,
    # compile-time
    BLOCK_Q: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DP: tl.constexpr,
    S: tl.constexpr,
    MODE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GP
    # Heaviest tiles (last queries: most own keys) first, for a better tail.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    r = tl.program_id(1)
    kv_head = tl.program_id(2) // splits
    split = tl.program_id(2) % splits

    q_lo = tl.load(cu_queries_ptr + r)
    num_q = tl.load(cu_queries_ptr + r + 1) - q_lo
    if q_tile * BLOCK_Q >= num_q:
        return

    # ---- the query tile: row = (token, head of the group)
    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GP  # query index inside the request
    g = rows % GP
    row_ok = (tok < num_q) & (g < G)
    head = kv_head * G + g
    q_rows = q_ptr + (q_lo + tok).to(tl.int64) * stride_qt + head * stride_qh
    qp_rows = qp_ptr + (q_lo + tok).to(tl.int64) * stride_pt + head * stride_ph
    d = tl.arange(0, DP)
    d_ok = d < D
    freq = tl.load(freq_ptr + d)[None, :]
    partner = tl.load(partner_ptr + d)[None, :]
    mscale = tl.load(mscale_ptr + d)[None, :]

    # Positions: int32 for masks (the layout keeps them below 2^31), int64 for angles.
    q_first = tl.load(query_start_ptr + r)
    q_pos = q_first + tok  # [BLOCK_M]
    q_pos_min = q_first + q_tile * BLOCK_Q
    q_pos_tok = (q_first.to(tl.int64) + q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q))[:, None]  # [BLOCK_Q, 1]
    last_q_pos = q_first + tl.minimum(num_q, (q_tile + 1) * BLOCK_Q) - 1

    # ---- which blocks this tile needs: all segment blocks, own blocks up to the last query
    meta = r * stride_meta
    num_seg = tl.load(num_segment_blocks_ptr + r)
    num_blk = tl.load(num_blocks_ptr + r)
    own_start = tl.load(block_pos_ptr + meta + num_seg)
    end_block = num_seg + tl.minimum(num_blk - num_seg, (last_q_pos - own_start) // S + 1)
    block_lo = split * blocks_per_split  # decode: this program's share of the blocks
    block_hi = tl.minimum(block_lo + blocks_per_split, end_block)

    # ---- the query, rotated here unless it depends on the run's shift (LAZY)
    q_mask = row_ok[:, None] & d_ok[None, :]
    if MODE == 0:
        q = tl.zeros([BLOCK_M, DP], dtype=DOT_DTYPE)  # set at the start of each run
    else:
        x = tl.load(q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
        xp = tl.load(qp_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
        q = _rotated_query(x, xp, q_pos_tok, freq, mscale, qk_scale, BLOCK_Q, GP, DP, MODE == 1, DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)

    # ---- runs of blocks with one shift; key tiles inside each run
    b = block_lo
    while b < block_hi:
        if MODE == 0:
            # The query loads go first: they do not depend on the shift, so their
            # latency overlaps that of the shift loads and the scan.
            x = tl.load(q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
            xp = tl.load(qp_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
            shift = tl.load(block_shift_ptr + meta + b)
            run_end = _shift_run_end(block_shift_ptr + meta, b, shift, block_hi, 64)
            # Eq. (8): the query at p − δ, once for the whole run.
            q = _rotated_query(x, xp, q_pos_tok - shift.to(tl.int64), freq, mscale, qk_scale,
                               BLOCK_Q, GP, DP, True, DOT_DTYPE)  # fmt: skip
        else:
            run_end = block_hi
        for j0 in range(b * S, run_end * S, BLOCK_N):
            m_i, l_i, acc = _key_tile(
                q, m_i, l_i, acc, j0, run_end * S,
                k_ptr, v_ptr, block_table_ptr + meta, block_pos_ptr + meta, block_len_ptr + meta,
                num_seg, q_pos, q_pos_min, kv_head, d, d_ok, freq, partner, mscale,
                stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
                S, BLOCK_N, MODE, DOT_DTYPE, PRECISION,
            )  # fmt: skip
        b = run_end

    # ---- write: the normalised output, or this split's partial (decode)
    out_rows = (q_lo + tok).to(tl.int64) * stride_ot + head * stride_oh
    lse_rows = (q_lo + tok).to(tl.int64) * stride_lt + head * stride_lh
    has_keys = l_i > 0.0
    # lse in natural log (eq. 11): the running max and sum are base 2, hence the ln 2.
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SPLIT:
        out_rows += split * stride_op
        lse_rows += split
    out_mask = row_ok[:, None] & d_ok[None, :]
    out = round_to(out, out_ptr.dtype.element_ty, EMULATE_RTNE)
    tl.store(out_ptr + out_rows[:, None] + d[None, :], out, mask=out_mask)
    if WRITE_LSE:
        tl.store(lse_ptr + lse_rows, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    P,
    D,
    stride_pt,
    stride_ph,
    stride_pp,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    stride_rt,
    stride_rh,
    PP: tl.constexpr,
    DP: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """Combine ``P`` partial attentions of one (token, head) by log-sum-exp (eq. 12).

    ``lse = log Σ_p e^{lse_p}``, ``out = Σ_p e^{lse_p − lse} out_p``; a part that saw no
    key has ``lse_p = −inf`` and weight 0.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.arange(0, PP)
    d = tl.arange(0, DP)
    p_ok = p < P
    lse_p = tl.load(part_lse_ptr + t * stride_lt + h * stride_lh + p, mask=p_ok, other=float("-inf"))
    top = tl.max(lse_p, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse_p - top)
    total = tl.sum(w, 0)
    parts = tl.load(
        part_ptr + t * stride_pt + h * stride_ph + p[:, None] * stride_pp + d[None, :],
        mask=p_ok[:, None] & (d < D)[None, :] & (w > 0.0)[:, None],
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    lse = tl.where(total > 0.0, top + tl.log(total), float("-inf"))
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, round_to(out, out_ptr.dtype.element_ty, EMULATE_RTNE),
             mask=d < D)
    tl.store(lse_ptr + t * stride_rt + h * stride_rh, lse)


# --------------------------------------------------------------------------- host code


class Plan(NamedTuple):
    """Tile sizes and launch shape of one attention call (see the module docstring)."""

    block_q: int
    gp: int
    block_n: int
    dp: int
    splits: int
    num_warps: int
    num_stages: int


def _dot_dtype(dtype: torch.dtype, device: torch.device):
    """Triton dtype of the matrix products: the input dtype, except bf16 under the
    interpreter, whose bf16 arithmetic is wrong upstream (products are done in fp32)."""
    if dtype == torch.bfloat16:
        return tl.float32 if device.type == "cpu" else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def plan(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    decode: bool,
    work_items: int,
    max_key_slots: int,
) -> Plan:
    """Choose tiles for one call.

    Args:
        work_items: programs before splitting (decode: ``B · Hkv``).
        max_key_slots: longest request's blocks times the block size, an upper bound of
            its key slots; decode splits them so that the GPU is filled.
    """
    g = num_heads // num_kv_heads
    dp = max(16, triton.next_power_of_2(head_dim))
    interpret = device.type == "cpu"
    wide = dtype == torch.float32 or dp > 128
    if interpret:
        # Small tiles under the interpreter: the tests then cross many tile boundaries.
        block_m, block_n = 16, 16
    elif decode:
        block_m, block_n = 16, 32 if wide else 128
    elif wide:
        block_m, block_n = 64, 32
    else:
        block_m, block_n = 128, 128 if dp == 128 else 64
    if decode:
        gp, block_q = max(16, triton.next_power_of_2(g)), 1
    else:
        gp = triton.next_power_of_2(g)
        block_q = max(1, block_m // gp)  # a group wider than the tile gets a tile alone
    splits = 1
    if decode and not interpret:
        # Flash-decoding: about four programs per SM, at least 4 key tiles per split.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = triton.cdiv(max_key_slots, block_n)
        splits = max(1, min(triton.cdiv(4 * sms, max(1, work_items)), tiles // 4, 64))
    elif decode:
        splits = 2 if max_key_slots > 2 * block_n else 1  # exercise the merge under the interpreter
    rows = block_q * gp
    # From a sweep on the H100 (benchmarks/kernels.py --sweep), bf16, S = 64.
    num_warps = 8 if rows * dp >= 128 * 128 else 4
    num_stages = 2 if wide or (not decode and dp == 128) else 3
    return Plan(block_q, gp, block_n, dp, splits, num_warps, num_stages)


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
):
    """Launch the attention kernel (and the merge when decode splits the keys).

    Args:
        q: ``[Tq, H, D]`` pre-RoPE queries (``Tq = B`` for decode).
        k_cache, v_cache: ``[N, S, Hkv, D]``.
        meta: the layout's :class:`BlockMetadata` on ``q``'s device.
        tables: rotation tables padded to this call's ``DP``.
        max_queries: the largest ``num_queries`` of a request.
        scale: softmax scale.
        mode: :data:`LAZY`, :data:`RAW` or :data:`NONE`.
        tiles: a :class:`Plan` to use instead of :func:`plan`'s (benchmark sweeps).

    Returns:
        ``out [Tq, H, D]`` in ``q.dtype`` and ``lse [Tq, H]`` float32 (or ``None``).
    """
    tq, h, d = q.shape
    _, s, hkv, _ = k_cache.shape
    b, m = meta.block_table.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("lazyattention.fast needs the head dimension of q, k_cache and v_cache contiguous")
    pl = tiles or plan(h, hkv, d, s, q.dtype, q.device, decode, b * hkv, m * s)
    if tables.freq.shape[0] != pl.dp:
        raise ValueError(f"rope tables padded to {tables.freq.shape[0]} channels, the plan needs {pl.dp}")
    out = buffers.empty((tq, h, d), q.dtype, q.device)
    lse = buffers.empty((tq, h), torch.float32, q.device)
    blocks_per_split = triton.cdiv(m, pl.splits)
    if pl.splits > 1:
        part = buffers.empty((tq, h, pl.splits, d), torch.float32, q.device)
        part_lse = buffers.empty((tq, h, pl.splits), torch.float32, q.device)
        dest, dest_lse = part, part_lse
        stride_op = part.stride(2)
    else:
        dest, dest_lse = out, lse
        stride_op = 0
    # The query with its channels permuted to their rotation partners (see _rotated_query).
    q_partner = q.index_select(-1, tables.partner[:d].long()) if mode != NONE else q
    grid = (triton.cdiv(max_queries, pl.block_q), b, hkv * pl.splits)
    _attention_kernel[grid](
        q, q_partner, k_cache, v_cache, dest, dest_lse,
        *meta,
        tables.freq, tables.partner, tables.mscale,
        scale * LOG2E,
        q.stride(0), q.stride(1), q_partner.stride(0), q_partner.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        dest.stride(0), dest.stride(1), stride_op,
        dest_lse.stride(0), dest_lse.stride(1),
        meta.block_table.stride(0),
        h // hkv, d, blocks_per_split, pl.splits,
        BLOCK_Q=pl.block_q, GP=pl.gp, BLOCK_N=pl.block_n, DP=pl.dp, S=s,
        MODE=mode, SPLIT=pl.splits > 1,
        DOT_DTYPE=_dot_dtype(q.dtype, q.device),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WRITE_LSE=return_lse or pl.splits > 1,
        EMULATE_RTNE=emulate_rtne(dest.dtype, q.device),
        num_warps=pl.num_warps, num_stages=pl.num_stages,
    )  # fmt: skip
    if pl.splits > 1:
        merge_partials(part, part_lse, out, lse)
    return out, (lse if return_lse else None)


def merge_partials(part: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``out [T, H, D]``, ``lse [T, H]`` from ``part [T, H, P, D]``, ``part_lse [T, H, P]`` (eq. 12)."""
    t, h, p, d = part.shape
    if t == 0:
        return
    if part.stride(-1) != 1 or out.stride(-1) != 1 or part_lse.stride(-1) != 1:
        raise ValueError("merge needs the last dimension of its tensors contiguous")
    _merge_kernel[(t, h)](
        part, part_lse, out, lse, p, d,
        part.stride(0), part.stride(1), part.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1),
        PP=max(2, triton.next_power_of_2(p)), DP=max(16, triton.next_power_of_2(d)),
        EMULATE_RTNE=emulate_rtne(out.dtype, out.device),
    )  # fmt: skip


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale``, or ``1/sqrt(D)`` when ``None`` — as the reference."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
