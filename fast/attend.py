"""The attention kernel behind every fast attention function, and the split merge.

One Triton kernel serves prefill and decode, lazy, raw and materialised keys. It
mirrors ``reference/attention.py``: a program takes a tile of one request's queries,
walks that request's cached blocks (segments first, own tokens last) and keeps an online
softmax (eq. 11). What changes between the functions is a compile-time ``MODE``:

* ``LAZY`` (eq. 8): keys as stored; the *query* tile is rotated by ``p − δ``, once per
  run of blocks with equal shift ``δ``, never per key.
* ``RAW`` (eq. 10): keys stored unrotated; every key tile is rotated at its logical
  positions (the ablation), the query once at its own position.
* ``NONE``: no rotation at all — the same kernel with RoPE switched off, the baseline
  that measures what the rotation costs. Not reachable from the public API.

The eager/materialise path (eq. 9) re-rotates the keys into a fresh cache with every
shift 0 (``fast/cache.py``) and then runs ``LAZY``: with ``δ = 0``, ``R(p − δ) q`` is
exactly the query at its own position.

**The query, rotated in two steps.** ``R(p − δ) = R(−δ) R(p)``. A first small kernel
(:func:`_query_kernel`) writes ``y = m R(p) q`` in float32 for every query, and
``y`` read at the partner channels; at the start of a run the attention kernel then
needs only cos and sin of one ``[D]`` vector of angles ``−δ·θ`` to rotate the whole tile,
``q = y·cos + y_partner·sin`` — the per-token trigonometry is done once per query, not
once per run.

**Decode rotates the raw query itself** (``Plan.direct``). A tile of one token
(``BLOCK_Q = 1``: decode) has every row at one position ``p``, so ``R(p − δ)`` directly
costs the same one ``[D]`` vector of angles as ``R(−δ)``. There (16-bit inputs, key tiles
inside one block) the attention kernel reads the pre-RoPE query (kept in its input
dtype, exact, through the key loop) and rotates it at each run: no query kernel to launch
and wait for, no ``y`` to reload, one rounding fewer.

**Tiles.** Grid ``(query tiles, B, Hkv · splits)``. GQA is packed into the M dimension
(:func:`plan`): row ``r`` of a ``[BLOCK_M, DP]`` query tile is query token
``r // GP`` and head ``r % GP`` of the KV head's group of ``G = H / Hkv`` heads, so a key
tile, loaded once, serves the whole group. ``GP`` is ``G`` padded to a power of two (at
least 16 for decode, where ``BLOCK_Q = 1``); padded rows are zero and never stored.
``y`` is laid out ``[Hkv, Tq, GP, D]`` so that a query tile is one contiguous box.

**Bulk tensor copies.** On Hopper, key, value and query tiles arrive by TMA
(``TensorDescriptor``): the caches are seen as ``[N·S, Hkv·D]`` matrices and a key tile
of ``BLOCK_N`` slots inside one block is one ``[BLOCK_N, D]`` box at row
``block_table[i]·S + offset``. That needs ``S % BLOCK_N == 0`` and an unpadded head dim;
otherwise (small or odd blocks, head dims 80 or 96) each row of a key tile gathers its
own block's physical id through pointers — the same results, slower. Loading ``y``
through a ``[BLOCK_M, D]`` tile of 64-bit pointers once per run made the compiler spill
over a kilobyte per thread; the descriptor load does not.

**Key tiles over paged blocks, in runs.** A request's blocks are walked in *runs*:
maximal ranges of consecutive blocks with one shift ``δ`` that end after the first
partly filled block (:func:`_run_end`, a vector scan of 64 blocks' shifts and lengths at
a time). Every block of a run but its last is therefore full, and the run's valid slots
are one contiguous range ``[first·S, valid_end)``. At the start of a run the query tile
is rotated (above); then a first loop walks the key tiles that need **no mask** —
every slot valid and visible to every query of the tile — and a second loop the run's
last tiles, which do (eq. 7): slots past ``valid_end`` (which may hold anything: their
values are zeroed), and own keys after some query of the tile. Each loop holds nothing
but loads, two matrix products and the softmax update, so the compiler
software-pipelines it. Own blocks wholly after a tile's last query are never visited.

**One key loop across runs** (``Plan.flat``, with the direct rotation: decode at
head dims above 64, as timed on an H200). Each run restart drains the
pipeline: the next run's first key tiles are requested only after its query is
re-rotated. Where a key tile never spans two blocks (``S % BLOCK_N == 0``), the scan
instead stops only after partly filled blocks, and each key tile reads its block's shift
and re-rotates the query where it changes — inside the pipelined loop, so the next
tiles' loads are already in flight. Prefill keeps the loop per run: with the two-step
rotation the reload of ``y`` inside the flat loop spills (704 bytes, ptxas on sm_90) and
was 2–13% slower on an H200, and rotating each row of a prefill tile directly spilled
1.4 KB and was 2.2× slower (``benchmarks/sweeps/tune_prefill_h200.json``).

**Split-KV.** Decode uses the same kernel with ``BLOCK_Q = 1`` and splits each request's
blocks among ``splits`` programs (flash-decoding): each writes the attention over its own
keys and their log-sum-exp, and :func:`_merge_kernel` combines the parts (eq. 12).
Prefill splits the same way when its grid (query tiles × B × Hkv) is smaller than the
GPU (:func:`prefill_splits`): a short question over many retrieved documents, one
request, would otherwise leave most SMs idle.

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
from triton.tools.tensor_descriptor import TensorDescriptor

from lazyattention.reference.layout import BlockMetadata

from . import buffers
from .rope import RopeTables, rope_cos_sin, rotate_tile
from .rounding import dot_dtype, emulate_rtne, round_to

__all__ = ["LAZY", "RAW", "NONE", "Plan", "plan", "prefill_splits", "attend", "merge_partials"]

LAZY = 0
RAW = 1
NONE = 2

LOG2E = 1.4426950408889634  # the kernel works in base 2: scores carry scale · log2(e)


# --------------------------------------------------------------------------- device code


@triton.jit
def _query_kernel(
    q_ptr,
    y_ptr,
    query_start_ptr,
    cu_queries_ptr,
    freq_ptr,
    partner_ptr,
    mscale_ptr,
    stride_qt,
    stride_qh,
    stride_yw,
    stride_yh,
    stride_yt,
    G,
    D,
    BLOCK_T: tl.constexpr,
    GP: tl.constexpr,
    DP: tl.constexpr,
    ROTATE: tl.constexpr,
    PARTNER: tl.constexpr,
):
    """The query at its own position, ``y = m R(p) q`` in float32 (the softmax scale is
    applied to the scores, after the product, as the reference does),
    laid out ``[W, Hkv, Tq, GP, DP]`` so that a query tile of the attention kernel
    (``BLOCK_Q`` tokens × the ``GP`` heads of one group) is one contiguous box for a
    bulk tensor copy. Padded heads ``g ≥ G`` and channels ``d ≥ D`` are written as 0.

    With ``PARTNER`` also ``w = 1``: ``y`` read at the partner channels,
    ``y[partner(d)]``, so the attention kernel can rotate ``y`` further by ``−δ`` with two
    contiguous loads. Since ``F[partner(d)] = −F[d]`` (``fast/rope.py``),
    ``y[partner(d)] = m (x[partner(d)] cos(n F[d]) − x[d] sin(n F[d]))``.
    Grid ``(token tiles, B, Hkv)``.
    """
    r = tl.program_id(1)
    kv_head = tl.program_id(2)
    rows = tl.arange(0, BLOCK_T * GP)
    tok = tl.program_id(0) * BLOCK_T + rows // GP
    g = rows % GP
    q_lo = tl.load(cu_queries_ptr + r)
    num_q = tl.load(cu_queries_ptr + r + 1) - q_lo
    tok_ok = tok < num_q
    row_ok = tok_ok & (g < G)
    d = tl.arange(0, DP)
    mask = row_ok[:, None] & (d < D)[None, :]
    t = (q_lo + tok).to(tl.int64)
    src = q_ptr + t[:, None] * stride_qt + (kv_head * G + g)[:, None] * stride_qh
    x = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    dst = y_ptr + kv_head * stride_yh + t[:, None] * stride_yt + g[:, None] * DP + d[None, :]
    if ROTATE:
        freq = tl.load(freq_ptr + d)[None, :]
        partner = tl.load(partner_ptr + d)[None, :]
        scale = tl.load(mscale_ptr + d)[None, :]
        xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
        n = (tl.load(query_start_ptr + r) + tok).to(tl.int64)[:, None]
        cos, sin = rope_cos_sin(n, freq)  # exact reduction, fast/rope.py
        tl.store(dst, (x * cos + xp * sin) * scale, mask=tok_ok[:, None])
        if PARTNER:
            tl.store(dst + stride_yw, (xp * cos - x * sin) * scale, mask=tok_ok[:, None])
    else:
        tl.store(dst, x, mask=tok_ok[:, None])


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc, MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One step of the online softmax (eq. 11) in base 2; ``s`` already masked.

    In a masked tile, rows that have seen no visible key yet keep ``m = −inf``; their
    exponentials are taken against 0 so that no ``−inf − (−inf)`` NaN appears. An
    unmasked tile gives every row a finite score, so it skips that guard.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """The online softmax's result (eq. 11): ``out = acc / l`` and ``lse`` in natural log
    (the running max and sum are base 2, hence the ln 2); a row that saw no key gets
    ``lse = −inf`` and a zero output."""
    has_keys = l_i > 0.0
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    return out, lse


@triton.jit
def _run_end(shift_row, len_row, b, end_block, S: tl.constexpr, BY_SHIFT: tl.constexpr, SCAN: tl.constexpr):
    """The run that starts at block ``b``: ``(end block, shift, valid slots of its last block)``.

    A run ends before the first block whose shift differs (``BY_SHIFT``), or after the
    first partly filled block, or at ``end_block``: every block of a run but its last is
    then full, so the run's valid slots are one contiguous range. Scans ``SCAN`` blocks
    per step, so a segment of many blocks costs a few vector loads, not one dependent load
    per block; the last block's length comes out of the same loads.
    """
    shift = tl.load(shift_row + b)
    run_end = end_block
    last_len = S
    k = b
    while k < run_end:
        idx = k + tl.arange(0, SCAN)
        inside = idx < run_end
        length = tl.load(len_row + idx, mask=inside, other=S)
        stop = tl.where(length < S, idx + 1, run_end)
        if BY_SHIFT:
            sh = tl.load(shift_row + idx, mask=inside, other=shift)
            stop = tl.minimum(stop, tl.where(sh != shift, idx, run_end))
        run_end = tl.minimum(run_end, tl.min(stop, 0))
        # The last block's length, once the run's end is known to lie in this chunk. A
        # run that ends at the chunk's start ended on a full block (a partial one stops
        # the run), which `last_len = S` already says.
        ends_here = (run_end - 1 >= k) & (run_end - 1 < k + SCAN)
        last_len = tl.where(ends_here, tl.sum(tl.where(idx == run_end - 1, length, 0), 0), last_len)
        k += SCAN
    return run_end, shift, last_len


@triton.jit
def _key_tile(
    q, m_i, l_i, acc, j0, valid_end, own_slot0, own_start, q_pos, qk_scale,
    k_ptr, v_ptr, k_desc, v_desc, table_row, pos_row, kv_head, d, d_ok, freq, partner, mscale,
    stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
    S: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, MODE: tl.constexpr, MASKED: tl.constexpr,
    TMA: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile: slots ``j0 .. j0 + BLOCK_N`` of the current run.

    ``TMA``: the tile lies in one block (``S % BLOCK_N == 0``); one read of the block
    table, then a bulk tensor copy of ``[BLOCK_N, D]`` keys and values. Otherwise each row
    gathers its own block's physical id (a tile may straddle blocks).

    ``MASKED`` (eq. 7): only the run's last tiles are masked — slots past the run's valid
    end (``valid_end``), and own keys after some query of the tile (the own key in slot
    ``j ≥ own_slot0`` is at position ``own_start + j − own_slot0``). The tiles before
    need no mask at all: every slot is valid and visible to every query.
    """
    j = j0 + tl.arange(0, BLOCK_N)
    valid = j < valid_end
    if TMA:
        row = tl.load(table_row + j0 // S).to(tl.int32) * S + j0 % S
        k = k_desc.load([row, kv_head * DP])
        v = v_desc.load([row, kv_head * DP])
        if MASKED:
            v = tl.where(valid[:, None], v, 0.0)  # slots past the end may hold anything
    else:
        i = j // S
        o = j % S
        if MASKED:
            phys = tl.load(table_row + i, mask=valid, other=0).to(tl.int64)
            kv_mask = valid[:, None] & d_ok[None, :]
        else:
            phys = tl.load(table_row + i).to(tl.int64)
            kv_mask = d_ok[None, :]
        k_rows = k_ptr + phys * stride_kn + o * stride_ks + kv_head * stride_kh
        v_rows = v_ptr + phys * stride_vn + o * stride_vs + kv_head * stride_vh
        k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if MODE == 1:
            # Raw cache (eq. 10): rotate every key at its logical position, m R(pos) k.
            kpos = tl.load(pos_row + i, mask=valid, other=0) + o
            kp = tl.load(k_rows[:, None] + partner, mask=kv_mask, other=0.0).to(tl.float32)
            k = rotate_tile(k.to(tl.float32), kp, kpos.to(tl.int64)[:, None], freq, mscale)
    # The operands as the definition rounds them (docs/concepts/numerics.md); the scale,
    # times log2(e), on the float32 scores.
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
    if MASKED:
        own_pos = own_start + (j - own_slot0)
        visible = valid[None, :] & ((j < own_slot0)[None, :] | (own_pos[None, :] <= q_pos[:, None]))  # eq. (7)
        s = tl.where(visible, s, float("-inf"))
    return _softmax_update(s, v, m_i, l_i, acc, MASKED, DOT_DTYPE, PRECISION)


@triton.jit
def _query_at_shift(shift, y, yp, x, xp, q_at, freq_1d, mscale, DIRECT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The query tile rotated for keys of shift ``δ`` (eq. 8), as the dot's operand.

    ``DIRECT`` (one token per tile, at position ``q_at``): ``m R(p − δ) x`` from the
    pre-RoPE query ``x`` and its partner channels ``xp``. Otherwise
    ``R(p − δ) = R(−δ) R(p)`` from ``y = m R(p) x`` and its partner channels ``yp``
    (:func:`_query_kernel`). Either way one ``[DP]`` vector of angles.
    """
    if DIRECT:
        cos, sin = rope_cos_sin(q_at - shift.to(tl.int64), freq_1d)
        q = (x.to(tl.float32) * cos[None, :] + xp.to(tl.float32) * sin[None, :]) * mscale
    else:
        cos, sin = rope_cos_sin(tl.zeros([1], tl.int64) - shift.to(tl.int64), freq_1d)
        q = y * cos[None, :] + yp * sin[None, :]
    return q.to(DOT_DTYPE)


@triton.jit
def _requery(q, shift, shift_ptr, y_desc, y_row, y_rows_per_w, x, xp, q_at, freq_1d, mscale,
             DIRECT: tl.constexpr, DOT_DTYPE: tl.constexpr):  # fmt: skip
    """The flat key loop's query for the key tile whose block's shift is at ``shift_ptr``:
    ``q`` unchanged while the shift is, re-rotated (``y`` reloaded) where it changes."""
    tile_shift = tl.load(shift_ptr)
    if tile_shift != shift:
        if DIRECT:
            q = _query_at_shift(tile_shift, x, xp, x, xp, q_at, freq_1d, mscale, DIRECT, DOT_DTYPE)
        else:
            y_new = y_desc.load([y_row, 0])
            yp_new = y_desc.load([y_row + y_rows_per_w, 0])
            q = _query_at_shift(tile_shift, y_new, yp_new, x, xp, q_at, freq_1d, mscale, DIRECT, DOT_DTYPE)
    return q, tile_shift


@triton.jit(do_not_specialize=["G", "D", "blocks_per_split", "splits"])
def _attention_kernel(
    # tensors
    y_desc,
    q_ptr,
    k_ptr,
    v_ptr,
    k_desc,
    v_desc,
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
    y_rows_per_w,
    Tq,
    stride_qt,
    stride_qh,
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
    TMA: tl.constexpr,
    DIRECT: tl.constexpr,
    FLAT: tl.constexpr,
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
    # First row of this tile in the [W · Hkv · Tq · GP, DP] view of y (_query_kernel).
    y_row = (kv_head * Tq + q_lo + q_tile * BLOCK_Q) * GP
    d = tl.arange(0, DP)
    d_ok = d < D
    freq_1d = tl.load(freq_ptr + d)
    freq = freq_1d[None, :]
    partner = tl.load(partner_ptr + d)[None, :]
    mscale = tl.load(mscale_ptr + d)[None, :]

    # Positions (int32: the layout keeps them below 2^31).
    q_first = tl.load(query_start_ptr + r)
    q_pos = q_first + tok  # [BLOCK_M]
    first_q_pos = q_first + q_tile * BLOCK_Q
    last_q_pos = q_first + tl.minimum(num_q, (q_tile + 1) * BLOCK_Q) - 1

    # ---- which blocks this tile needs: all segment blocks, own blocks up to the last query
    meta = r * stride_meta
    num_seg = tl.load(num_segment_blocks_ptr + r)
    num_blk = tl.load(num_blocks_ptr + r)
    own_start = tl.load(block_pos_ptr + meta + num_seg)
    own_slot0 = num_seg * S
    end_block = num_seg + tl.minimum(num_blk - num_seg, (last_q_pos - own_start) // S + 1)
    block_lo = split * blocks_per_split  # decode: this program's share of the blocks
    block_hi = tl.minimum(block_lo + blocks_per_split, end_block)
    # Own slots before `visible_to_all` are visible to every query of the tile, those
    # from `visible_to_none` on to none (eq. 7).
    visible_to_all = own_slot0 + (first_q_pos - own_start) + 1
    visible_to_none = own_slot0 + (last_q_pos - own_start) + 1

    # ---- the query; the scale goes on the scores
    if DIRECT:
        # One token per tile (decode): every row is at the same position, so R(p − δ)
        # takes cos and sin of one [DP] vector of angles, as R(−δ) does. The kernel then
        # rotates the pre-RoPE query itself, kept in its input dtype (exact) through the
        # loop: no query kernel to launch and wait for, no y to reload at each run.
        q_rows = q_ptr + (q_lo + tok).to(tl.int64) * stride_qt + head * stride_qh
        x_mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(q_rows[:, None] + d[None, :], mask=x_mask, other=0.0)
        if MODE == 2:
            q = x.to(DOT_DTYPE)
        else:
            xp = tl.load(q_rows[:, None] + partner, mask=x_mask, other=0.0)
            q_at = tl.zeros([1], tl.int64) + first_q_pos.to(tl.int64)
            if MODE == 1:
                cos, sin = rope_cos_sin(q_at, freq_1d)
                q = ((x.to(tl.float32) * cos[None, :] + xp.to(tl.float32) * sin[None, :]) * mscale).to(DOT_DTYPE)
            else:
                q = tl.zeros([BLOCK_M, DP], dtype=DOT_DTYPE)  # set at the start of each run
        y, yp = 0, 0  # what _query_at_shift reads on the other path
    elif MODE == 0:
        q = tl.zeros([BLOCK_M, DP], dtype=DOT_DTYPE)  # set at the start of each run
        x, xp, q_at = 0, 0, 0
    else:
        q = y_desc.load([y_row, 0]).to(DOT_DTYPE)  # at its own position (_query_kernel)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)

    # ---- runs of blocks; unmasked key tiles, then the run's masked last tiles
    b = block_lo
    while b < block_hi:
        if MODE == 0 and not DIRECT:
            # y and its partner channels are reloaded at each run (hot in L2) by bulk
            # tensor copies: kept in registers through the key loop, or loaded through
            # a [BLOCK_M, DP] tile of 64-bit pointers, they made the compiler spill.
            # They go first, so that their latency overlaps the run's scan.
            y = y_desc.load([y_row, 0])
            yp = y_desc.load([y_row + y_rows_per_w, 0])
        run_end, shift, last_len = _run_end(block_shift_ptr + meta, block_len_ptr + meta, b, block_hi, S,
                                            MODE == 0 and not FLAT, 64)  # fmt: skip
        if MODE == 0:
            q = _query_at_shift(shift, y, yp, x, xp, q_at, freq_1d, mscale, DIRECT, DOT_DTYPE)
        run_lo = b * S
        valid_end = (run_end - 1) * S + last_len
        tile_end = tl.minimum(valid_end, visible_to_none)
        safe_end = tl.minimum(valid_end, visible_to_all)
        safe_end = tl.maximum(run_lo, run_lo + (safe_end - run_lo) // BLOCK_N * BLOCK_N)
        for j0 in range(run_lo, safe_end, BLOCK_N):
            if FLAT:
                q, shift = _requery(q, shift, block_shift_ptr + meta + j0 // S, y_desc, y_row, y_rows_per_w, x, xp,
                                    q_at, freq_1d, mscale, DIRECT, DOT_DTYPE)  # fmt: skip
            m_i, l_i, acc = _key_tile(
                q, m_i, l_i, acc, j0, valid_end, own_slot0, own_start, q_pos, qk_scale,
                k_ptr, v_ptr, k_desc, v_desc, block_table_ptr + meta, block_pos_ptr + meta,
                kv_head, d, d_ok, freq, partner, mscale,
                stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
                S, BLOCK_N, DP, MODE, False, TMA, DOT_DTYPE, PRECISION,
            )  # fmt: skip
        for j0 in range(safe_end, tile_end, BLOCK_N):
            if FLAT:
                q, shift = _requery(q, shift, block_shift_ptr + meta + j0 // S, y_desc, y_row, y_rows_per_w, x, xp,
                                    q_at, freq_1d, mscale, DIRECT, DOT_DTYPE)  # fmt: skip
            m_i, l_i, acc = _key_tile(
                q, m_i, l_i, acc, j0, valid_end, own_slot0, own_start, q_pos, qk_scale,
                k_ptr, v_ptr, k_desc, v_desc, block_table_ptr + meta, block_pos_ptr + meta,
                kv_head, d, d_ok, freq, partner, mscale,
                stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
                S, BLOCK_N, DP, MODE, True, TMA, DOT_DTYPE, PRECISION,
            )  # fmt: skip
        b = run_end

    # ---- write: the normalised output, or this split's partial (decode)
    out_rows = (q_lo + tok).to(tl.int64) * stride_ot + head * stride_oh
    lse_rows = (q_lo + tok).to(tl.int64) * stride_lt + head * stride_lh
    out, lse = _finish(m_i, l_i, acc)
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
    H,
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
    HB: tl.constexpr,
    PP: tl.constexpr,
    DP: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """Combine ``P`` partial attentions of one token's heads ``HB·j … HB·j + HB − 1`` by
    log-sum-exp (eq. 12); grid ``(T, ⌈H / HB⌉)``.

    ``lse = log Σ_p e^{lse_p}``, ``out = Σ_p e^{lse_p − lse} out_p``; a part that saw no
    key has ``lse_p = −inf`` and weight 0.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    p = tl.arange(0, PP)
    d = tl.arange(0, DP)
    h_ok = h < H
    hp_ok = h_ok[:, None] & (p < P)[None, :]
    lse_p = tl.load(part_lse_ptr + t * stride_lt + h[:, None] * stride_lh + p[None, :], mask=hp_ok,
                    other=float("-inf"))  # fmt: skip
    top = tl.max(lse_p, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse_p - top[:, None])
    total = tl.sum(w, 1)
    rows = t * stride_pt + h[:, None, None] * stride_ph + p[None, :, None] * stride_pp + d[None, None, :]
    mask = (hp_ok & (w > 0.0))[:, :, None] & (d < D)[None, None, :]
    parts = tl.load(part_ptr + rows, mask=mask, other=0.0)
    out = tl.sum(parts * w[:, :, None], 1) / tl.where(total > 0.0, total, 1.0)[:, None]
    lse = tl.where(total > 0.0, top + tl.log(total), float("-inf"))
    out_rows = out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(out_rows, round_to(out, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=h_ok[:, None] & (d < D)[None, :])
    tl.store(lse_ptr + t * stride_rt + h * stride_rh, lse, mask=h_ok)


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
    tma: bool
    direct: bool
    flat: bool


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
    max_queries: int = 1,
    raw: bool = False,
) -> Plan:
    """Choose tiles for one call.

    Key tiles are bulk tensor copies (``tma``) when a tile fits in one block
    (``S % BLOCK_N == 0``) and the head dim needs no padding; row gathers otherwise.

    Args:
        work_items: ``B · Hkv``; times the query tiles, the programs before splitting.
        max_key_slots: longest request's blocks times the block size, an upper bound of
            its key slots; decode, and prefill whose grid is smaller than the GPU, split
            them so that the GPU is filled.
        max_queries: the largest ``num_queries`` of a request (prefill).
        raw: for :data:`RAW`, whose keys are read by row gathers with their partner
            channels (:func:`attend` turns ``tma`` off): decode keeps its pipeline depth,
            as :func:`_decode_pipeline` was timed with bulk tensor copies.
    """
    g = num_heads // num_kv_heads
    dp = max(16, triton.next_power_of_2(head_dim))
    interpret = device.type == "cpu"
    wide = dtype == torch.float32 or dp > 128
    # (BLOCK_M rows, BLOCK_N keys, warps, stages), from sweeps on the H100
    # (benchmarks/kernels.py --sweep, benchmarks/sweeps/kernels_h100.json), bf16.
    if interpret:
        # Small tiles under the interpreter: the tests then cross many tile boundaries.
        tiles = (16, 16, 4, 1)
    elif decode:
        tiles = (16, 32, 4, 2) if wide else (16, 64, 4, 4) if block_size % 64 == 0 else (16, 128, 4, 3)
    elif dtype == torch.float32 and dp > 128:
        # y and its partner channels (float32, [BLOCK_M, DP] each) plus two stages of
        # float32 key and value tiles: 192 KiB at these tiles, 272 KiB at (64, 32).
        tiles = (32, 32, 4, 2)
    elif wide:
        tiles = (64, 32, 4, 2)
    elif dp <= 64:
        tiles = (128, 64, 4, 3) if block_size % 64 == 0 else (128, 64, 4, 2)
    elif block_size % 128 == 0:
        tiles = (128, 128, 8, 3)
    elif block_size % 64 == 0:
        tiles = (64, 64, 4, 3)
    else:
        tiles = (128, 128, 8, 2)  # row gathers: a key tile spans several blocks
    block_m, block_n, num_warps, num_stages = tiles
    tma = block_size % block_n == 0 and dp == head_dim
    if decode:
        gp, block_q = max(16, triton.next_power_of_2(g)), 1
    else:
        gp = triton.next_power_of_2(g)
        block_q = max(1, block_m // gp)  # a group wider than the tile gets a tile alone
    # One token per tile (decode): the attention kernel rotates the raw query itself. Only
    # for 16-bit inputs and key tiles inside one block: elsewhere ptxas (sm_90) spilled
    # more than with the two-step rotation (float32 at head dim 128: 1104 bytes against
    # 720; bf16 row gathers at S = 16: 184 against 124); at bf16, D = 128, S = 64 it needs
    # 244 registers against 254 and spills nothing (benchmarks/sweeps/notes_h200.md).
    direct = block_q == 1 and tma and dtype != torch.float32
    # The flat key loop across runs (the query re-rotated inside it where the shift
    # changes) needs key tiles inside one block, so never two shifts, and the direct
    # rotation (the two-step one's reload of y inside the loop spilled 704 bytes at 64 ×
    # 128 bf16 prefill tiles). On the H200 it beat the loop per run at every decode shape
    # timed at the same split count, by 1–11% (benchmarks/sweeps/tune_h200.json: bf16,
    # D = 128, S = 64, 512-token documents); not at D = 64, where it spilled 40 bytes and
    # the loop per run spills none.
    flat = direct and dp > 64
    key_tiles = triton.cdiv(max_key_slots, block_n)
    if interpret:
        # Exercise the split and the merge under the interpreter, but not in every case.
        splits = 2 if max_key_slots > (2 if decode else 4) * block_n else 1
    elif decode:
        # Flash-decoding: about two programs per SM, at least 2 key tiles per split, at
        # most 32 splits. From the H200 sweep (benchmarks/sweeps/tune_h200.json; 132 SMs,
        # Hkv = 8): 16 requests ran fastest at 2 splits (256 programs; 3 and 5 splits,
        # 384 and 640 programs, were 20–25% slower, 4 splits 7%), one request at 32
        # (8 splits at 1k keys, 2 key tiles each), 64 requests unsplit. The former rule,
        # four programs per SM, chose 5 splits at 16 requests and 64 at one request.
        sms = multiprocessors(device)
        splits = max(1, min(2 * sms // max(1, work_items), key_tiles // 2, 32))
        if tma and not wide and dp == 128 and not raw:
            num_stages, splits = _decode_pipeline(work_items, key_tiles, sms, splits)
    else:
        programs = max(1, work_items) * triton.cdiv(max(1, max_queries), block_q)
        # Programs an SM runs at once. ptxas gives the 4-warp 16-bit tiles 226–255
        # registers a thread: two fit in an SM's 65,536 (and their 33–66 KB of shared
        # memory twice in 228 KB). benchmarks/results/kernels_h200.json shows two running at
        # the speed of one (H200, bf16, D = 128, S = 64: 1.46 µs per key tile of a program
        # with 128 programs, 1.40 µs with 256, 2.91 µs with 512), so a grid of 64 programs
        # splits 4 ways, not 2. Wider tiles are counted one to an SM.
        resident = 2 if num_warps == 4 and not wide else 1
        splits = prefill_splits(programs, key_tiles, resident * multiprocessors(device))
    return Plan(block_q, gp, block_n, dp, splits, num_warps, num_stages, tma, direct, flat)


def _decode_pipeline(work_items: int, key_tiles: int, sms: int, splits: int) -> tuple[int, int]:
    """``(stages, splits)`` of a 16-bit decode at head dim 128 with bulk tensor copies.

    Decode's 16-row tiles take ``mma.sync``, and with them Triton 3.6 gives the key and
    value tiles ``stages − 3`` shared-memory buffers, at least one (sm_90 compile): at 4
    stages the next tile's copy waits for this tile's dot. Timed on an H200 (bf16, S = 64;
    ``benchmarks/sweeps/tune_stages_h200.json`` and the runs below):

    * more programs than SMs, at least 8 key tiles a split: 5 stages (two buffers, 86 KB,
      two programs an SM). 64 requests × 4k keys: 249.8 µs against 265.9 at 4 stages;
      256 requests of 9 key tiles: 125.0 against 133.0;
    * fewer programs, at least 16 key tiles a split: 7 stages (three buffers, 119 KB,
      one program an SM) at one program per SM. 16 requests × 4k keys, unsplit: 69.3
      µs against 75.3 (2 splits at 4 stages); one request of 16k keys, 16 splits: 25.7
      against 26.9. One program an SM issues less, which shows where the keys come
      from L2 rather than memory: 16 requests reading the same 4 documents of 2048
      tokens took 126 µs against 106 (``per_request`` in
      ``benchmarks/results/shared_decode_h200.json`` and, at 4 stages,
      ``benchmarks/sweeps/shared_decode_4_stages_h200.json``);
    * shorter splits keep 4 stages: one request of 4k keys took 11.6 µs at 7 stages (16
      splits of 4 tiles) and 11.3 at 5, against 10.9; 256 requests of one key tile each
      (the shared-segment path's rest launch) took 48.0 µs at 5 stages against 44.4 at 4.
    """
    if work_items > sms:
        stages, deep_splits, fewest_tiles = 5, splits, 8
    else:
        stages, deep_splits, fewest_tiles = 7, max(1, min(sms // max(1, work_items), 32)), 16
    if key_tiles // deep_splits >= fewest_tiles:
        return stages, deep_splits
    return 4, splits


def prefill_splits(programs: int, key_tiles: int, slots: int) -> int:
    """Split-KV for a prefill grid smaller than the GPU (a short query over long context,
    one request: the TTFT of retrieval-augmented generation).

    A prefill program is compute-bound and holds one of the GPU's ``slots`` (SMs ×
    programs resident on one SM), so the time goes as waves × work per program:
    ``ceil(programs · P / slots) / P`` for ``P`` splits. The smallest ``P`` that minimises
    it wins (each split costs a partial write and the merge), with at least 8 key tiles
    per split so that the key loop still pipelines.
    """
    if programs >= slots:
        return 1
    best, best_time = 1, 1.0
    for p in range(2, min(16, key_tiles // 8) + 1):
        time = triton.cdiv(programs * p, slots) / p
        if time < best_time - 1e-9:
            best, best_time = p, time
    return best


def multiprocessors(device: torch.device) -> int:
    """The number of streaming multiprocessors of ``device`` (splits are sized from it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cache_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, pl: Plan):
    """Tensor descriptors of the caches seen as ``[N·S, Hkv·D]`` matrices with
    ``[BLOCK_N, D]`` boxes, or ``(None, None)`` when the caches cannot be seen so
    (not contiguous, or not 16-byte aligned) and the kernel gathers rows instead."""
    n, s, hkv, d = k_cache.shape
    shape, strides = [n * s, hkv * d], [hkv * d, 1]
    fits = all(
        c.is_contiguous() and c.data_ptr() % 16 == 0 and (hkv * d * c.element_size()) % 16 == 0
        for c in (k_cache, v_cache)
    )
    if not (pl.tma and fits and n > 0):
        return None, None
    return tuple(TensorDescriptor(c, shape, strides, [pl.block_n, pl.dp]) for c in (k_cache, v_cache))


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
        tiles: a :class:`Plan` to use instead of :func:`plan`'s (benchmark sweeps).
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
    k_desc, v_desc = _cache_descriptors(k_cache, v_cache, pl)
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
        y_desc, q, k_cache, v_cache, k_desc, v_desc, dest, dest_lse,
        *meta,
        tables.freq, tables.partner, tables.mscale,
        scale * LOG2E, y_rows_per_w, tq,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        dest.stride(0), dest.stride(1), stride_op,
        dest_lse.stride(0), dest_lse.stride(1),
        meta.block_table.stride(0),
        h // hkv, d, blocks_per_split, pl.splits,
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
        q, y, meta.query_start, meta.cu_queries, tables.freq, tables.partner, tables.mscale,
        q.stride(0), q.stride(1), y.stride(0), y.stride(1), y.stride(2), h // num_kv_heads, d,
        BLOCK_T=block_t, GP=gp, DP=dp, ROTATE=mode != NONE, PARTNER=mode == LAZY,
    )  # fmt: skip
    return y


def merge_partials(part: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``out [T, H, D]``, ``lse [T, H]`` from ``part [T, H, P, D]``, ``part_lse [T, H, P]`` (eq. 12).

    A program merges ``HB`` heads of one token, about 8 K partial elements. One program
    per (token, head) gave a decode batch of 256 requests × 32 heads 8,192 programs of a
    few kilobytes each: that merge took 24.6–26.4 µs on an H200, this one 4.9–9.7 µs
    (``benchmarks/results/shared_decode_h200.json``, its 256-request rows)."""
    t, h, p, d = part.shape
    if t == 0:
        return
    if part.stride(-1) != 1 or out.stride(-1) != 1 or part_lse.stride(-1) != 1:
        raise ValueError("merge needs the last dimension of its tensors contiguous")
    pp, dp = max(2, triton.next_power_of_2(p)), max(16, triton.next_power_of_2(d))
    hb = min(triton.next_power_of_2(h), max(1, 8192 // (pp * dp)))
    _merge_kernel[(t, triton.cdiv(h, hb))](
        part, part_lse, out, lse, h, p, d,
        part.stride(0), part.stride(1), part.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1),
        HB=hb, PP=pp, DP=dp,
        EMULATE_RTNE=emulate_rtne(out.dtype, out.device),
    )  # fmt: skip


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale``, or ``1/sqrt(D)`` when ``None`` — as the reference."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
