"""Shared-segment decode against the per-request decode and FlashInfer's cascade (GPU only).

Run: ``python benchmarks/shared_decode.py --out shared.json`` (``scripts/shared_gpu.sh`` does);
``--render benchmarks/results/NAME.json`` writes its docs page, ``docs/benchmarks/shared-decode.md``.

bf16, ``H = 32`` query heads over ``Hkv = 8`` KV heads, head dim 128, block size
``S = 64``, RoPE base 500,000 (the constants of ``benchmarks/kernels.py``).

* **Zipf rows.** ``B`` ∈ {16, 64, 256} decode requests, each reading ``k = 4`` of ``n`` ∈
  {4, 16, 64} documents of ``L`` ∈ {512, 2048} tokens, drawn without replacement with
  Zipf weights ``1 / rank`` (seeded) and placed back to back in the drawn order (so each
  request sees a document at its own offset, hence its own shift), then 64 own tokens.
  Providers: ``shared`` (:func:`lazyattention.fast.shared.shared_decode`, every
  document read by two or more requests read once) and ``per_request``
  (:func:`lazyattention.fast.lazy_decode`, every request reads all its blocks).
* **Shared-prefix rows** (where FlashInfer's cascade applies): all ``B`` requests read one
  document at position 0, then 64 own tokens. Providers: ``shared``, ``per_request`` and
  ``flashinfer_cascade`` (FlashInfer's two-level cascade as its
  ``MultiLevelCascadeAttentionWrapper`` runs one, with its FA2 prefill: the prefix for
  the whole batch, each request's own pages, merged as its ``merge_state_in_place``
  merges, by a Triton kernel of this file, since the slim wheel cannot build FlashInfer's;
  ``pos_encoding_mode="NONE"``, so the query is rotated at its position beforehand,
  outside the timed call, and the keys are read as stored, rotated at their positions —
  which, with the prefix at 0, they are). FlashInfer JIT-compiles that configuration at first use (minutes on the GPU
  machine): those rows run last, after the Zipf rows are written. Without FlashInfer the
  provider is skipped with the reason printed.

Every time is the median of CUDA-graph replays (``bench_graph`` of
``benchmarks/kernels.py``): device time of the kernels only; the sharing plan and its
metadata are built before, outside the timed region. **Effective bandwidth** = the
bytes a per-request read moves (K and V of every request's tokens, ``2 · Σ_r Tk_r · Hkv ·
D · 2``, plus q and out) ÷ time, for every provider: the shared path moves fewer bytes
for the same result, which is the point. **Parity first**: every provider's output for
the first two requests is compared with attention computed in float64 from the same
bf16 numbers (keys rotated in float64 at their logical positions), ``max|diff| ≤ 0.02``;
and the shared path with the per-request path on every request. A provider that fails
is marked and counts for no target. Each row also times the shared path's rest alone
(``rest_only_ms``: the per-request kernel over each request's unshared blocks), which
says how much of the shared path's time the shared segments themselves take.

Target (printed PASS/MISS): the shared path's effective bandwidth ≥ 2× the per-request
path's (time ratio ≥ 2) on every row where at least 16 requests share their documents
(the batch reads each shared document 16 times or more on average).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

import lazyattention.fast as fast
from lazyattention.fast import attend as fast_attend
from lazyattention.fast.rope import rope_tables
from lazyattention.fast.shared import plan_sharing, shared_decode, shared_launches, shared_tiles
from lazyattention.reference import Layout, Placement, RequestLayout, apply_rope

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling kernels.py

from kernels import (
    BLOCK,
    DTYPE,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    PARITY_TOLERANCE,
    ROPE,
    bench_graph,
    ceilings,
    environment,
    expected_outputs,
    flashinfer_or_reason,
    make_cache,
    measure,
)

OWN = 64
K_DOCS = 4
ZIPF_GRID = [(b, n, length) for length in (512, 2048) for n in (4, 16, 64) for b in (16, 64, 256)]
PREFIX_GRID = [(b, length) for length in (512, 2048) for b in (16, 64, 256)]
PROVIDERS = ("shared", "per_request", "flashinfer_cascade")
STAGES = ("rest", "shared", "merge", "shared_8_warps")  # the shared path's launches, each timed alone
TARGET_READERS = 16


# --------------------------------------------------------------------------- layouts


def layout_of(doc_lists: list[list[int]], num_docs: int, length: int) -> Layout:
    """Requests reading ``doc_lists[r]`` (document ids, in order) back to back from 0,
    then ``OWN`` own tokens stored where they are placed. Document ``d`` owns blocks
    ``[d·L/S, (d+1)·L/S)``; own blocks follow."""
    per_doc = math.ceil(length / BLOCK)
    next_block = num_docs * per_doc
    requests = []
    for docs in doc_lists:
        segments, start = [], 0
        for d in docs:
            segments.append(Placement(tuple(range(d * per_doc, (d + 1) * per_doc)), length, start))
            start += length
        own = tuple(range(next_block, next_block + math.ceil(OWN / BLOCK)))
        next_block += len(own)
        requests.append(RequestLayout(tuple(segments), Placement(own, OWN, start, start), 1))
    return Layout(requests, BLOCK)


def zipf_docs(batch: int, num_docs: int, gen: torch.Generator) -> list[list[int]]:
    """``k`` distinct documents per request, Zipf weights ``1 / rank``, in drawn order."""
    weights = 1.0 / torch.arange(1, num_docs + 1, dtype=torch.float64)
    k = min(K_DOCS, num_docs)
    return [torch.multinomial(weights, k, replacement=False, generator=gen).tolist() for _ in range(batch)]


# --------------------------------------------------------------------------- FlashInfer


#: FlashInfer's prefill backend for the cascade: its FA2 kernels compile from FlashInfer's
#: own headers; its Hopper ones ("fa3", what "auto" picks on sm_90) also need CUTLASS's,
#: which the slim wheel carried to the GPU machine does not hold.
CASCADE_BACKEND = "fa2"


@triton.jit
def _merge_state_kernel(v_ptr, s_ptr, v_other_ptr, s_other_ptr, H: tl.constexpr, D: tl.constexpr):
    """``(v, s) ← merge((v, s), (v_other, s_other))`` in place for one token's ``[H, D]``:
    FlashInfer's ``merge_state_in_place``, its log-sum-exp ``s`` in base 2, as one
    vectorised program per token. FlashInfer's CUDA merge compiles at first use from a
    source file (``csrc/cascade.cu``) that the slim wheel does not hold, and its Triton
    fallback loops over the ``H · D`` elements one scalar at a time: with it the whole
    cascade took 240–358 µs on the H200, the fallback's time, not the cascade's."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, H)
    rows = t * H * D + h[:, None] * D + tl.arange(0, D)[None, :]
    s, s_other = tl.load(s_ptr + t * H + h), tl.load(s_other_ptr + t * H + h)
    top = tl.maximum(s, s_other)
    w, w_other = tl.exp2(s - top), tl.exp2(s_other - top)
    v = (
        tl.load(v_ptr + rows).to(tl.float32) * w[:, None]
        + tl.load(v_other_ptr + rows).to(tl.float32) * w_other[:, None]
    )
    tl.store(v_ptr + rows, (v / (w + w_other)[:, None]).to(v_ptr.dtype.element_ty))
    tl.store(s_ptr + t * H + h, top + tl.log2(w + w_other))


def merge_state_in_place(v, s, v_other, s_other) -> None:
    """:func:`_merge_state_kernel` over ``v, v_other [T, H, D]``, ``s, s_other [T, H]``
    (contiguous; ``H`` and ``D`` powers of two, as in this benchmark)."""
    t, h, d = v.shape
    _merge_state_kernel[(t,)](v, s, v_other, s_other, H=h, D=d)


def flashinfer_cascade(fi, layout: Layout, q, k_cache, v_cache):
    """FlashInfer's two-level cascade over ``layout`` (every request: one shared prefix
    at 0, then own tokens), as its ``MultiLevelCascadeAttentionWrapper`` runs one: a
    ``BatchPrefillWithPagedKVCacheWrapper`` per level (the prefix for the whole batch,
    each request's own pages) and ``merge_state_in_place`` of their results, here with
    the :data:`CASCADE_BACKEND` prefill and :func:`merge_state_in_place`. Planned once
    (host), run in a CUDA graph. Returns the call."""
    b = layout.batch_size
    dev = "cuda"
    prefix = layout.requests[0].segments[0]
    own = [req.own for req in layout.requests]

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=dev)

    qo = [i32([0, b]), torch.arange(b + 1, dtype=torch.int32, device=dev)]
    indptr = [i32([0, len(prefix.blocks)]), i32([0, *itertools.accumulate(len(p.blocks) for p in own)])]
    indices = [i32(list(prefix.blocks)), i32([x for p in own for x in p.blocks])]
    last = [i32([(prefix.length - 1) % BLOCK + 1]), i32([(p.length - 1) % BLOCK + 1 for p in own])]
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    levels = []
    for level in zip(qo, indptr, indices, last, strict=True):
        wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=level[0], paged_kv_indptr_buf=level[1],
            paged_kv_indices_buf=level[2], paged_kv_last_page_len_buf=level[3], backend=CASCADE_BACKEND,
        )  # fmt: skip
        wrapper.plan(*level, HEADS, KV_HEADS, HEAD_DIM, BLOCK, causal=False, pos_encoding_mode="NONE",
                     q_data_type=DTYPE, kv_data_type=DTYPE)  # fmt: skip
        levels.append(wrapper)
    q_rot = apply_rope(q, layout.query_positions().to(dev), ROPE).to(DTYPE)  # outside the timed call

    def run():
        out, lse = levels[-1].run(q_rot, (k_cache, v_cache), return_lse=True)
        for wrapper in levels[:-1]:
            out_level, lse_level = wrapper.run(q_rot, (k_cache, v_cache), return_lse=True)
            merge_state_in_place(out, lse, out_level, lse_level)
        return out

    return run


# --------------------------------------------------------------------------- one row


def row(layout: Layout, gen: torch.Generator, fi=None, fi_reason: str | None = None, **shape) -> dict:
    """Check and time the providers on ``layout``; ``fi`` adds FlashInfer's cascade."""
    k_cache, v_cache = make_cache(layout, gen)
    q = torch.randn(layout.batch_size, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    t0 = time.perf_counter()
    sharing = plan_sharing(layout, 2)
    plan_ms = (time.perf_counter() - t0) * 1e3
    tiles = shared_tiles(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device)
    meta = sharing.metadata(q.device, tiles, KV_HEADS)  # built and uploaded before timing
    tokens = sum(sum(p.length for p in req.segments) + req.own.length for req in layout.requests)
    nbytes = 2 * tokens * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2
    check = min(2, layout.batch_size)
    expected = expected_outputs(q, k_cache, v_cache, layout, check)
    providers = {
        "shared": (lambda: shared_decode(q, k_cache, v_cache, layout, ROPE, sharing=sharing), "lazy"),
        "per_request": (lambda: fast.lazy_decode(q, k_cache, v_cache, layout, ROPE), "lazy"),
    }
    skipped = {}
    if fi is not None:
        try:  # its plan JIT-compiles the configuration at first use
            providers["flashinfer_cascade"] = (flashinfer_cascade(fi, layout, q, k_cache, v_cache), "lazy")
        except Exception as exc:  # recorded (the end of a failed build's log says why), our providers still timed
            skipped["flashinfer_cascade"] = f"plan failed: {type(exc).__name__}: {str(exc)[-1500:]}"
            print(f"flashinfer_cascade: {skipped['flashinfer_cascade']}", flush=True)
    elif fi_reason is not None:
        skipped["flashinfer_cascade"] = fi_reason
    per_request = fast.lazy_decode(q, k_cache, v_cache, layout, ROPE)
    same = float((shared_decode(q, k_cache, v_cache, layout, ROPE, sharing=sharing).double() - per_request.double())
                 .abs().max())  # fmt: skip
    pl = fast_attend.plan(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device, True, layout.batch_size * KV_HEADS,
                          layout.metadata("cuda").block_table.shape[1] * BLOCK)  # fmt: skip
    out = {**shape, "bytes": nbytes, "tokens": tokens, "shared_segments": len(sharing.segments),
           "readers": sharing.read_tokens / sharing.unique_tokens, "read_tokens": sharing.read_tokens,
           "unique_tokens": sharing.unique_tokens, "shared_splits": list(meta.splits), "shared_items": meta.num_items,
           "per_request_splits": pl.splits, "plan_ms": plan_ms, "shared_vs_per_request_max_diff": same,
           "ms": {}, "parity": {}, "max_diff": {}}  # fmt: skip
    measure(out, providers, expected, check, skipped)
    out["parity"]["shared"] = out["parity"].get("shared") is True and same <= PARITY_TOLERANCE
    # Where the shared path's time goes: its rest alone (the per-request kernel over every
    # request's unshared blocks), the remainder being the shared kernel, query and merge.
    try:
        out["rest_only_ms"] = bench_graph(lambda: fast.lazy_decode(q, k_cache, v_cache, sharing.rest, ROPE))
    except Exception as exc:  # a diagnostic: recorded, never fatal
        out["rest_only_ms"], out["rest_only_error"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        out["stages_ms"] = stages(q, k_cache, v_cache, sharing)
    except Exception as exc:  # likewise
        out["stages_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["effective_tb_per_s"] = {k: (nbytes / (t * 1e-3) / 1e12 if t else None) for k, t in out["ms"].items()}
    return out


def stages(q, k_cache, v_cache, sharing) -> dict[str, float]:
    """Each launch of the shared path timed alone (ms): the rest, the shared kernel, the
    merge (:func:`~lazyattention.fast.shared.shared_launches`); and the shared kernel
    over 8 warps instead of the plan's 4 (``shared_8_warps``), the tiles it had before."""
    tiles = shared_tiles(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device)
    tables = rope_tables(ROPE, tiles.dp, q.device)
    launches, _, _ = shared_launches(q, k_cache, v_cache, sharing, tables, HEAD_DIM**-0.5)
    for launch in launches.values():  # in order once: the merge reads what the others wrote
        launch()
    times = {name: bench_graph(launch) for name, launch in launches.items()}
    wide, _, _ = shared_launches(q, k_cache, v_cache, sharing, tables, HEAD_DIM**-0.5, tiles._replace(num_warps=8))
    times["shared_8_warps"] = bench_graph(wide["shared"])
    return times


def speedup(r: dict, base: str = "per_request") -> float | None:
    ok = all(r["parity"].get(n) is True and r["ms"].get(n) for n in ("shared", base))
    return r["ms"][base] / r["ms"]["shared"] if ok else None


def target(rows: list[dict]) -> dict:
    qualifying = [r for r in rows if r["readers"] >= TARGET_READERS]
    values = [(speedup(r), r) for r in qualifying]
    worst = min(values, key=lambda x: -math.inf if x[0] is None else x[0]) if values else (None, None)
    where = "-" if worst[1] is None else _where(worst[1])
    return {
        "target": f"shared >= 2x the effective bandwidth of per-request when >= {TARGET_READERS} requests share "
        "their documents (time ratio per_request / shared >= 2)",
        "pass": bool(values) and all(v is not None and v >= 2.0 for v, _ in values),
        "worst": worst[0],
        "where": where,
        "rows": len(qualifying),
    }


def _where(r: dict) -> str:
    return f"B={r['batch']} n={r.get('docs', 1)} L={r['length']}"


def print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\n# shared-segment decode, {env['device']}  copy {result['ceilings']['copy_tb_per_s']:.2f} TB/s")
    print(f"{'rows':24} {'readers':>7} " + " ".join(f"{n:>22}" for n in PROVIDERS)
          + "  per_req/shared  rest µs  alone µs: " + "+".join(STAGES))  # fmt: skip
    for kind in ("zipf", "prefix"):
        for r in result.get(kind, []):
            cells = []
            for n in PROVIDERS:
                t = r["ms"].get(n)
                mark = "!" if r["parity"].get(n) is False else " "
                cells.append(f"{t * 1e3:9.1f}µs({r['effective_tb_per_s'][n]:5.2f}){mark}" if t else f"{'-':>22}")
            s = speedup(r)
            ratio = f"{s:14.2f}" if s else f"{'-':>14}"
            alone = "+".join(f"{r['stages_ms'][k] * 1e3:.1f}" for k in STAGES if k in r.get("stages_ms", {}))
            print(f"{kind} {_where(r):19} {r['readers']:7.1f} " + " ".join(cells) + f"  {ratio}"
                  + (f"  {r['rest_only_ms'] * 1e3:7.1f}" if r.get("rest_only_ms") else "") + f"  {alone}")  # fmt: skip
    for t in result["targets"]:
        worst = "n/a" if t["worst"] is None else f"{t['worst']:.2f}"
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: worst {worst} at {t['where']} ({t['rows']} rows)")
    if result.get("flashinfer_skipped"):
        print(f"flashinfer_cascade skipped: {result['flashinfer_skipped']}")


PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "shared-decode.md"


def page(result: dict, name: str, notes: str | None) -> str:
    """The docs page ``docs/benchmarks/shared-decode.md`` for a result dictionary, with
    the hand-written analysis ``notes`` (``<name>.notes.md`` beside the result) below."""
    env = result["environment"]
    lines = [
        "# Shared-segment decode",
        "",
        f"<!-- Generated by benchmarks/shared_decode.py from benchmarks/results/{name}.json; do not edit by hand. -->",
        "",
        f"Measured by `benchmarks/shared_decode.py` on **{env['device']}** "
        f"({env['sms']} SMs), torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; "
        f"copy bandwidth {result['ceilings']['copy_tb_per_s']:.2f} TB/s. {result['dtype']}, "
        f"{result['heads']} query / {result['kv_heads']} KV heads, head dim {result['head_dim']}, block size "
        f"{result['block_size']}; each request reads {result['docs_per_request']} of `n` documents of `L` tokens "
        "drawn under Zipf (or, in the prefix rows, one document at position 0), then "
        f"{result['own_tokens']} own tokens. `shared` is `lazyattention.fast.shared.shared_decode` (every "
        "document read by two or more requests of the batch read once), `per_request` is "
        "`lazyattention.fast.lazy_decode`, `cascade` FlashInfer's two-level cascade (prefix rows only: it "
        "serves one shared prefix at position 0). Effective bandwidth is the bytes a per-request read moves ÷ time; "
        "`readers` is the mean number of requests reading each shared document. The last columns time each "
        "launch of the shared path alone: its rest (the per-request kernel over each request's unshared "
        "blocks), the shared kernel, the merge; and the shared kernel over 8 warps instead of the plan's 4.",
        "",
    ]
    if result.get("flashinfer_skipped"):
        lines += [f"FlashInfer's cascade was not timed in this run: {result['flashinfer_skipped']}.", ""]
    lines += ["| target | verdict | worst | where |", "|---|---|---|---|"]
    for t in result["targets"]:
        worst = "n/a" if t["worst"] is None else f"{t['worst']:.2f}"
        lines.append(f"| {t['target']} | {'PASS' if t['pass'] else '**MISS**'} | {worst} | {t['where']} |")
    lines += [
        "",
        "| rows | B | n | L | readers | shared µs (TB/s) | per-request µs (TB/s) | cascade µs (TB/s) "
        "| per-request ÷ shared | alone µs: rest / shared / merge | shared, 8 warps µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("zipf", "prefix"):
        for r in result.get(kind, []):
            cells = [
                f"{r['ms'][n] * 1e3:.1f} ({r['effective_tb_per_s'][n]:.2f})" if r["ms"].get(n) else "n/a"
                for n in PROVIDERS
            ]
            if kind == "zipf":
                cells[2] = "–"  # the cascade serves a shared prefix only
            ratio = speedup(r)
            stage = r.get("stages_ms", {})
            alone = " / ".join(f"{stage[k] * 1e3:.1f}" if k in stage else "n/a" for k in ("rest", "shared", "merge"))
            wide = f"{stage['shared_8_warps'] * 1e3:.1f}" if "shared_8_warps" in stage else "n/a"
            lines.append(
                f"| {kind} | {r['batch']} | {r.get('docs', 1)} | {r['length']} | {r['readers']:.1f} | "
                + " | ".join(cells)
                + f" | {'n/a' if ratio is None else f'{ratio:.2f}'} | {alone} | {wide} |"
            )
    if notes:
        lines += ["", notes.strip()]
    lines.append("")
    return "\n".join(lines)


def render(result_path: Path) -> str:
    """:func:`page` of a saved result and its notes."""
    notes = result_path.with_suffix(".notes.md")
    return page(json.loads(result_path.read_text()), result_path.stem, notes.read_text() if notes.exists() else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only write the docs page from a saved result")
    parser.add_argument("--quick", action="store_true", help="a few rows only (smoke test)")
    parser.add_argument("--no-cascade", action="store_true", help="skip FlashInfer's cascade (its JIT compile)")
    args = parser.parse_args()
    if args.render:
        PAGE.write_text(render(args.render))
        print(f"wrote {PAGE}")
        return
    if not args.out:
        parser.error("--out is required (or --render)")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/shared_decode.py needs a CUDA device")
    fi, fi_reason = (None, "--no-cascade") if args.no_cascade else flashinfer_or_reason()
    if fi is None:
        print(f"skipping FlashInfer's cascade: {fi_reason}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    docs_gen = torch.Generator().manual_seed(0)
    result = {"environment": environment(fi), "ceilings": ceilings(), "dtype": "bfloat16", "heads": HEADS,
              "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "rope_base": ROPE.base,
              "own_tokens": OWN, "docs_per_request": K_DOCS, "zipf_exponent": 1.0, "parity_tolerance": PARITY_TOLERANCE,
              "flashinfer_skipped": fi_reason, "zipf": [], "prefix": []}  # fmt: skip

    def save():
        result["targets"] = [target(result["zipf"] + result["prefix"])]
        with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
            json.dump(result, f, indent=1)

    zipf_grid = ZIPF_GRID[:3] if args.quick else ZIPF_GRID
    for i, (b, n, length) in enumerate(zipf_grid):
        layout = layout_of(zipf_docs(b, n, docs_gen), n, length)
        result["zipf"].append(row(layout, gen, batch=b, docs=n, length=length))
        r = result["zipf"][-1]
        print(f"[zipf {i + 1}/{len(zipf_grid)}] B={b} n={n} L={length} readers {r['readers']:.1f} "
              f"ms {r['ms']} speedup {speedup(r)}", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
        save()
    prefix_grid = PREFIX_GRID[:2] if args.quick else PREFIX_GRID
    for i, (b, length) in enumerate(prefix_grid):  # last: FlashInfer may JIT-compile its cascade here
        layout = layout_of([[0]] * b, 1, length)
        result["prefix"].append(row(layout, gen, fi, fi_reason, batch=b, length=length))
        r = result["prefix"][-1]
        failed = r["max_diff"].get("flashinfer_cascade")
        if fi is not None and isinstance(failed, str):  # its plan or its run failed: not retried per row
            fi, fi_reason = None, failed
            result["flashinfer_skipped"] = failed
        print(f"[prefix {i + 1}/{len(prefix_grid)}] B={b} L={length} ms {r['ms']}", flush=True)
        torch.cuda.empty_cache()
        save()
    print_table(result)


if __name__ == "__main__":
    main()
