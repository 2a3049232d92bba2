"""Time the split counts, tiles and kernel variants of the shapes where the fast path
loses, in one GPU call (tuning aid; writes what ``fast/plan.py:plan`` is set from).

Run: ``python benchmarks/tune_h200.py --out FILE [--baseline DIR] [--budget SECONDS] [--kinds prefill]
[--stages]`` (``scripts/tune_gpu.sh`` does, with the compiled attention tests after it).

The shapes and providers are those of ``benchmarks/kernels.py`` (bf16, 32/8 heads, head
dim 128, blocks of 64, documents back to back, FlashInfer on contiguous documents, its
best case), restricted to the rows where the lazy kernels lost on the H200:

* **decode**, one request of 1k–64k keys and 16 requests of 4k–16k keys, 512-token
  documents (every 8 blocks a new shift): split counts ``P`` (with at least 2 key tiles
  per split), the flat key loop across runs against the loop per run
  (``Plan.flat``), the query rotated in the attention kernel against the two-step
  rotation of a query kernel (``Plan.direct``), and a few key tiles / warps / stages;
  with ``--stages``, only the plan at each pipeline depth of :data:`DECODE_STAGES`
  (and the kernel without rotation at each);
* **prefill**, 128 query tokens over 8 documents of 512 or 4096 tokens (one request,
  and 8 over 512-token documents): ``P`` ∈ {2, 4, 8}, a few query / key tiles, warps and
  stages, and the flat key loop; the query kernel (the two-step rotation's first step)
  is also timed alone.

Each variant is checked against the float64 truth of ``benchmarks/kernels.py``
(``expected_outputs``, ``max|diff| <= 0.02``) before it is timed by CUDA-graph replay; a
variant that fails is recorded and not timed. ``--baseline DIR`` also times the kernels
of another checkout, copied as the package ``DIR/basefast`` (its ``fast/`` folder), with
their own plan: the before of a change, on the same machine in the same run. The shapes
go in order of importance, and a variant that would start after ``--budget`` seconds is
skipped and recorded so. A compact table (per shape: FlashInfer, the baseline, the
current plan, the fastest variant) is printed last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

import torch
import triton
from kernels import (
    BLOCK,
    DOCS_PREFILL,
    DTYPE,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    PARITY_TOLERANCE,
    ROPE,
    bench_graph,
    ceilings,
    compiled_report,
    decode_layout,
    environment,
    expected_outputs,
    flashinfer_decode,
    flashinfer_or_reason,
    flashinfer_prefill,
    make_cache,
    make_layout,
)

from lazyattention.fast import attend as fast_attend
from lazyattention.fast.rope import rope_tables

SCALE = HEAD_DIM**-0.5
DEVICE = torch.device("cuda")
#: (B, Tk, document length, depth), most important first: the 1.8 TB/s target, the
#: launch-bound shape, the 16-request split, then the rest of the losing rows and one row
#: that won (64 requests), to see that a new rule does not lose it. Depth 2: every split
#: count with and without the flat loop, the kernel without rotation at each, and the
#: other tiles; 1: every split count with the flat loop; both: the plan's split without.
DECODE_SHAPES = [(1, 16384, 512, 2), (1, 1024, 512, 1), (16, 4096, 512, 2), (16, 16384, 512, 1), (1, 4096, 512, 1),
                 (1, 65536, 512, 1), (64, 4096, 512, 1), (16, 16384, 4096, 1)]  # fmt: skip
PREFILL_SHAPES = [(1, 128, 512), (1, 128, 4096), (8, 128, 512)]  # (B, Tq, document length), 8 documents
#: (block_n, warps, stages) of decode; the first is the plan's.
DECODE_TILES = [(64, 4, 4), (64, 4, 2), (32, 4, 4), (64, 8, 4)]
#: Pipeline depths of decode for ``--stages``. With decode's 16-row tiles (mma.sync, not
#: wgmma) Triton 3.6 gives the key and value tiles ``stages − 3`` shared-memory buffers
#: (at least one; sm_90 compile, bf16, D = 128, S = 64): 2 to 4 stages all make one, so
#: the next tile's copy waits for this tile's dot; 5 and 6 make two (86 KB a program, two
#: programs an SM), 7 makes three (119 KB, one an SM).
DECODE_STAGES = (4, 5, 7)
#: (block_m, block_n, warps, stages) of prefill; the first is the plan's.
PREFILL_TILES = [(64, 64, 4, 3), (64, 64, 8, 3)]
PREFILL_SPLITS = (2, 4, 8)
#: Prefill's key loop, with the two-step rotation (the query kernel, then ``R(−δ)`` per
#: run): a loop per run, or one flat loop across runs. (Rotating each row directly was
#: timed too, and lost: ``benchmarks/sweeps/tune_prefill_h200.json``.)
PREFILL_FLAT = (False, True)


def decode_splits(batch: int, plan_splits: int, key_tiles: int) -> list[int]:
    """Split counts to time: powers of two from an eighth to four times the plan's for one
    request, 2–10 for more; each split at least 2 key tiles."""
    if batch == 1:
        options = [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if plan_splits / 8 <= p <= 4 * plan_splits]
    else:
        options = [p for p in (1, 2, 3, 4, 5, 6, 8, 10) if p <= 4 * plan_splits]
    return sorted({p for p in [*options, plan_splits] if key_tiles // p >= 2})


class Clock:
    """Seconds since the start, against a budget."""

    def __init__(self, budget: float):
        self.start, self.budget = time.monotonic(), budget

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


def timed(rows: list, clock: Clock, fn, truth: torch.Tensor, check_rows: int, **row) -> dict:
    """Check ``fn``'s first ``check_rows`` output rows against ``truth``, then time it."""
    if clock.left() <= 0:
        row["skipped"] = "over the time budget"
        rows.append(row)
        return row
    try:
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        diff = float((out[:check_rows].double() - truth).abs().max())
        row["max_diff"], row["parity"] = diff, bool(diff <= PARITY_TOLERANCE)
        if row["parity"]:
            row["ms"] = bench_graph(fn)
    except Exception as exc:  # recorded: one failing variant must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    rows.append(row)
    rate = row.get("ms") and (row["bytes"] / row["ms"] / 1e9 if "bytes" in row else row["flops"] / row["ms"] / 1e9)
    what = {k: row[k] for k in ("variant", "splits", "tiles", "flat") if k in row}
    print(f"{row['kind']} {row['shape']} {what} ms={row.get('ms')} rate={rate} "
          f"diff={row.get('max_diff')} {row.get('error', '')}", flush=True)  # fmt: skip
    return row


def call(module, q, k_cache, v_cache, meta, tables, max_queries, mode, decode, tiles=None):
    return lambda: module.attend(q, k_cache, v_cache, meta, tables, max_queries, SCALE, mode, decode, False, tiles)[0]


def decode_shape(rows, clock, batch, tk, doc, depth, fi, base, stages_only=False):
    gen = torch.Generator(device=DEVICE).manual_seed(batch * 7 + tk)
    layout = decode_layout(batch, tk, doc)
    k_cache, v_cache = make_cache(layout, gen)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    meta = layout.metadata(DEVICE)
    tables = rope_tables(ROPE, HEAD_DIM, DEVICE)
    check = min(batch, 2)
    truth = expected_outputs(q, k_cache, v_cache, layout, check)
    shape = {"kind": "decode", "shape": [batch, tk, doc],
             "bytes": 2 * batch * tk * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2}  # fmt: skip
    slots = meta.block_table.shape[1] * BLOCK
    plan = fast_attend.plan(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device, True, batch * KV_HEADS, slots)

    def lazy(tiles, mode=fast_attend.LAZY):
        fn = call(fast_attend, q, k_cache, v_cache, meta, tables, 1, mode, True, tiles)
        name = "lazy" if mode == fast_attend.LAZY else "norot"
        timed(rows, clock, fn, truth[name], check, **shape, variant=name if tiles.direct else f"{name}_two_step",
              splits=tiles.splits, tiles=[tiles.block_n, tiles.num_warps, tiles.num_stages],
              flat=tiles.flat)  # fmt: skip

    if fi is not None:
        fn = flashinfer_decode(fi, layout, q, k_cache, v_cache, True)
        timed(rows, clock, fn, truth["raw"], check, **shape, variant="flashinfer_tc")
    if base is not None:
        for name, mode in (("base_lazy", base.LAZY), ("base_norot", base.NONE)):
            timed(rows, clock, call(base, q, k_cache, v_cache, meta, tables, 1, mode, True), truth[name[5:]], check,
                  **shape, variant=name)  # fmt: skip
    for name, mode in (("lazy", fast_attend.LAZY), ("norot", fast_attend.NONE)):
        timed(rows, clock, call(fast_attend, q, k_cache, v_cache, meta, tables, 1, mode, True, plan), truth[name],
              check, **shape, variant=f"{name}_plan", splits=plan.splits,
              tiles=[plan.block_n, plan.num_warps, plan.num_stages], flat=plan.flat)  # fmt: skip
    if stages_only:
        for stages in DECODE_STAGES:
            for p in sorted({plan.splits, *((max(1, plan.splits // 2), 2 * plan.splits) if stages == 7 else ())}):
                if triton.cdiv(slots, plan.block_n) // p >= 2:
                    lazy(plan._replace(num_stages=stages, splits=p))
            lazy(plan._replace(num_stages=stages), fast_attend.NONE)
        return
    splits = decode_splits(batch, plan.splits, triton.cdiv(slots, plan.block_n))
    for p in splits:
        lazy(plan._replace(splits=p, flat=True))
        if depth >= 2 or p == plan.splits:
            lazy(plan._replace(splits=p, flat=False))
        if depth >= 2:
            lazy(plan._replace(splits=p), fast_attend.NONE)
    # The query kernel and the two-step rotation, as before the direct rotation.
    lazy(plan._replace(direct=False, flat=False))
    if depth >= 2:
        for block_n, warps, stages in DECODE_TILES[1:]:
            for p in sorted({max(1, plan.splits // 2), plan.splits, 2 * plan.splits}):
                if triton.cdiv(slots, block_n) // p >= 2:
                    lazy(plan._replace(block_n=block_n, num_warps=warps, num_stages=stages, splits=p))


def prefill_shape(rows, clock, batch, tq, doc, fi, base):
    gen = torch.Generator(device=DEVICE).manual_seed(batch * 11 + doc)
    layout = make_layout(batch, [doc] * DOCS_PREFILL, tq, tq)
    k_cache, v_cache = make_cache(layout, gen)
    q = torch.randn(layout.num_queries, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    meta = layout.metadata(DEVICE)
    tables = rope_tables(ROPE, HEAD_DIM, DEVICE)
    truth = expected_outputs(q, k_cache, v_cache, layout, 1)
    flops = 4 * HEADS * HEAD_DIM * batch * (tq * DOCS_PREFILL * doc + tq * (tq + 1) / 2)
    shape = {"kind": "prefill", "shape": [batch, tq, doc], "flops": flops}
    slots = meta.block_table.shape[1] * BLOCK
    plan = fast_attend.plan(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device, False, batch * KV_HEADS, slots, tq)
    if fi is not None:
        timed(rows, clock, flashinfer_prefill(fi, layout, q, k_cache, v_cache), truth["raw"], tq, **shape,
              variant="flashinfer")  # fmt: skip
    if base is not None:
        for name, mode in (("base_lazy", base.LAZY), ("base_norot", base.NONE)):
            timed(rows, clock, call(base, q, k_cache, v_cache, meta, tables, tq, mode, False), truth[name[5:]], tq,
                  **shape, variant=name)  # fmt: skip
    for name, mode in (("lazy", fast_attend.LAZY), ("norot", fast_attend.NONE)):
        fn = call(fast_attend, q, k_cache, v_cache, meta, tables, tq, mode, False, plan)
        timed(rows, clock, fn, truth[name], tq, **shape, variant=f"{name}_plan", splits=plan.splits,
              tiles=[plan.block_q * plan.gp, plan.block_n, plan.num_warps, plan.num_stages],
              flat=plan.flat)  # fmt: skip
    # The two-step rotation's first step alone: the query kernel, y = m R(p) q.
    query_kernel = lambda: fast_attend._rotated_query(q, meta, tables, tq, fast_attend.LAZY, KV_HEADS, plan.gp)  # noqa: E731
    query_kernel()
    rows.append({**shape, "variant": "query_kernel", "ms": bench_graph(query_kernel)})
    print(f"prefill {shape['shape']} query kernel alone ms={rows[-1]['ms']}", flush=True)
    for block_m, block_n, warps, stages in PREFILL_TILES:
        block_q = max(1, block_m // plan.gp)
        for flat in PREFILL_FLAT:
            for p in PREFILL_SPLITS:
                tiles = plan._replace(block_q=block_q, block_n=block_n, num_warps=warps, num_stages=stages, splits=p,
                                      flat=flat)  # fmt: skip
                for name, mode in (("lazy", fast_attend.LAZY), ("norot", fast_attend.NONE)):
                    if name == "norot" and flat:
                        continue
                    fn = call(fast_attend, q, k_cache, v_cache, meta, tables, tq, mode, False, tiles)
                    timed(rows, clock, fn, truth[name], tq, **shape, variant=name, splits=p,
                          tiles=[block_m, block_n, warps, stages], flat=flat)  # fmt: skip


def load_baseline(path: str | None):
    """The ``attend`` module of the package ``path/basefast``, or None."""
    if not path:
        return None
    sys.path.insert(0, path)
    return importlib.import_module("basefast.attend")


def summary(rows: list[dict]) -> list[dict]:
    """Per shape: FlashInfer, the baseline, the plan and the fastest lazy variant."""
    out = []
    shapes = []
    for r in rows:
        if r["kind"] in ("decode", "prefill") and (r["kind"], r["shape"]) not in shapes:
            shapes.append((r["kind"], r["shape"]))
    for kind, shape in shapes:
        mine = [r for r in rows if r["kind"] == kind and r["shape"] == shape and r.get("ms")]

        def pick(variant, mine=mine):
            hit = [r for r in mine if r["variant"] == variant]
            return min(hit, key=lambda r: r["ms"]) if hit else None

        plan = pick("lazy_plan")
        best = pick("lazy")
        fi = pick("flashinfer_tc") or pick("flashinfer")
        out.append({"kind": kind, "shape": shape, "flashinfer_ms": fi and fi["ms"],
                    "base_lazy_ms": (pick("base_lazy") or {}).get("ms"),
                    "base_norot_ms": (pick("base_norot") or {}).get("ms"),
                    "plan_ms": plan and plan["ms"], "plan_splits": plan and plan.get("splits"),
                    "best_ms": best and best["ms"],
                    "best": best and {k: best.get(k) for k in ("splits", "tiles", "flat")},
                    "best_norot_ms": (pick("norot") or {}).get("ms"),
                    "two_step_ms": (pick("lazy_two_step") or {}).get("ms"),
                    "bytes": mine[0].get("bytes") if mine else None})  # fmt: skip
    return out


def print_summary(result: dict) -> None:
    print(f"\n# {result['environment']['device']}  copy {result['ceilings']['copy_tb_per_s']:.2f} TB/s")
    print(f"{'shape':24} {'FI':>7} {'base':>7} {'b.nor':>7} {'2step':>7} {'plan':>7} {'best':>7} {'nor':>7}"
          "  best variant  plan/FI best/FI")  # fmt: skip
    for s in result["summary"]:

        def us(x):
            return f"{x * 1e3:7.1f}" if x else f"{'-':>7}"

        ratio = [f"{a / s['flashinfer_ms']:5.2f}" if a and s["flashinfer_ms"] else "    -"
                 for a in (s["plan_ms"], s["best_ms"])]  # fmt: skip
        tbs = f" {s['bytes'] / s['best_ms'] / 1e9:4.2f}TB/s" if s["bytes"] and s["best_ms"] else ""
        name = f"{s['kind'][:3]} {s['shape']}"
        print(f"{name:24} {us(s['flashinfer_ms'])} {us(s['base_lazy_ms'])} {us(s['base_norot_ms'])} "
              f"{us(s['two_step_ms'])} {us(s['plan_ms'])} {us(s['best_ms'])} {us(s['best_norot_ms'])}  {s['best']}  "
              f"{ratio[0]} {ratio[1]}{tbs}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--baseline", help="a folder holding another checkout's fast/ as the package basefast")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds after which no variant starts")
    parser.add_argument("--kinds", nargs="+", choices=("decode", "prefill"), default=["decode", "prefill"],
                        help="which shapes to time (default: both)")  # fmt: skip
    parser.add_argument("--stages", action="store_true",
                        help="decode: time only the plan at each pipeline depth of DECODE_STAGES")  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tune_h200.py needs a CUDA device")
    clock = Clock(args.budget)
    fi, fi_reason = flashinfer_or_reason()
    if fi is None:
        print(f"skipping FlashInfer: {fi_reason}", flush=True)
    base = load_baseline(args.baseline)
    result = {"environment": environment(fi), "ceilings": ceilings(), "flashinfer_skipped": fi_reason,
              "baseline": args.baseline, "budget_s": args.budget, "rows": []}  # fmt: skip
    rows = result["rows"]
    decode = {"stages_only": args.stages}
    work = [(decode_shape, shape, decode) for shape in DECODE_SHAPES] if "decode" in args.kinds else []
    if "prefill" in args.kinds:
        work[2:2] = [(prefill_shape, shape, {}) for shape in PREFILL_SHAPES]  # after the two B=1 decode shapes
    for fn, shape, options in work:
        try:
            fn(rows, clock, *shape, fi, base, **options)
        except Exception as exc:  # recorded: the other shapes still run
            rows.append({"kind": "error", "shape": list(shape[:3]), "error": traceback.format_exc()[-1500:]})
            print(f"{fn.__name__} {shape[:3]} failed: {type(exc).__name__}: {exc}", flush=True)
        torch.cuda.empty_cache()
        result["summary"] = summary(rows)
        result["seconds"] = time.monotonic() - clock.start
        with open(args.out, "w") as f:  # after every shape: a run cut short keeps what it measured
            json.dump(result, f, indent=1)
    result["compiled"] = compiled_report()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_summary(result)


if __name__ == "__main__":
    main()
