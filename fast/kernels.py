"""The attention kernel behind every fast attention function, and its building blocks.

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
(:func:`~lazyattention.fast.plan.plan`): row ``r`` of a ``[BLOCK_M, DP]`` query tile is query token
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
keys and their log-sum-exp, and :func:`~lazyattention.fast.merge.merge_partials` combines
the parts (eq. 12). Prefill splits the same way when its grid (query tiles × B × Hkv) is
smaller than the GPU (:func:`~lazyattention.fast.plan.prefill_splits`): a short question
over many retrieved documents, one request, would otherwise leave most SMs idle.

**Building blocks.** :func:`key_tile` (one key tile's loads, rotation, scores and online
softmax update), :func:`finish` (the output and log-sum-exp of an online softmax) and
:func:`cache_descriptors` (the caches as bulk-copy descriptors) are shared with the
shared-segment kernel (``fast/shared.py``). The host launches the kernels from
``fast/attend.py``, with the tiles of ``fast/plan.py``.

Shape alphabet: ``B`` requests, ``H`` heads, ``Hkv`` KV heads, ``G = H / Hkv``, ``Tq``
query tokens, ``D`` head dim (``DP`` padded to a power of two), ``N`` blocks,
``S`` block size, ``M`` blocks per request (padded), ``P`` splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .plan import Plan
from .rope import rope_cos_sin, rotate_tile
from .rounding import round_to

__all__ = ["LAZY", "RAW", "NONE", "LOG2E", "key_tile", "finish", "cache_descriptors"]

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
def finish(m_i, l_i, acc):
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
def key_tile(
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
            m_i, l_i, acc = key_tile(
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
            m_i, l_i, acc = key_tile(
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
    out, lse = finish(m_i, l_i, acc)
    if SPLIT:
        out_rows += split * stride_op
        lse_rows += split
    out_mask = row_ok[:, None] & d_ok[None, :]
    out = round_to(out, out_ptr.dtype.element_ty, EMULATE_RTNE)
    tl.store(out_ptr + out_rows[:, None] + d[None, :], out, mask=out_mask)
    if WRITE_LSE:
        tl.store(lse_ptr + lse_rows, lse, mask=row_ok)


# --------------------------------------------------------------------------- host code


def cache_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, pl: Plan):
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
