"""Time the decode attention of the engine benchmark's step at its own shape, under
several key tiles, pipeline depths and split counts (tuning aid, needs CUDA).

``benchmarks/kernels.py`` and ``benchmarks/tune_h200.py`` time the kernels at head dim
128 over blocks of 64 tokens. The engine benchmark's model (the Llama-3.2-1B shape) has
head dim 64, and an engine may take any block size, so its decode runs other tiles.
This script builds the decode step of the engine benchmark's decode section (16
requests of 8 documents drawn from the heavy preset's workload, Zipf skew 1, each
document stored once and read at its own shift by every request that holds it, the
query and output tokens in the request's own blocks) at block sizes ``--block-sizes``,
and times, by CUDA-graph replay (``triton.testing.do_bench_cudagraph``):

* the plan (``fast/plan.py``) and the kernel without rotation at the plan's tiles (the
  floor the rotation adds to);
* every key tile that fits the block size's key-load paths (bulk tensor copies where a
  tile lies in one block, row gathers otherwise), at several pipeline depths and split
  counts.

Each variant's output is checked against the plan's (``max|diff| <= 0.02``) before it
is timed. The table gives each variant's time, its K/V read rate, and the ratio to the
time of reading the step's K/V once at the device's copy bandwidth.

With ``--shared N[,N...]``, the same step at ``--batches`` requests instead, with
shared-segment decode (``fast/shared.py``, segments that ``N`` or more requests read):
the per-request decode at its plan, then the shared path at :func:`shared_tiles`' tiles
(all its launches, and each alone: the rest, the shared kernel, the merge), the
shared kernel under other member tiles, key tiles, warps and pipeline depths, and the
rest's decode split finer than its plan splits it (:data:`REST_CAPS`, the caps of
``fast/shared.py``'s ``REST_SPLIT_TILES``).

Run: ``python benchmarks/tune_engine_decode.py --out FILE [--block-sizes 16,64]
[--shared 2,4 --batches 16,64]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine as bench
from kernels import bench_graph, ceilings

from lazyattention.fast import attend as fast_attend
from lazyattention.fast.rope import rope_tables
from lazyattention.fast.shared import plan_sharing, shared_launches, shared_tiles
from lazyattention.reference.layout import Layout, Placement, RequestLayout, ceil_div
from lazyattention.serving.config import MODEL_SHAPES
from lazyattention.serving.workload import make_workload

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
TOLERANCE = 0.02
OWN_TOKENS = 64  # the query (32) and half the output tokens of the heavy preset
#: The shared kernel's variants: (members a program, key tile, warps, pipeline depths).
SHARED_TILES = [(m, n, w, (2, 3)) for m in (8, 16, 32) for n in (64, 128) for w in (4, 8)]
#: Caps on the key tiles one program of the shared path's rest walks (``--shared``).
REST_CAPS = (4, 8, 16)
#: (key tile, warps, pipeline depths) to try per key-load path; splits from SPLITS.
TILES = [(16, 4, (2, 3, 4, 5)), (32, 4, (2, 3, 4, 5)), (64, 4, (2, 3, 4)), (128, 4, (2, 3)), (64, 8, (3, 4)),
         (128, 8, (2, 3))]  # fmt: skip
SPLITS = (1, 2, 3, 4, 8)


def step_layout(block_size: int, batch: int = 16) -> tuple[Layout, int]:
    """The engine decode step's layout at ``block_size``, and the cache's block count."""
    _, [(_, args)] = bench.parse(["--preset", "heavy"])
    workload = make_workload(replace(bench._workload_config(args), num_requests=batch, zipf_alpha=1.0))
    stored: dict[int, tuple[int, ...]] = {}
    next_block = 0

    def take(n: int) -> tuple[int, ...]:
        nonlocal next_block
        next_block += n
        return tuple(range(next_block - n, next_block))

    requests = []
    for r in workload.requests:
        segments, start = [], 0
        for doc in r.documents:
            length = len(workload.documents[doc])
            if doc not in stored:
                stored[doc] = take(ceil_div(length, block_size))
            segments.append(Placement(stored[doc], length, start=start))
            start += length
        own = Placement(take(ceil_div(OWN_TOKENS, block_size)), OWN_TOKENS, start=start)
        requests.append(RequestLayout(tuple(segments), own, num_queries=1))
    return Layout(requests, block_size), next_block


def step_inputs(layout: Layout, blocks: int, block_size: int, cfg):
    """Random cache and pre-RoPE queries for ``layout`` (seeded by the block size)."""
    gen = torch.Generator(device=DEVICE).manual_seed(block_size)
    shape = (blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    k_cache = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE)
    q = torch.randn(layout.batch_size, cfg.num_heads, cfg.head_dim, generator=gen, device=DEVICE, dtype=DTYPE)
    return q, k_cache, v_cache


def decode_plan(cfg, block_size: int, batch: int, max_key_slots: int, max_split_tiles: int | None = None):
    """The decode's own plan (``fast/plan.py``) for ``batch`` requests of at most ``max_key_slots`` keys."""
    return fast_attend.plan(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size, DTYPE, DEVICE, True,
                            batch * cfg.num_kv_heads, max_key_slots, max_split_tiles=max_split_tiles)  # fmt: skip


def step_decode(layout: Layout, block_size: int, cfg):
    """``(metadata, plan, rope tables, scale)`` of the per-request decode of ``layout``."""
    meta = layout.metadata(DEVICE)
    b, m = meta.block_table.shape
    plan = decode_plan(cfg, block_size, b, m * block_size)
    return meta, plan, rope_tables(cfg.rope, plan.dp, DEVICE), cfg.head_dim**-0.5


def keys_read(layout: Layout) -> int:
    """Keys the requests of ``layout`` read, summed over requests."""
    return sum(p.length for req in layout.requests for p in (*req.segments, req.own))


def time_variant(row: dict, fn, truth: torch.Tensor, ideal_ms: float, check=None) -> dict:
    """``row`` with the variant's largest difference from ``truth`` (of ``check()``,
    default ``fn()``) and, within :data:`TOLERANCE`, ``fn``'s graph-replay time in ms
    and its ratio to ``ideal_ms``; an error is recorded, so that one failing variant
    does not hide the others."""
    try:
        diff = float(((check or fn)().float() - truth.float()).abs().max())
        row["max_diff"] = diff
        if diff <= TOLERANCE:
            row["ms"] = bench_graph(fn)
            row["over_ideal"] = row["ms"] / ideal_ms
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def tune(block_size: int, cfg, copy_bytes_per_s: float, rows: list) -> None:
    layout, blocks = step_layout(block_size)
    q, k_cache, v_cache = step_inputs(layout, blocks, block_size, cfg)
    meta, plan, tables, scale = step_decode(layout, block_size, cfg)
    tokens = keys_read(layout)
    kv_bytes = 2 * tokens * cfg.num_kv_heads * cfg.head_dim * k_cache.element_size()
    ideal_ms = kv_bytes / copy_bytes_per_s * 1e3

    def run(tiles, mode=fast_attend.LAZY):
        return fast_attend.attend(q, k_cache, v_cache, meta, tables, 1, scale, mode, True, False, tiles)[0]

    truth = {mode: run(plan, mode) for mode in (fast_attend.LAZY, fast_attend.NONE)}

    def timed(name: str, tiles, mode=fast_attend.LAZY) -> None:
        row = {"block_size": block_size, "variant": name, "splits": tiles.splits, "block_n": tiles.block_n,
               "warps": tiles.num_warps, "stages": tiles.num_stages, "tma": tiles.tma, "direct": tiles.direct,
               "flat": tiles.flat, "kv_bytes": kv_bytes, "ideal_ms": ideal_ms}  # fmt: skip
        rows.append(time_variant(row, lambda: run(tiles, mode), truth[mode], ideal_ms))
        print(f"S={block_size:3d} {name:9s} P={tiles.splits} n={tiles.block_n:3d} w={tiles.num_warps} "
              f"st={tiles.num_stages} tma={int(tiles.tma)} direct={int(tiles.direct)}: "
              f"{row.get('ms', float('nan')) * 1e3:8.1f} us  x{row.get('over_ideal', float('nan')):5.2f} "
              f"{row.get('error', '')}", flush=True)  # fmt: skip

    print(f"\nS={block_size}: {layout.batch_size} requests, {tokens} keys, {kv_bytes / 1e6:.0f} MB of K/V a layer, "
          f"read once at copy bandwidth {ideal_ms * 1e3:.1f} us; plan {plan}", flush=True)  # fmt: skip
    timed("plan", plan)
    timed("norot", plan, fast_attend.NONE)
    for block_n, warps, stages in TILES:
        tma = block_size % block_n == 0 and plan.dp == cfg.head_dim
        key_tiles = triton.cdiv(meta.block_table.shape[1] * block_size, block_n)
        for splits in SPLITS:
            if key_tiles // splits < 2:
                continue
            for depth in stages:
                tiles = plan._replace(block_n=block_n, num_warps=warps, num_stages=depth, splits=splits, tma=tma,
                                      direct=tma, flat=False)  # fmt: skip
                if tiles == plan:
                    continue
                timed("lazy", tiles)


def _in_order(launches: dict, out: torch.Tensor):
    """One call that runs the shared path's ``launches`` in order and returns ``out``."""

    def whole() -> torch.Tensor:
        for launch in launches.values():
            launch()
        return out

    return whole


def tune_shared(block_size: int, batch: int, min_requests: int, cfg, copy_bytes_per_s: float, rows: list) -> None:
    """The shared path against the per-request decode at ``batch`` requests (see the
    module docstring)."""
    layout, blocks = step_layout(block_size, batch)
    sharing = plan_sharing(layout, min_requests)
    if sharing is None:
        print(f"S={block_size} B={batch}: no segment read by {min_requests} requests", flush=True)
        return
    q, k_cache, v_cache = step_inputs(layout, blocks, block_size, cfg)
    meta, plan, tables, scale = step_decode(layout, block_size, cfg)
    token_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * k_cache.element_size()
    read_tokens = keys_read(layout)
    rest_tokens = keys_read(sharing.rest)
    unique = rest_tokens + sharing.unique_tokens
    ideal_ms = unique * token_bytes / copy_bytes_per_s * 1e3
    base = {"block_size": block_size, "batch": batch, "min_requests": min_requests, "read_tokens": read_tokens,
            "rest_tokens": rest_tokens, "shared_tokens": sharing.unique_tokens, "segments": len(sharing.segments),
            "members": sum(len(seg.members) for seg in sharing.segments), "ideal_ms": ideal_ms}  # fmt: skip
    print(f"\nS={block_size} B={batch} N={min_requests}: {read_tokens} keys read per request, "
          f"{len(sharing.segments)} shared segments ({base['members']} members, {sharing.unique_tokens} keys), "
          f"rest {rest_tokens} keys; unique K/V read once at copy bandwidth {ideal_ms * 1e3:.1f} us",
          flush=True)  # fmt: skip

    def per_request():
        return fast_attend.attend(q, k_cache, v_cache, meta, tables, 1, scale, fast_attend.LAZY, True, False, plan)[0]

    truth = per_request().float()

    def record(name: str, fn, check, **fields) -> None:
        row = dict(base, variant=name, **fields)
        rows.append(time_variant(row, fn, truth, ideal_ms, check))
        print(f"S={block_size} B={batch:3d} N={min_requests} {name:12s} {fields}: "
              f"{row.get('ms', float('nan')) * 1e3:8.1f} us  x{row.get('over_ideal', float('nan')):5.2f} "
              f"{row.get('error', '')}", flush=True)  # fmt: skip

    record("per_request", per_request, per_request)
    default = shared_tiles(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size, DTYPE, DEVICE)
    variants = [default] + [
        default._replace(
            block_q=members,
            block_n=block_n,
            num_warps=warps,
            num_stages=depth,
            tma=block_size % block_n == 0 and default.dp == cfg.head_dim,
        )
        for members, block_n, warps, depths in SHARED_TILES
        for depth in depths
    ]
    for i, tiles in enumerate(dict.fromkeys(variants)):
        launches, out, _ = shared_launches(q, k_cache, v_cache, sharing, tables, scale, tiles)
        whole = _in_order(launches, out)
        fields = {"members": tiles.block_q, "block_n": tiles.block_n, "warps": tiles.num_warps,
                  "stages": tiles.num_stages, "tma": tiles.tma, "splits": sharing.metadata(DEVICE, tiles,
                  cfg.num_kv_heads).splits[:4]}  # fmt: skip
        record("shared" if i == 0 else "shared_tiles", whole, whole, **fields)
        if i == 0:
            for part in ("rest", "shared", "merge"):
                record(f"{part}_alone", launches[part], whole, **fields)
    # The rest's splits: the decode's own rule (every request's blocks split alike, by the
    # longest request's), then finer, so that no program walks more than a cap of key tiles
    # (the plan's max_split_tiles, fast/shared.py's REST_SPLIT_TILES).
    rest_keys = sharing.rest.metadata(DEVICE).block_table.shape[1] * block_size
    rests = {cap: decode_plan(cfg, block_size, batch, rest_keys, cap) for cap in (None, *REST_CAPS)}
    for cap, rest in rests.items():
        launches, out, _ = shared_launches(q, k_cache, v_cache, sharing, tables, scale, default, rest)
        whole = _in_order(launches, out)
        fields = {"rest_cap": cap, "rest_splits": rest.splits}
        record("shared_rest", whole, whole, **fields)
        record("rest_alone", launches["rest"], whole, **fields)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--block-sizes", default="16,64")
    p.add_argument("--model", default="llama3-1b", choices=tuple(MODEL_SHAPES))
    p.add_argument("--shared", metavar="N[,N...]", help="tune shared-segment decode at these thresholds instead")
    p.add_argument("--batches", default="16,64", help="requests in the step, with --shared")
    opts = p.parse_args()
    cfg = MODEL_SHAPES[opts.model]()
    roofs = ceilings()
    rows: list[dict] = []
    copy_bytes_per_s = roofs["copy_tb_per_s"] * 1e12
    if opts.shared:
        runs = [partial(tune_shared, s, batch, threshold) for s, batch, threshold in
                itertools.product(_ints(opts.block_sizes), _ints(opts.batches), _ints(opts.shared))]  # fmt: skip
    else:
        runs = [partial(tune, s) for s in _ints(opts.block_sizes)]
    for run in runs:  # the file is written after each, so that a cut-off run keeps what it timed
        run(cfg, copy_bytes_per_s, rows)
        Path(opts.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "ceilings": roofs,
                                              "model": opts.model, "rows": rows}, indent=1))  # fmt: skip
    if opts.shared:
        print("\nfastest shared tiles per block size and batch:")
        for key in sorted({(r["block_size"], r["batch"], r["min_requests"]) for r in rows}):
            timed = [r for r in rows if (r["block_size"], r["batch"], r["min_requests"]) == key and r.get("ms")]
            best = min((r for r in timed if r["variant"].startswith("shared")), key=lambda r: r["ms"], default=None)
            ref = {r["variant"]: r["ms"] * 1e3 for r in timed if "rest_cap" not in r and r["variant"] != "shared_tiles"}
            caps = {f"{r['variant']} cap {r['rest_cap']}": round(r["ms"] * 1e3, 1) for r in timed if "rest_cap" in r}
            print(f"S={key[0]} B={key[1]} N={key[2]}: {ref} us; best {best and best['ms'] * 1e3:.1f} us "
                  f"{best and {k: best[k] for k in ('members', 'block_n', 'warps', 'stages')}}")  # fmt: skip
            print(f"  the rest split by a cap on its key tiles: {caps} us")
        return 0
    print("\nfastest per block size:")
    for s in sorted({r["block_size"] for r in rows}):
        timed = [r for r in rows if r["block_size"] == s and r.get("ms") and r["variant"] != "norot"]
        plan = next((r for r in timed if r["variant"] == "plan"), None)
        best = min(timed, key=lambda r: r["ms"])
        norot = next((r for r in rows if r["block_size"] == s and r["variant"] == "norot"), {})
        print(f"S={s}: plan {plan and plan['ms'] * 1e3:.1f} us, no rotation {norot.get('ms', 0) * 1e3:.1f} us, best "
              f"{best['ms'] * 1e3:.1f} us ({ {k: best[k] for k in ('splits', 'block_n', 'warps', 'stages', 'tma')} }), "
              f"read once {best['ideal_ms'] * 1e3:.1f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
