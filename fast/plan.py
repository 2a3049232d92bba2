"""Tile sizes and launch shape of one attention call, chosen on the host.

:func:`plan` picks the query and key tiles, the pipeline depth, the split count and
the rotation path of the attention kernel (``fast/kernels.py``) for one call's shapes,
dtype and device, from sweeps on the H100 and H200 (the figures are cited where a rule
comes from). Nothing here launches a kernel.

Shape alphabet: ``B`` requests, ``H`` heads, ``Hkv`` KV heads, ``G = H / Hkv``, ``D``
head dim (``DP`` padded to a power of two), ``S`` block size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

__all__ = ["Plan", "plan", "prefill_splits", "multiprocessors", "MAX_DECODE_SPLITS"]

#: The most programs one decode request's keys are split among.
MAX_DECODE_SPLITS = 32


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
    max_split_tiles: int | None = None,
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
        max_split_tiles: decode: split further where a split of the longest request
            would walk more key tiles than this (at most 32 splits), for a batch whose
            requests differ widely in length: the split is sized by the longest
            request, so its few programs would hold the launch while the others are
            done. ``None``: the split of the rule below.
    """
    g = num_heads // num_kv_heads
    dp = max(16, triton.next_power_of_2(head_dim))
    interpret = device.type == "cpu"
    wide = dtype == torch.float32 or dp > 128
    # 16-bit decode at head dim 64 over blocks whose key tiles are bulk tensor copies.
    d64 = decode and not wide and not raw and dp == 64 and (block_size % 64 == 0 or block_size in (16, 32))
    # (BLOCK_M rows, BLOCK_N keys, warps, stages), from sweeps on the H100
    # (benchmarks/kernels.py --sweep, benchmarks/sweeps/kernels_h100.json), bf16.
    if interpret:
        # Small tiles under the interpreter: the tests then cross many tile boundaries.
        tiles = (16, 16, 4, 1)
    elif d64:
        tiles = _decode_tiles_d64(block_size)
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
    pipelined = decode and not interpret and tma and not wide and dp == 128 and not raw  # _decode_pipeline's
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
        per_sm = _DECODE_D64_PROGRAMS_PER_SM[block_n] if d64 else 2
        splits = max(1, min(per_sm * sms // max(1, work_items), key_tiles // 2, MAX_DECODE_SPLITS))
        if pipelined:
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
    if decode and max_split_tiles is not None:
        capped = max(splits, min(MAX_DECODE_SPLITS, triton.cdiv(key_tiles, max_split_tiles)))
        if capped > splits and pipelined:
            num_stages = 4  # shorter splits keep 4 stages (see _decode_pipeline)
        splits = capped
    return Plan(block_q, gp, block_n, dp, splits, num_warps, num_stages, tma, direct, flat)


#: Decode at head dim 64 (16-bit): the split count fills the GPU with this many programs
#: an SM, per key tile. From ``benchmarks/sweeps/tune_engine_decode_h100.json`` (H100,
#: 132 SMs; the engine benchmark's decode step: 16 requests, 8 documents each, 120k keys,
#: 32/8 heads, 247 MB of K/V a layer, 81.8 µs at copy bandwidth): at 64-key tiles 3
#: splits took 85.6 µs, against 112.7 at 2 and 107.1 at 4 (a second wave); at 32- and
#: 16-key tiles 4 splits were fastest (88.5 and 129.6 µs; 8 splits 91.4 and 132.4).
_DECODE_D64_PROGRAMS_PER_SM = {16: 4, 32: 4, 64: 3}


def _decode_tiles_d64(block_size: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, warps, stages)`` of a 16-bit decode at head dim 64: one key
    tile a block (bulk tensor copies), at most 64 keys.

    Gathering 128-key tiles across 16-token blocks row by row, as other head dims do at
    ``S = 16``, took 177.0 µs on the step above (2.2× the copy-bandwidth time), against
    129.6 µs with one 16-key tile a block at 5 stages (two shared-memory buffers, see
    :func:`_decode_pipeline`), 88.5 µs with 32-token blocks (32-key tiles, 5 stages) and
    85.6 µs with 64-token blocks (64-key tiles; 2, 3 and 4 stages within 1%).
    """
    block_n = 64 if block_size % 64 == 0 else block_size
    return (16, block_n, 4, 4 if block_n == 64 else 5)


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
