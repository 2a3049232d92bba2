"""Kernel benchmark of the fast path, side by side in one run (GPU only).

Run: ``python benchmarks/kernels.py --out results.json`` (``scripts/gpu_suite.sh`` does).

What is measured (issue 3), bf16, ``H = 32`` query heads over ``Hkv = 8`` KV heads,
block size ``S = 64``; every time is the median of many timed runs after warm-up
(``triton.testing.do_bench(return_mode="median")``):

* **Ceilings**: device-to-device copy bandwidth (bytes read + written over the time of
  a 2 GiB ``copy_``) and a bf16 8192³ matrix product.
* **Prefill** (``B = 2`` requests, ``Tq = 1024`` own query tokens each after segments
  of ``L`` tokens up to ``Tk`` keys; head dim 128 and 64). Providers: ``lazy``
  (the kernels of ``fast.lazy_prefill``, launched as ``norot`` is, without the public
  function's host-side input checks; ``public_api_same`` records that both give the
  same bits), ``norot`` (the same kernel with the rotation switched off),
  ``raw`` (``fast.raw_prefill``, keys rotated in the kernel), ``sdpa_flash`` and
  ``sdpa_cudnn`` (PyTorch SDPA on contiguous, pre-rotated keys, KV heads expanded,
  bottom-right causal mask = segments visible + own tokens causal), ``materialise``
  (Block-Attention: copy + re-rotate every block in bf16, then the same kernel with
  every shift 0) and
  ``materialise_sdpa`` (the same copy followed by SDPA flash; time = copy + flash).
  FLOPs = ``4 · H · D · Σ_requests (Tq · Tseg + Tq (Tq + 1) / 2)`` (QKᵀ and PV of the
  visible pairs, causal half counted once).
* **Decode** (one query per request, ``B`` in 1–256, context ``Tk`` in 1k–64k keys:
  documents of 1024 tokens placed back to back, then 64 own tokens; every request reads
  its own blocks, so nothing is shared through L2). Providers: ``lazy``, ``norot``,
  ``raw`` and ``materialise`` (copy + re-rotate the request's blocks, then the decode
  kernel over the copy — what a per-step Block-Attention materialisation costs).
  Bytes = ``2 · B · Tk · Hkv · D · 2`` (keys and values read once) plus q and out;
  bandwidth = bytes / time, reported against the measured copy bandwidth. Decode is
  timed from CUDA-graph replays (device time: at small sizes Python's launch overhead
  of the three kernels would be timed instead).

**Parity first.** Before a provider is timed its output is checked against an
independent computation (SDPA flash for prefill; a float32 PyTorch softmax over the
materialised keys for the first requests of a decode batch): ``max|diff| <= 0.02``
(bf16 outputs of magnitude ≤ 1). A provider that fails is marked and gets no speed-up.

Targets (printed PASS/MISS): decode ≥ 85% of copy bandwidth at ``Tk ≥ 4k`` and
``B ≥ 16``; rotation overhead ≤ 3% against ``norot`` in both kernels; prefill at least as
fast as SDPA flash; lazy faster than materialise at every size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess

import torch
import triton
import triton.testing

import lazyattention.fast as fast
from lazyattention.fast import attend as fast_attend
from lazyattention.fast.cache import materialise
from lazyattention.fast.rope import rope_tables
from lazyattention.reference import Layout, Placement, RequestLayout, RopeConfig, apply_rope

DTYPE = torch.bfloat16
HEADS, KV_HEADS, BLOCK = 32, 8, 64
PARITY_TOLERANCE = 0.02
PREFILL_GRID = [  # (head dim, Tk, segment length L)
    (d, tk, seg)
    for d in (128, 64)
    for tk, seg in ((4096, 512), (4096, 3072), (16384, 512), (16384, 4096), (32768, 512), (32768, 4096))
]
DECODE_GRID = [  # (B, Tk) with B · Tk ≤ 2^22 tokens (16 GiB of bf16 K and V)
    (b, tk) for b in (1, 16, 64, 256) for tk in (1024, 4096, 16384, 65536) if b * tk <= 2**22
]
QUERIES = 1024
OWN_DECODE = 64
DOC_DECODE = 1024


def bench(fn) -> float:
    """Median milliseconds of ``fn`` after warm-up."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: device time without the
    Python launch overhead, which is larger than the kernels at small decode sizes."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


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


def decode_layout(batch: int, tk: int, doc: int = DOC_DECODE) -> Layout:
    """``batch`` decode requests of ``tk`` keys: documents of ``doc`` tokens back to back
    (the last one shorter if ``doc`` does not divide), then ``OWN_DECODE`` own tokens."""
    docs = [doc] * ((tk - OWN_DECODE) // doc)
    rest = tk - OWN_DECODE - sum(docs)
    if rest:
        docs.append(rest)
    return make_layout(batch, docs, OWN_DECODE, 1)


def make_cache(layout: Layout, head_dim: int, gen: torch.Generator):
    n = max(max(p.blocks) for req in layout.requests for p in (*req.segments, req.own)) + 1
    shape = (n, layout.block_size, KV_HEADS, head_dim)
    k = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    v = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    return k, v


def logical_keys(k_cache, v_cache, layout, rope, tables):
    """Keys at logical positions ``[B, Tk, Hkv, D]`` (contiguous requests) and values."""
    k, v, _ = materialise(k_cache, v_cache, layout.metadata("cuda"), tables, DTYPE)
    b = layout.batch_size
    return k.view(b, -1, KV_HEADS, k.shape[-1]), v.view(b, -1, KV_HEADS, v.shape[-1])


def sdpa_inputs(q, k_log, v_log, layout, rope):
    """``[B, H, T, D]`` tensors for SDPA: query rotated at its positions, KV heads expanded."""
    b = layout.batch_size
    q_rot = apply_rope(q, layout.query_positions().cuda(), rope).view(b, -1, HEADS, q.shape[-1])
    g = HEADS // KV_HEADS
    expand = lambda x: x.transpose(1, 2).repeat_interleave(g, dim=1).contiguous()  # noqa: E731
    return q_rot.transpose(1, 2).contiguous(), expand(k_log), expand(v_log)


def sdpa(backend, q, k, v, scale):
    """SDPA with one backend forced. Flash takes the bottom-right causal bias; cuDNN an
    explicit boolean mask of the same shape (it has no bottom-right causal variant)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    tq, tk = q.shape[2], k.shape[2]
    if backend == "flash":
        mask = causal_lower_right(tq, tk)
    else:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run():
        with sdpa_kernel([chosen]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    return run


# --------------------------------------------------------------------------- prefill


def prefill_row(head_dim: int, tk: int, seg: int, gen: torch.Generator) -> dict:
    n_seg = (tk - QUERIES) // seg
    layout = make_layout(2, [seg] * n_seg, QUERIES, QUERIES)
    rope = RopeConfig(head_dim=head_dim, base=500_000.0)
    tables = rope_tables(rope, max(16, triton.next_power_of_2(head_dim)), torch.device("cuda"))
    k_cache, v_cache = make_cache(layout, head_dim, gen)
    q = torch.randn(layout.num_queries, HEADS, head_dim, generator=gen, device="cuda", dtype=DTYPE)
    scale = 1.0 / math.sqrt(head_dim)
    meta = layout.metadata("cuda")
    seg_tokens = n_seg * seg
    flops = 4 * HEADS * head_dim * layout.batch_size * (QUERIES * seg_tokens + QUERIES * (QUERIES + 1) / 2)

    k_log, v_log = logical_keys(k_cache, v_cache, layout, rope, tables)
    qs, ks, vs = sdpa_inputs(q, k_log, v_log, layout, rope)
    flash = sdpa("flash", qs, ks, vs, scale)
    cudnn = sdpa("cudnn", qs, ks, vs, scale)
    expected = flash().transpose(1, 2).reshape(q.shape)

    def raw_expected():
        pos = torch.cat([torch.arange(seg_tokens + QUERIES, device="cuda")] * layout.batch_size)
        k_raw = k_cache.view(-1, KV_HEADS, head_dim)[: pos.numel()]  # requests' blocks are consecutive
        k_rot = apply_rope(k_raw, pos, rope).view(layout.batch_size, -1, KV_HEADS, head_dim)
        _, kr, vr = sdpa_inputs(q, k_rot, v_log, layout, rope)
        return sdpa("flash", qs, kr, vr, scale)().transpose(1, 2).reshape(q.shape)

    def norot_expected():
        k_st = k_cache.view(-1, KV_HEADS, head_dim)[: layout.batch_size * (seg_tokens + QUERIES)]
        k_st = k_st.view(layout.batch_size, -1, KV_HEADS, head_dim)
        g = HEADS // KV_HEADS
        kn = k_st.transpose(1, 2).repeat_interleave(g, dim=1)
        qn = q.view(layout.batch_size, -1, HEADS, head_dim).transpose(1, 2)
        return sdpa("flash", qn.contiguous(), kn.contiguous(), vs, scale)().transpose(1, 2).reshape(q.shape)

    def ours(mode):
        return lambda: fast_attend.attend(q, k_cache, v_cache, meta, tables, QUERIES, scale, mode, False, False)[0]

    copy = lambda: materialise(k_cache, v_cache, meta, tables, DTYPE)  # noqa: E731

    def block_attention():
        """Block-Attention: copy + re-rotate in the cache dtype, then the kernel with δ = 0."""
        kc, vc, m = copy()
        return fast_attend.attend(q, kc, vc, m, tables, QUERIES, scale, fast_attend.LAZY, False, False)[0]

    providers = {
        "lazy": (ours(fast_attend.LAZY), expected),
        "norot": (ours(fast_attend.NONE), norot_expected()),
        "raw": (lambda: fast.raw_prefill(q, k_cache, v_cache, layout, rope), raw_expected()),
        "materialise": (block_attention, expected),
        "sdpa_flash": (lambda: flash().transpose(1, 2), None),  # the yardstick itself
        "sdpa_cudnn": (lambda: cudnn().transpose(1, 2), expected.view(layout.batch_size, -1, HEADS, head_dim)),
    }
    row = {"head_dim": head_dim, "Tk": tk, "segment": seg, "segments": n_seg, "Tq": QUERIES,
           "batch": layout.batch_size, "flops": flops, "ms": {}, "parity": {}, "max_diff": {},
           "public_api_same": bool(torch.equal(fast.lazy_prefill(q, k_cache, v_cache, layout, rope),
                                               ours(fast_attend.LAZY)()))}  # fmt: skip
    for name, (fn, want) in providers.items():
        try:
            out = fn()
            diff = 0.0 if want is None else float((out.float() - want.float()).abs().max())
            row["max_diff"][name] = diff
            row["parity"][name] = bool(diff <= PARITY_TOLERANCE)
            row["ms"][name] = bench(fn)
        except Exception as exc:  # a backend SDPA cannot run on this shape: record why
            row["ms"][name] = None
            row["parity"][name] = None
            row["max_diff"][name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    if row["ms"]["sdpa_flash"] is not None:
        row["ms"]["materialise_sdpa"] = bench(copy) + row["ms"]["sdpa_flash"]
        row["parity"]["materialise_sdpa"] = True
    row["tflops"] = {k: (flops / (t * 1e-3) / 1e12 if t else None) for k, t in row["ms"].items()}
    return row


# --------------------------------------------------------------------------- decode


def decode_row(batch: int, tk: int, gen: torch.Generator) -> dict:
    layout = decode_layout(batch, tk)
    head_dim = 128
    rope = RopeConfig(head_dim=head_dim, base=500_000.0)
    tables = rope_tables(rope, head_dim, torch.device("cuda"))
    k_cache, v_cache = make_cache(layout, head_dim, gen)
    q = torch.randn(batch, HEADS, head_dim, generator=gen, device="cuda", dtype=DTYPE)
    scale = 1.0 / math.sqrt(head_dim)
    meta = layout.metadata("cuda")
    nbytes = 2 * batch * tk * KV_HEADS * head_dim * 2 + 2 * q.numel() * 2

    # Independent check on the first requests: float32 softmax over materialised keys.
    check = min(batch, 4)
    k_log, v_log = logical_keys(k_cache, v_cache, layout, rope, tables)
    q_rot = apply_rope(q, layout.query_positions().cuda(), rope).float()
    g = HEADS // KV_HEADS

    def softmax_attention(keys, queries):
        s = torch.einsum("bhd,bkhd->bhk", queries, keys[:check].float().repeat_interleave(g, dim=2)) * scale
        return torch.einsum("bhk,bkhd->bhd", s.softmax(-1), v_log[:check].float().repeat_interleave(g, dim=2))

    expected = softmax_attention(k_log, q_rot[:check])
    pos = torch.arange(tk, device="cuda")
    k_raw = k_cache.view(-1, KV_HEADS, head_dim)[: check * tk].view(check, tk, KV_HEADS, head_dim)
    raw_expected = softmax_attention(
        torch.stack([apply_rope(k_raw[i], pos, rope) for i in range(check)]), q_rot[:check]
    )
    k_st = k_cache.view(-1, KV_HEADS, head_dim)[: check * tk].view(check, tk, KV_HEADS, head_dim)
    norot_expected = softmax_attention(k_st, q[:check].float())

    def ours(mode, kc=k_cache, vc=v_cache, m=meta):
        return lambda: fast_attend.attend(q, kc, vc, m, tables, 1, scale, mode, True, False)[0]

    def materialised():
        kc, vc, m = materialise(k_cache, v_cache, meta, tables, DTYPE)
        return ours(fast_attend.LAZY, kc, vc, m)()

    providers = {
        "lazy": (ours(fast_attend.LAZY), expected),
        "norot": (ours(fast_attend.NONE), norot_expected),
        "raw": (lambda: fast.raw_decode(q, k_cache, v_cache, layout, rope), raw_expected),
        "materialise": (materialised, expected),
    }
    del k_log
    row = {"batch": batch, "Tk": tk, "bytes": nbytes, "ms": {}, "parity": {}, "max_diff": {},
           "public_api_same": bool(torch.equal(fast.lazy_decode(q, k_cache, v_cache, layout, rope),
                                               ours(fast_attend.LAZY)()))}  # fmt: skip
    for name, (fn, want) in providers.items():
        try:
            out = fn()
            diff = float((out[:check].float() - want).abs().max())
            row["max_diff"][name] = diff
            row["parity"][name] = bool(diff <= PARITY_TOLERANCE)
            row["ms"][name] = bench_graph(fn)
        except Exception as exc:  # recorded, so one failure does not hide the other rows
            row["ms"][name], row["parity"][name] = None, None
            row["max_diff"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    row["tb_per_s"] = {k: (nbytes / (t * 1e-3) / 1e12 if t else None) for k, t in row["ms"].items()}
    return row


# --------------------------------------------------------------------------- ceilings and targets


def ceilings() -> dict:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ a)
    del x, y, a
    return {
        "copy_tb_per_s": 2 * 2**30 / (copy_ms * 1e-3) / 1e12,
        "bf16_matmul_tflops": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12,
    }


def ok(row, name):
    return row["parity"].get(name) is True and row["ms"].get(name)


def targets(result: dict) -> list[dict]:
    """Each issue-3 target with its verdict, the worst measured value and where."""
    out = []
    copy_bw = result["ceilings"]["copy_tb_per_s"]
    big = [r for r in result["decode"] if r["Tk"] >= 4096 and r["batch"] >= 16]
    fracs = [(r["tb_per_s"]["lazy"] / copy_bw if ok(r, "lazy") else 0.0, r) for r in big]
    worst = min(fracs, key=lambda x: x[0]) if fracs else (None, None)
    out.append({
        "target": "decode >= 85% of copy bandwidth (Tk >= 4k, B >= 16)",
        "pass": bool(fracs) and all(f >= 0.85 for f, _ in fracs),
        "worst": worst[0], "where": worst[1] and f"B={worst[1]['batch']} Tk={worst[1]['Tk']}",
    })  # fmt: skip
    for kind in ("prefill", "decode"):
        rows = result[kind]
        over = [((r["ms"]["lazy"] / r["ms"]["norot"] - 1) if ok(r, "lazy") and ok(r, "norot") else math.inf, r)
                for r in rows]  # fmt: skip
        w = max(over, key=lambda x: x[0])
        out.append({
            "target": f"{kind}: rotation overhead <= 3% vs the same kernel without rotation",
            "pass": all(o <= 0.03 for o, _ in over), "worst": w[0], "where": _where(kind, w[1]),
        })  # fmt: skip
    ratios = [((r["ms"]["lazy"] / r["ms"]["sdpa_flash"]) if ok(r, "lazy") and r["ms"]["sdpa_flash"] else math.inf, r)
              for r in result["prefill"]]  # fmt: skip
    w = max(ratios, key=lambda x: x[0])
    out.append(
        {
            "target": "prefill at least as fast as SDPA flash (time ratio <= 1)",
            "pass": all(x <= 1.0 for x, _ in ratios),
            "worst": w[0],
            "where": _where("prefill", w[1]),
        }
    )
    for kind in ("prefill", "decode"):
        rows = result[kind]
        ratios = []
        for r in rows:
            base = [r["ms"][k] for k in ("materialise", "materialise_sdpa") if ok(r, k)]
            ratios.append(((r["ms"]["lazy"] / min(base)) if ok(r, "lazy") and base else math.inf, r))
        w = max(ratios, key=lambda x: x[0])
        out.append(
            {
                "target": f"{kind}: lazy faster than materialise at every size (time ratio < 1)",
                "pass": all(x < 1.0 for x, _ in ratios),
                "worst": w[0],
                "where": _where(kind, w[1]),
            }
        )
    for t in out:  # a failed or missing measurement is "n/a", never a number
        if t["worst"] is not None and not math.isfinite(t["worst"]):
            t["worst"] = None
    return out


def _where(kind, row):
    if kind == "prefill":
        return f"D={row['head_dim']} Tk={row['Tk']} L={row['segment']}"
    return f"B={row['batch']} Tk={row['Tk']}"


def environment() -> dict:
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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


def print_table(result: dict) -> None:
    print(f"\n# {result['environment']['device']}  copy {result['ceilings']['copy_tb_per_s']:.2f} TB/s  "
          f"bf16 mm {result['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    names = ("lazy", "norot", "raw", "sdpa_flash", "sdpa_cudnn", "materialise", "materialise_sdpa")
    print("prefill TFLOP/s  " + " ".join(f"{n:>10}" for n in names))
    for r in result["prefill"]:
        cells = []
        for n in names:
            t = r["tflops"].get(n)
            cells.append(f"{t:10.1f}{'' if r['parity'].get(n) is not False else '!'}" if t else f"{'-':>10}")
        print(f"D={r['head_dim']:3d} Tk={r['Tk']:5d} L={r['segment']:4d} " + " ".join(cells))
    names = ("lazy", "norot", "raw", "materialise")
    print("decode TB/s (frac of copy)   " + " ".join(f"{n:>10}" for n in names))
    for r in result["decode"]:
        copy_bw = result["ceilings"]["copy_tb_per_s"]
        cells = [
            f"{r['tb_per_s'][n]:5.2f}({r['tb_per_s'][n] / copy_bw:4.0%})" if r["tb_per_s"][n] else f"{'-':>11}"
            for n in names
        ]
        print(f"B={r['batch']:3d} Tk={r['Tk']:5d} " + " ".join(cells))
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


def sweep() -> list[dict]:
    """Time tile configurations and key-load paths of the lazy and no-rotation kernels,
    next to SDPA flash on the same prefill shapes (tuning aid)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    prefill_configs = [(128, 64, 8, 2, True), (128, 64, 8, 3, True), (128, 64, 4, 3, True), (64, 64, 4, 3, True),
                       (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 128, 8, 2, False)]  # fmt: skip
    for d, tk, seg, block in ((128, 16384, 512, 64), (128, 16384, 4096, 128), (64, 16384, 512, 64)):
        layout = make_layout(2, [seg] * ((tk - QUERIES) // seg), QUERIES, QUERIES, block)
        rope = RopeConfig(head_dim=d, base=500_000.0)
        tables = rope_tables(rope, max(16, triton.next_power_of_2(d)), torch.device("cuda"))
        k_cache, v_cache = make_cache(layout, d, gen)
        q = torch.randn(layout.num_queries, HEADS, d, generator=gen, device="cuda", dtype=DTYPE)
        meta = layout.metadata("cuda")
        base = fast_attend.plan(HEADS, KV_HEADS, d, block, DTYPE, q.device, False, 0, 0)
        flops = 4 * HEADS * d * 2 * (QUERIES * (tk - QUERIES) + QUERIES * (QUERIES + 1) / 2)
        shape = {"kind": "prefill", "D": d, "Tk": tk, "segment": seg, "S": block, "flops": flops}
        k_log, v_log = logical_keys(k_cache, v_cache, layout, rope, tables)
        qs, ks, vs = sdpa_inputs(q, k_log, v_log, layout, rope)
        _timed(rows, sdpa("flash", qs, ks, vs, 0.1), **shape, provider="sdpa_flash")
        del k_log, v_log, qs, ks, vs
        for cfg in prefill_configs:
            if block % cfg[1] and cfg[4]:
                continue
            tiles = with_tiles(base, *cfg[:4], tma=cfg[4])
            for mode in (fast_attend.LAZY, fast_attend.NONE):
                fn = lambda: fast_attend.attend(q, k_cache, v_cache, meta, tables, QUERIES, 0.1, mode, False, False,  # noqa: E731
                                                tiles)  # fmt: skip
                _timed(rows, fn, **shape, cfg=cfg, mode=mode)
    for batch, tk, doc in ((16, 16384, DOC_DECODE), (16, 16384, 4096), (64, 4096, DOC_DECODE),
                           (256, 4096, DOC_DECODE), (1, 65536, DOC_DECODE)):  # fmt: skip
        layout = decode_layout(batch, tk, doc)
        rope = RopeConfig(head_dim=128, base=500_000.0)
        tables = rope_tables(rope, 128, torch.device("cuda"))
        k_cache, v_cache = make_cache(layout, 128, gen)
        q = torch.randn(batch, HEADS, 128, generator=gen, device="cuda", dtype=DTYPE)
        meta = layout.metadata("cuda")
        base = fast_attend.plan(HEADS, KV_HEADS, 128, BLOCK, DTYPE, q.device, True, batch * KV_HEADS, tk)
        nbytes = 2 * batch * tk * KV_HEADS * 128 * 2
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for block_n, warps, stages, tma in ((64, 4, 2, True), (64, 4, 3, True), (64, 4, 4, True), (32, 4, 4, True),
                                            (128, 4, 3, False)):  # fmt: skip
            for per_sm in (4,):
                splits = max(1, min(triton.cdiv(per_sm * sms, batch * KV_HEADS), tk // block_n // 4, 64))
                tiles = with_tiles(base, 16, block_n, warps, stages, splits, tma)
                for mode in (fast_attend.LAZY, fast_attend.NONE):
                    fn = lambda: fast_attend.attend(q, k_cache, v_cache, meta, tables, 1, 0.1, mode, True, False,  # noqa: E731
                                                    tiles)  # fmt: skip
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
            print(f"prefill D={r['D']} seg={r['segment']} S={r['S']}  {what:32} {rate}")
        elif r["kind"] == "decode":
            rate = f"{r['bytes'] / r['ms'] / 1e9:6.2f} TB/s" if "ms" in r else r.get("error", "")[:60]
            print(
                f"decode B={r['B']:3} Tk={r['Tk']:5} doc={r['doc']:4}  {['lazy', 'raw', 'norot'][r['mode']]:5} {str(r['cfg']):26} {rate}"
            )
        else:
            for k in r["kernels"]:
                print("compiled", k)


def compiled_report() -> list[dict]:
    """Registers, spills and whether the key loop was software-pipelined (async copies,
    warpgroup MMAs in the TTGIR), for every compiled variant of the attention kernel."""
    out = []
    try:
        for device_cache in fast_attend._attention_kernel.device_caches.values():
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
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"environment": environment(), "ceilings": ceilings(), "dtype": "bfloat16",
              "heads": HEADS, "kv_heads": KV_HEADS, "block_size": BLOCK, "parity_tolerance": PARITY_TOLERANCE}  # fmt: skip
    prefill_grid = PREFILL_GRID[:2] if args.quick else PREFILL_GRID
    decode_grid = DECODE_GRID[:3] if args.quick else DECODE_GRID
    result["prefill"] = []
    for cfg in prefill_grid:
        result["prefill"].append(prefill_row(*cfg, gen))
        print("prefill", cfg, {k: round(v, 1) for k, v in result["prefill"][-1]["tflops"].items() if v}, flush=True)
        torch.cuda.empty_cache()
    result["decode"] = []
    for cfg in decode_grid:
        result["decode"].append(decode_row(*cfg, gen))
        print("decode", cfg, {k: round(v, 2) for k, v in result["decode"][-1]["tb_per_s"].items() if v}, flush=True)
        torch.cuda.empty_cache()
    result["targets"] = targets(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)


if __name__ == "__main__":
    main()
