"""Kernel benchmark of the fast path, side by side with FlashInfer, in one run (GPU only).

Run: ``python benchmarks/kernels.py --out results.json`` (``scripts/gpu_suite.sh`` does).

bf16, ``H = 32`` query heads over ``Hkv = 8`` KV heads, head dim 128, block size (and
FlashInfer page size) ``S = 64``, RoPE base 500,000. Every time is the median of many
replays of a CUDA graph after warm-up (``triton.testing.do_bench_cudagraph``): device
time, without the host's launch overhead, which at these sizes is as large as the
kernels. A provider whose call cannot be captured is timed by ``do_bench`` and marked.

* **Ceilings**: device-to-device copy bandwidth (bytes read + written over the time of
  a 2 GiB ``copy_``) and a bf16 8192³ matrix product.
* **Decode** (one query per request, ``B`` ∈ {1, 16, 64, 256} × ``Tk`` ∈ {1k, 4k, 16k,
  64k} keys, documents of 512 or 4096 tokens placed back to back, then 64 own tokens;
  every request reads its own blocks). ``B · Tk ≤ 2^22`` (16 GiB of K and V), and
  4096-token documents only from 4k keys. Providers: ``lazy`` (the kernels of
  ``fast.lazy_decode`` without the public function's host-side checks;
  ``public_api_same`` records that both give the same bits), ``norot`` (the same kernel
  with the rotation switched off), ``materialise`` (Block-Attention: copy + re-rotate
  the request's blocks, then the decode kernel over the copy), ``flashinfer`` and
  ``flashinfer_tc`` (FlashInfer's paged decode on CUDA cores and on tensor cores,
  ``pos_encoding_mode="ROPE_LLAMA"``). Bytes = ``2 · B · Tk · Hkv · D · 2`` plus q and out.
* **Prefill** (``B`` ∈ {1, 8} requests, ``Tq`` ∈ {128, 512, 1024} own query tokens after
  8 documents of 512 or 4096 tokens). Providers: ``lazy``, ``norot``, ``materialise``,
  ``sdpa_flash`` (PyTorch SDPA on contiguous, pre-rotated keys, KV heads expanded,
  bottom-right causal mask = documents visible + own tokens causal) and ``flashinfer``
  (FlashInfer's paged batch prefill with ``ROPE_LLAMA``, causal). FLOPs =
  ``4 · H · D · Σ_requests (Tq · Tseg + Tq (Tq + 1) / 2)``.

**FlashInfer's best case.** FlashInfer rotates keys inside the kernel at the positions
``0 .. n − 1`` of each paged sequence, so it reads *unrotated* keys, contiguous in
logical order. It cannot place a cached document at another offset without rewriting
its keys; here every document sits where FlashInfer expects it. Without FlashInfer
installed its providers are skipped with the reason printed.

**Parity first.** Before a provider is timed its output for the first request(s) is
compared with attention computed in float64 from the same bf16 numbers, with the keys
rotated in float64 at the positions that provider's function defines (logical positions
``R(δ) k`` for ``lazy`` and ``materialise``, ``R(j) k`` of the unrotated cache for
FlashInfer, no rotation for ``norot``): ``max|diff| <= 0.02`` (bf16 outputs of magnitude
≤ 1). A provider that fails is marked and counts for no target.

Targets (printed PASS/MISS): lazy time ÷ FlashInfer's (the faster of its decodes) ≤ 1 at
every decode and prefill shape; decode ≥ 90% of the copy bandwidth at ``Tk ≥ 4k`` and
``B ≥ 16``; one request of 16k keys ≥ 1.8 TB/s; prefill at least as fast as SDPA flash;
rotation overhead ≤ 5% against ``norot`` at ``Tk ≥ 4k``; lazy faster than materialise.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import subprocess

import torch
import triton
import triton.testing

import lazyattention.fast as fast
from lazyattention.fast import attend as fast_attend
from lazyattention.fast import kernels as fast_kernels
from lazyattention.fast.cache import materialise
from lazyattention.fast.rope import rope_tables
from lazyattention.reference import Layout, Placement, RequestLayout, RopeConfig, apply_rope

DTYPE = torch.bfloat16
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64
ROPE = RopeConfig(head_dim=HEAD_DIM, base=500_000.0)
PARITY_TOLERANCE = 0.02
DOCS_PREFILL = 8
PREFILL_GRID = [(b, tq, doc) for doc in (512, 4096) for b in (1, 8) for tq in (128, 512, 1024)]  # (B, Tq, L)
DECODE_GRID = [  # (B, Tk, L) with B · Tk ≤ 2^22 tokens, 4096-token documents from 4k keys
    (b, tk, doc)
    for doc in (512, 4096)
    for b in (1, 16, 64, 256)
    for tk in (1024, 4096, 16384, 65536)
    if b * tk <= 2**22 and doc < tk
]
OWN_DECODE = 64


def bench(fn) -> float:
    """Median milliseconds of ``fn`` after warm-up (host launches included)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: device time without the
    Python launch overhead, which is larger than the kernels at small sizes."""
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


def flashinfer_or_reason():
    """``(module, None)``, or ``(None, why)`` when FlashInfer cannot be used here."""
    try:
        import flashinfer
    except Exception as exc:  # not installed, or built for another torch / CUDA
        return None, f"FlashInfer not importable ({type(exc).__name__}: {str(exc)[:120]})"
    return flashinfer, None


# --------------------------------------------------------------------------- inputs


def make_layout(batch: int, segment_lengths: list[int], own: int, queries: int, block: int = BLOCK) -> Layout:
    """``batch`` requests, each with its own blocks: segments stored at 0 and placed back
    to back (shift = start), then ``own`` tokens stored where they are placed."""
    requests, next_block = [], 0

    def blocks(length):
        nonlocal next_block
        n = math.ceil(length / block)
        next_block += n
        return tuple(range(next_block - n, next_block))

    for _ in range(batch):
        segments, start = [], 0
        for length in segment_lengths:
            segments.append(Placement(blocks(length), length, start))
            start += length
        requests.append(RequestLayout(tuple(segments), Placement(blocks(own), own, start, start), queries))
    return Layout(requests, block)


def decode_layout(batch: int, tk: int, doc: int) -> Layout:
    """``batch`` decode requests of ``tk`` keys: documents of ``doc`` tokens back to back
    (the last one shorter if ``doc`` does not divide), then ``OWN_DECODE`` own tokens."""
    docs = [doc] * ((tk - OWN_DECODE) // doc)
    rest = tk - OWN_DECODE - sum(docs)
    if rest:
        docs.append(rest)
    return make_layout(batch, docs, OWN_DECODE, 1)


def make_cache(layout: Layout, gen: torch.Generator):
    n = max(max(p.blocks) for req in layout.requests for p in (*req.segments, req.own)) + 1
    shape = (n, layout.block_size, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    v = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    return k, v


def request_blocks(req: RequestLayout) -> list[int]:
    """A request's physical blocks in logical order (segments, then own)."""
    return [b for p in (*req.segments, req.own) for b in p.blocks]


def request_tokens(cache: torch.Tensor, req: RequestLayout) -> torch.Tensor:
    """``[Tk, Hkv, D]``: a request's cached tokens in logical order (every block full)."""
    return cache[torch.tensor(request_blocks(req), device=cache.device)].flatten(0, 1)


def token_shifts(req: RequestLayout) -> torch.Tensor:
    return torch.cat([torch.full((p.length,), p.shift, dtype=torch.int64) for p in (*req.segments, req.own)]).cuda()


def attention64(q, k, v, scale):
    """Float64 attention of ``q [Tq, H, D]`` over ``k, v [Tk, Hkv, D]`` with the
    bottom-right causal mask (query ``i`` sees keys ``j ≤ Tk − Tq + i``): documents
    visible to every query, own tokens causal. Heads in chunks, to bound the memory."""
    tq, tk, g = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    visible = torch.arange(tk, device=q.device)[None, :] <= (tk - tq + torch.arange(tq, device=q.device))[:, None]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h0 in range(0, q.shape[1], 8):
        kh = k.double().repeat_interleave(g, dim=1)[:, h0 : h0 + 8]
        vh = v.double().repeat_interleave(g, dim=1)[:, h0 : h0 + 8]
        s = torch.einsum("qhd,khd->hqk", q[:, h0 : h0 + 8].double(), kh) * scale
        p = s.masked_fill(~visible[None], float("-inf")).softmax(-1)
        out[:, h0 : h0 + 8] = torch.einsum("hqk,khd->qhd", p, vh)
    return out


def expected_outputs(q, k_cache, v_cache, layout, requests: int) -> dict[str, torch.Tensor]:
    """The float64 truth for the first ``requests`` requests, per kind of key:
    ``lazy`` (stored keys re-rotated by δ to logical positions, the query at its own),
    ``raw`` (the cache read as unrotated keys at logical positions ``0 .. Tk − 1``: what
    FlashInfer computes) and ``norot`` (no rotation)."""
    scale = 1.0 / math.sqrt(HEAD_DIM)
    out = {"lazy": [], "raw": [], "norot": []}
    q_pos = layout.query_positions().cuda()
    row = 0
    for req in layout.requests[:requests]:
        qr = q[row : row + req.num_queries].double()
        pos = q_pos[row : row + req.num_queries]
        row += req.num_queries
        k, v = request_tokens(k_cache, req).double(), request_tokens(v_cache, req)
        q_rot = apply_rope(qr, pos, ROPE)
        logical = torch.arange(k.shape[0], device="cuda")
        out["lazy"].append(attention64(q_rot, apply_rope(k, token_shifts(req), ROPE), v, scale))
        out["raw"].append(attention64(q_rot, apply_rope(k, logical, ROPE), v, scale))
        out["norot"].append(attention64(qr, k, v, scale))
    return {name: torch.cat(parts) for name, parts in out.items()}


def sdpa_inputs(q, k_cache, v_cache, layout):
    """``[B, H, T, D]`` tensors for SDPA: query rotated at its positions, keys rotated to
    logical positions (pre-rotated, contiguous), KV heads expanded."""
    tables = rope_tables(ROPE, HEAD_DIM, torch.device("cuda"))
    k, v, _ = materialise(k_cache, v_cache, layout.metadata("cuda"), tables, DTYPE)
    b = layout.batch_size
    q_rot = apply_rope(q, layout.query_positions().cuda(), ROPE).view(b, -1, HEADS, HEAD_DIM)
    g = HEADS // KV_HEADS
    expand = lambda x: x.view(b, -1, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(g, dim=1).contiguous()  # noqa: E731
    return q_rot.transpose(1, 2).contiguous(), expand(k), expand(v)


def sdpa_flash(q, k, v, scale):
    """SDPA's FlashAttention backend with the bottom-right causal bias."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[2], k.shape[2])

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    return run


def flashinfer_pages(layout: Layout):
    """FlashInfer's page table of ``layout``: ``indptr [B + 1]``, ``indices``, and
    ``last_page_len [B]`` (int32), each request's blocks in logical order."""
    tables = [request_blocks(req) for req in layout.requests]
    indptr = torch.tensor([0, *itertools.accumulate(len(t) for t in tables)], dtype=torch.int32, device="cuda")
    indices = torch.tensor([b for t in tables for b in t], dtype=torch.int32, device="cuda")
    last = [(req.own.start + req.own.length - 1) % layout.block_size + 1 for req in layout.requests]
    return indptr, indices, torch.tensor(last, dtype=torch.int32, device="cuda")


def flashinfer_decode(fi, layout, q, k_cache, v_cache, tensor_cores: bool):
    """FlashInfer's paged decode with RoPE in the kernel, planned once (host), run in a
    CUDA graph (its buffers fixed at construction)."""
    indptr, indices, last = flashinfer_pages(layout)
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last,
    )  # fmt: skip
    wrapper.plan(indptr, indices, last, HEADS, KV_HEADS, HEAD_DIM, BLOCK, pos_encoding_mode="ROPE_LLAMA",
                 rope_theta=ROPE.base, q_data_type=DTYPE, kv_data_type=DTYPE)  # fmt: skip
    return lambda: wrapper.run(q, (k_cache, v_cache))


def flashinfer_prefill(fi, layout, q, k_cache, v_cache):
    """FlashInfer's paged batch prefill (causal, bottom-right) with RoPE in the kernel."""
    indptr, indices, last = flashinfer_pages(layout)
    qo = [0, *itertools.accumulate(r.num_queries for r in layout.requests)]
    qo = torch.tensor(qo, dtype=torch.int32, device="cuda")
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=qo, paged_kv_indptr_buf=indptr,
        paged_kv_indices_buf=indices, paged_kv_last_page_len_buf=last,
    )  # fmt: skip
    wrapper.plan(qo, indptr, indices, last, HEADS, KV_HEADS, HEAD_DIM, BLOCK, causal=True,
                 pos_encoding_mode="ROPE_LLAMA", rope_theta=ROPE.base, q_data_type=DTYPE,
                 kv_data_type=DTYPE)  # fmt: skip
    return lambda: wrapper.run(q, (k_cache, v_cache))


def measure(row: dict, providers: dict, expected: dict, rows_checked: int, skipped: dict) -> None:
    """Check each provider's first rows against its float64 truth, then time it."""
    for name, (fn, truth) in providers.items():
        try:
            out = fn()
            diff = float((out[:rows_checked].double() - expected[truth]).abs().max())
            row["max_diff"][name] = diff
            row["parity"][name] = bool(diff <= PARITY_TOLERANCE)
            try:
                row["ms"][name] = bench_graph(fn)
            except Exception as exc:  # not capturable: host launches included, and said so
                row["ms"][name] = bench(fn)
                row.setdefault("timed_without_graph", {})[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        except Exception as exc:  # recorded, so one failure does not hide the other rows
            row["ms"][name], row["parity"][name] = None, None
            row["max_diff"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for name, why in skipped.items():
        row["ms"][name], row["parity"][name], row["max_diff"][name] = None, None, why


# --------------------------------------------------------------------------- prefill


def prefill_row(batch: int, tq: int, doc: int, gen: torch.Generator, fi, fi_reason) -> dict:
    layout = make_layout(batch, [doc] * DOCS_PREFILL, tq, tq)
    tables = rope_tables(ROPE, HEAD_DIM, torch.device("cuda"))
    k_cache, v_cache = make_cache(layout, gen)
    q = torch.randn(layout.num_queries, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    meta = layout.metadata("cuda")
    seg_tokens = DOCS_PREFILL * doc
    flops = 4 * HEADS * HEAD_DIM * batch * (tq * seg_tokens + tq * (tq + 1) / 2)
    expected = expected_outputs(q, k_cache, v_cache, layout, 1)
    qs, ks, vs = sdpa_inputs(q, k_cache, v_cache, layout)
    flash = sdpa_flash(qs, ks, vs, scale)

    def ours(mode):
        return lambda: fast_attend.attend(q, k_cache, v_cache, meta, tables, tq, scale, mode, False, False)[0]

    def block_attention():
        """Block-Attention: copy + re-rotate in the cache dtype, then the kernel with δ = 0."""
        kc, vc, m = materialise(k_cache, v_cache, meta, tables, DTYPE)
        return fast_attend.attend(q, kc, vc, m, tables, tq, scale, fast_attend.LAZY, False, False)[0]

    providers = {
        "lazy": (ours(fast_attend.LAZY), "lazy"),
        "norot": (ours(fast_attend.NONE), "norot"),
        "materialise": (block_attention, "lazy"),
        "sdpa_flash": (lambda: flash().transpose(1, 2).flatten(0, 1), "lazy"),
    }
    skipped = {}
    if fi is not None:
        providers["flashinfer"] = (flashinfer_prefill(fi, layout, q, k_cache, v_cache), "raw")
    else:
        skipped["flashinfer"] = fi_reason
    pl = fast_attend.plan(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device, False, batch * KV_HEADS,
                          max(len(request_blocks(r)) for r in layout.requests) * BLOCK, tq)  # fmt: skip
    row = {"batch": batch, "Tq": tq, "segment": doc, "segments": DOCS_PREFILL, "Tk": seg_tokens + tq,
           "flops": flops, "splits": pl.splits, "ms": {}, "parity": {}, "max_diff": {},
           "public_api_same": bool(torch.equal(fast.lazy_prefill(q, k_cache, v_cache, layout, ROPE),
                                               ours(fast_attend.LAZY)()))}  # fmt: skip
    measure(row, providers, expected, tq, skipped)
    row["tflops"] = {k: (flops / (t * 1e-3) / 1e12 if t else None) for k, t in row["ms"].items()}
    return row


# --------------------------------------------------------------------------- decode


def decode_row(batch: int, tk: int, doc: int, gen: torch.Generator, fi, fi_reason) -> dict:
    layout = decode_layout(batch, tk, doc)
    tables = rope_tables(ROPE, HEAD_DIM, torch.device("cuda"))
    k_cache, v_cache = make_cache(layout, gen)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    meta = layout.metadata("cuda")
    nbytes = 2 * batch * tk * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2
    check = min(batch, 2)
    expected = expected_outputs(q, k_cache, v_cache, layout, check)

    def ours(mode, kc=k_cache, vc=v_cache, m=meta):
        return lambda: fast_attend.attend(q, kc, vc, m, tables, 1, scale, mode, True, False)[0]

    def materialised():
        kc, vc, m = materialise(k_cache, v_cache, meta, tables, DTYPE)
        return ours(fast_attend.LAZY, kc, vc, m)()

    providers = {
        "lazy": (ours(fast_attend.LAZY), "lazy"),
        "norot": (ours(fast_attend.NONE), "norot"),
        "materialise": (materialised, "lazy"),
    }
    skipped = {}
    for name, tc in (("flashinfer", False), ("flashinfer_tc", True)):
        if fi is not None:
            providers[name] = (flashinfer_decode(fi, layout, q, k_cache, v_cache, tc), "raw")
        else:
            skipped[name] = fi_reason
    pl = fast_attend.plan(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device, True, batch * KV_HEADS,
                          meta.block_table.shape[1] * BLOCK)  # fmt: skip
    row = {"batch": batch, "Tk": tk, "segment": doc, "bytes": nbytes, "splits": pl.splits,
           "ms": {}, "parity": {}, "max_diff": {},
           "public_api_same": bool(torch.equal(fast.lazy_decode(q, k_cache, v_cache, layout, ROPE),
                                               ours(fast_attend.LAZY)()))}  # fmt: skip
    measure(row, providers, expected, check, skipped)
    row["tb_per_s"] = {k: (nbytes / (t * 1e-3) / 1e12 if t else None) for k, t in row["ms"].items()}
    return row


# --------------------------------------------------------------------------- ceilings and targets


def ceilings() -> dict:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ a)
    return {
        "copy_tb_per_s": 2 * 2**30 / (copy_ms * 1e-3) / 1e12,
        "bf16_matmul_tflops": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12,
    }


def ok(row, name):
    return row["parity"].get(name) is True and row["ms"].get(name)


def _target(name: str, rows: list, value, passes, kind: str) -> dict:
    """A target over ``rows``: ``value(row)`` (None = not measured) and ``passes(v)``;
    the worst row is the one with the largest value, or the first not measured."""
    values = [(value(r), r) for r in rows]
    missing = [r for v, r in values if v is None]
    measured = [(v, r) for v, r in values if v is not None]
    worst = max(measured, key=lambda x: x[0]) if measured else (None, None)
    where = _where(kind, missing[0] if missing else worst[1]) if rows else "no rows"
    return {"target": name, "pass": bool(rows) and not missing and all(passes(v) for v, _ in measured),
            "worst": worst[0], "where": where, "not_measured": len(missing)}  # fmt: skip


def _ratio(row, a, *bs):
    """time(a) / min(time(b) for the b that passed), or None."""
    base = [row["ms"][b] for b in bs if ok(row, b)]
    return row["ms"][a] / min(base) if ok(row, a) and base else None


def targets(result: dict) -> list[dict]:
    """Each target with its verdict, the worst measured value and where."""
    copy_bw = result["ceilings"]["copy_tb_per_s"]
    pre, dec = result["prefill"], result["decode"]
    out = []
    for kind, rows, fis in (("decode", dec, ("flashinfer", "flashinfer_tc")), ("prefill", pre, ("flashinfer",))):
        out.append(_target(f"{kind}: lazy time / FlashInfer time <= 1 at every shape", rows,
                           lambda r, fis=fis: _ratio(r, "lazy", *fis), lambda v: v <= 1.0, kind))  # fmt: skip
    big = [r for r in dec if r["Tk"] >= 4096 and r["batch"] >= 16]
    # The worst row of a bandwidth target is the slowest: use the shortfall 1 - fraction.
    t = _target("decode >= 90% of copy bandwidth (Tk >= 4k, B >= 16), as 1 - fraction <= 0.10", big,
                lambda r: 1 - r["tb_per_s"]["lazy"] / copy_bw if ok(r, "lazy") else None, lambda v: v <= 0.10,
                "decode")  # fmt: skip
    out.append(t)
    one = [r for r in dec if r["Tk"] == 16384 and r["batch"] == 1]
    out.append(_target("decode B=1 Tk=16k >= 1.8 TB/s, as 1.8 - TB/s <= 0", one,
                       lambda r: 1.8 - r["tb_per_s"]["lazy"] if ok(r, "lazy") else None, lambda v: v <= 0.0,
                       "decode"))  # fmt: skip
    out.append(_target("prefill: lazy time / SDPA flash time <= 1 at every shape", pre,
                       lambda r: _ratio(r, "lazy", "sdpa_flash"), lambda v: v <= 1.0, "prefill"))  # fmt: skip
    for kind, rows in (("prefill", pre), ("decode", dec)):
        long = [r for r in rows if r["Tk"] >= 4096]
        out.append(_target(f"{kind}: rotation overhead <= 5% vs the same kernel without rotation (Tk >= 4k)", long,
                           lambda r: _ratio(r, "lazy", "norot") - 1 if _ratio(r, "lazy", "norot") else None,
                           lambda v: v <= 0.05, kind))  # fmt: skip
        out.append(_target(f"{kind}: lazy faster than materialise at every shape (time ratio < 1)", rows,
                           lambda r: _ratio(r, "lazy", "materialise"), lambda v: v < 1.0, kind))  # fmt: skip
    return out


def _where(kind, row):
    if row is None:
        return "-"
    if kind == "prefill":
        return f"B={row['batch']} Tq={row['Tq']} {row['segments']}x{row['segment']}"
    return f"B={row['batch']} Tk={row['Tk']} L={row['segment']}"


def environment(fi) -> dict:
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "flashinfer": getattr(fi, "__version__", None),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    try:
        query = "clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,driver_version,power.limit"
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"unreadable: {exc}"
    return env


PREFILL_PROVIDERS = ("lazy", "norot", "materialise", "sdpa_flash", "flashinfer")
DECODE_PROVIDERS = ("lazy", "norot", "materialise", "flashinfer", "flashinfer_tc")


def print_table(result: dict) -> None:
    print(f"\n# {result['environment']['device']}  copy {result['ceilings']['copy_tb_per_s']:.2f} TB/s  "
          f"bf16 mm {result['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    print("prefill µs (TFLOP/s)          " + " ".join(f"{n:>14}" for n in PREFILL_PROVIDERS) + "  lazy/FI")
    for r in result["prefill"]:
        cells = []
        for n in PREFILL_PROVIDERS:
            t = r["ms"].get(n)
            mark = "!" if r["parity"].get(n) is False else " "
            cells.append(f"{t * 1e3:7.1f}({r['tflops'][n]:4.0f}){mark}" if t else f"{'-':>14}")
        ratio = _ratio(r, "lazy", "flashinfer")
        print(f"B={r['batch']} Tq={r['Tq']:4d} {r['segments']}x{r['segment']:4d} P={r['splits']:2d} " + " ".join(cells)
              + (f"  {ratio:5.2f}" if ratio else ""))  # fmt: skip
    print("decode µs (TB/s)              " + " ".join(f"{n:>14}" for n in DECODE_PROVIDERS) + "  lazy/FI")
    for r in result["decode"]:
        cells = []
        for n in DECODE_PROVIDERS:
            t = r["ms"].get(n)
            mark = "!" if r["parity"].get(n) is False else " "
            cells.append(f"{t * 1e3:7.1f}({r['tb_per_s'][n]:4.2f}){mark}" if t else f"{'-':>14}")
        ratio = _ratio(r, "lazy", "flashinfer", "flashinfer_tc")
        print(f"B={r['batch']:3d} Tk={r['Tk']:5d} L={r['segment']:4d} P={r['splits']:2d} " + " ".join(cells)
              + (f"  {ratio:5.2f}" if ratio else ""))  # fmt: skip
    for t in result["targets"]:
        worst = "n/a" if t["worst"] is None else f"{t['worst']:.3f}"
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: worst {worst} at {t['where']}")


def with_tiles(
    base: fast_attend.Plan,
    block_m: int,
    block_n: int,
    warps: int,
    stages: int,
    splits: int | None = None,
    tma: bool = True,
) -> fast_attend.Plan:
    """``base`` with other tile sizes (``tma=False`` forces the row-gather key loads)."""
    block_q = max(1, block_m // base.gp) if base.block_q > 1 or block_m > base.gp else 1
    return base._replace(block_q=block_q, block_n=block_n, num_warps=warps, num_stages=stages,
                         splits=splits or base.splits, tma=tma)  # fmt: skip


def _timed(rows: list, fn, **row) -> None:
    try:
        row["ms"] = bench(fn)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    rows.append(row)
    print(row, flush=True)


def launcher(q, k_cache, v_cache, meta, tables, max_queries, mode, decode, tiles):
    """A no-argument call of the attention kernels with ``tiles`` (for the sweep)."""
    return lambda: fast_attend.attend(q, k_cache, v_cache, meta, tables, max_queries, 0.1, mode, decode, False, tiles)


def sweep() -> list[dict]:
    """Time tile configurations, key-load paths and prefill splits of the lazy and
    no-rotation kernels, next to SDPA flash on the same prefill shapes (tuning aid)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    tables = rope_tables(ROPE, HEAD_DIM, torch.device("cuda"))
    prefill_configs = [(128, 64, 8, 2, True), (128, 64, 8, 3, True), (128, 64, 4, 3, True), (64, 64, 4, 3, True),
                       (64, 64, 4, 2, True), (128, 128, 8, 2, False)]  # fmt: skip
    for batch, tq, doc in ((1, 128, 512), (1, 128, 4096), (2, 1024, 512), (2, 1024, 4096)):
        layout = make_layout(batch, [doc] * DOCS_PREFILL, tq, tq)
        k_cache, v_cache = make_cache(layout, gen)
        q = torch.randn(layout.num_queries, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
        meta = layout.metadata("cuda")
        base = fast_attend.plan(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device, False, batch * KV_HEADS,
                                meta.block_table.shape[1] * BLOCK, tq)  # fmt: skip
        flops = 4 * HEADS * HEAD_DIM * batch * (tq * DOCS_PREFILL * doc + tq * (tq + 1) / 2)
        shape = {"kind": "prefill", "B": batch, "Tq": tq, "segment": doc, "flops": flops}
        qs, ks, vs = sdpa_inputs(q, k_cache, v_cache, layout)
        _timed(rows, sdpa_flash(qs, ks, vs, 0.1), **shape, provider="sdpa_flash")
        del qs, ks, vs
        for cfg in prefill_configs:
            for splits in sorted({1, base.splits, 2 * base.splits, 4}):
                tiles = with_tiles(base, *cfg[:4], splits=splits, tma=cfg[4])
                for mode in (fast_attend.LAZY, fast_attend.NONE):
                    fn = launcher(q, k_cache, v_cache, meta, tables, tq, mode, False, tiles)
                    _timed(rows, fn, **shape, cfg=(*cfg, splits), mode=mode)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, tk, doc in ((16, 4096, 512), (16, 16384, 4096), (64, 4096, 512), (1, 16384, 512), (1, 65536, 4096)):
        layout = decode_layout(batch, tk, doc)
        k_cache, v_cache = make_cache(layout, gen)
        q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
        meta = layout.metadata("cuda")
        base = fast_attend.plan(HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE, q.device, True, batch * KV_HEADS, tk)
        nbytes = 2 * batch * tk * KV_HEADS * HEAD_DIM * 2
        for block_n, warps, stages, tma in ((64, 4, 2, True), (64, 4, 4, True), (32, 4, 4, True), (128, 4, 3, False)):
            for per_sm in (2, 4, 8):
                splits = max(1, min(triton.cdiv(per_sm * sms, batch * KV_HEADS), tk // block_n // 4, 64))
                tiles = with_tiles(base, 16, block_n, warps, stages, splits, tma)
                for mode in (fast_attend.LAZY, fast_attend.NONE):
                    fn = launcher(q, k_cache, v_cache, meta, tables, 1, mode, True, tiles)
                    _timed(rows, fn, kind="decode", B=batch, Tk=tk, doc=doc, bytes=nbytes,
                           cfg=(block_n, warps, stages, splits, tma), mode=mode)  # fmt: skip
    rows.append({"kind": "compiled", "kernels": compiled_report()})
    return rows


def print_sweep(rows: list[dict]) -> None:
    """The sweep as two short tables: prefill TFLOP/s and decode TB/s per configuration."""
    for r in rows:
        if r["kind"] == "prefill":
            rate = f"{r['flops'] / r['ms'] / 1e9:7.1f} TFLOP/s" if "ms" in r else r.get("error", "")[:60]
            what = r.get("provider") or f"{['lazy', 'raw', 'norot'][r['mode']]:5} {r['cfg']}"
            print(f"prefill B={r['B']} Tq={r['Tq']} seg={r['segment']}  {what:36} {rate}")
        elif r["kind"] == "decode":
            rate = f"{r['bytes'] / r['ms'] / 1e9:6.2f} TB/s" if "ms" in r else r.get("error", "")[:60]
            mode = ["lazy", "raw", "norot"][r["mode"]]
            print(f"decode B={r['B']:3} Tk={r['Tk']:5} doc={r['doc']:4}  {mode:5} {r['cfg']!s:26} {rate}")
        else:
            for k in r["kernels"]:
                print("compiled", k)


def compiled_report() -> list[dict]:
    """Registers, spills and whether the key loop was software-pipelined (async copies,
    warpgroup MMAs in the TTGIR), for every compiled variant of the attention kernel."""
    out = []
    try:
        for device_cache in fast_kernels._attention_kernel.device_caches.values():
            for key, kernel in device_cache[0].items():
                ttgir = kernel.asm.get("ttgir", "")
                out.append({
                    "key": str(key)[-160:], "regs": kernel.n_regs, "spills": kernel.n_spills,
                    "async_copies": ttgir.count("async_copy_global_to_local"),
                    "tma_copies": ttgir.count("async_tma_copy_global_to_local"),
                    "wgmma": ttgir.count("warp_group_dot"), "dots": ttgir.count("tt.dot"),
                })  # fmt: skip
    except Exception as exc:  # diagnostics only
        out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="a few sizes only (smoke test)")
    parser.add_argument("--sweep", action="store_true", help="time tile configurations instead (tuning aid)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA device")
    if args.sweep:
        rows = sweep()
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print_sweep(rows)
        return
    fi, fi_reason = flashinfer_or_reason()
    if fi is None:
        print(f"skipping the FlashInfer providers: {fi_reason}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"environment": environment(fi), "ceilings": ceilings(), "dtype": "bfloat16", "heads": HEADS,
              "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "rope_base": ROPE.base,
              "parity_tolerance": PARITY_TOLERANCE, "flashinfer_skipped": fi_reason}  # fmt: skip
    prefill_grid = PREFILL_GRID[:2] if args.quick else PREFILL_GRID
    decode_grid = DECODE_GRID[:3] if args.quick else DECODE_GRID
    for kind, grid, row_fn, unit in (("prefill", prefill_grid, prefill_row, "tflops"),
                                     ("decode", decode_grid, decode_row, "tb_per_s")):  # fmt: skip
        result[kind] = []
        for i, cfg in enumerate(grid):
            result[kind].append(row_fn(*cfg, gen, fi, fi_reason))
            rates = {k: round(v, 2) for k, v in result[kind][-1][unit].items() if v}
            print(f"[{kind} {i + 1}/{len(grid)}] {cfg} {unit} {rates}", flush=True)
            torch.cuda.empty_cache()
            result["targets"] = targets({"decode": [], **result})
            with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
                json.dump(result, f, indent=1)
    print_table(result)


if __name__ == "__main__":
    main()
