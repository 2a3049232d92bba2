"""``lazyattention demo``: deferred RoPE shown end to end, on a CPU.

First, a real model in real text (:mod:`lazyattention.rag_demo`): SmolLM2-135M-Instruct
answers questions from documents cached once and reused in new orders at offsets past
2^16 and 2^20, lazy beside Block-Attention and full attention. Then the mechanics on a
tiny random-weight model, in a few seconds:

1. the reference semantics: a document cached once (keys rotated at ``0..L-1``) and
   read at several offsets and in several orders, side by side with eager RoPE (keys
   rotated where they sit), with the largest difference;
2. a tiny random Llama-shaped model serving requests that reuse documents in
   different orders, ``lazy`` beside ``block_attention``;
3. the quality check per dtype (lazy vs Block-Attention vs full attention);
4. every strategy on a small Zipf workload, side by side.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from lazyattention.backends import get_backend
from lazyattention.console import cpu_threads_for
from lazyattention.console import say as _say
from lazyattention.serving.loading import random_model
from lazyattention.serving.sweep import METRIC_COLUMNS, display_units, format_table, run_sweep

__all__ = ["run_demo"]


def _semantics_demo(ops, device: str, seed: int) -> float:
    """Section 1: one cached copy of two documents, read at many offsets and orders."""
    from lazyattention.reference.layout import Layout, Placement, RequestLayout
    from lazyattention.reference.rope import RopeConfig

    rope = RopeConfig(head_dim=64, base=10000.0)
    S, H, HKV, D = 4, 4, 2, 64
    g = torch.Generator().manual_seed(seed)
    lengths = {"A": 11, "B": 6}
    kv = {n: (torch.randn(L, HKV, D, generator=g), torch.randn(L, HKV, D, generator=g)) for n, L in lengths.items()}
    q_len = 3
    q = torch.randn(q_len, H, D, generator=g).to(device)
    k_own, v_own = torch.randn(q_len, HKV, D, generator=g), torch.randn(q_len, HKV, D, generator=g)

    # The shared cache: each document written ONCE, keys rotated at 0..L-1 (blocks 0..4).
    shared_k = torch.zeros(16, S, HKV, D, device=device)
    shared_v = torch.zeros_like(shared_k)
    blocks, next_block = {}, 0
    for name, (k, v) in kv.items():
        n = -(-lengths[name] // S)
        blocks[name] = tuple(range(next_block, next_block + n))
        slots = torch.arange(lengths[name]) + next_block * S
        ops.write_kv(
            k.to(device),
            v.to(device),
            shared_k,
            shared_v,
            slots.to(device),
            torch.arange(lengths[name]).to(device),
            rope,
        )
        next_block += n
    own_block0 = next_block

    def request(order: tuple[str, ...], first: int, mode: str):
        """Lazy: read the shared cache. Eager: a fresh cache with keys rotated where they sit."""
        k_cache, v_cache = (
            (shared_k.clone(), shared_v.clone())
            if mode == "lazy"
            else (torch.zeros_like(shared_k), torch.zeros_like(shared_v))
        )
        segments, pos = [], first
        for name in order:
            if mode == "lazy":
                segments.append(Placement(blocks[name], lengths[name], start=pos, stored_start=0))
            else:
                slots = torch.arange(lengths[name]) + blocks[name][0] * S
                k, v = kv[name]
                ops.write_kv(
                    k.to(device),
                    v.to(device),
                    k_cache,
                    v_cache,
                    slots.to(device),
                    torch.arange(lengths[name]).to(device) + pos,
                    rope,
                )
                segments.append(Placement(blocks[name], lengths[name], start=pos, stored_start=pos))
            pos += lengths[name]
        own = Placement((own_block0,), q_len, start=pos, stored_start=pos)
        own_slots = torch.arange(q_len) + own_block0 * S
        ops.write_kv(
            k_own.to(device),
            v_own.to(device),
            k_cache,
            v_cache,
            own_slots.to(device),
            torch.arange(q_len).to(device) + pos,
            rope,
        )
        layout = Layout([RequestLayout(tuple(segments), own, num_queries=q_len)], S)
        return ops.lazy_prefill(q, k_cache, v_cache, layout, rope)

    _say("1. One cached copy, many placements: a document cached once and read anywhere gives what")
    _say("   recomputing it there gives (lazy turns each query by p - delta, its distance to where the")
    _say("   document was cached; eager RoPE rotates the document's keys again at every place)")
    _say("   documents A (11 tokens) and B (6 tokens) are written once, keys rotated at 0..L-1;")
    _say("   eager RoPE writes them again, keys rotated at their logical positions.\n")
    rows, worst = [], 0.0
    cases = [
        (("A",), 0),
        (("A",), 5),
        (("A", "B"), 0),
        (("B", "A"), 0),
        (("B", "A"), 1000),
        (("A", "B"), 70_000),
        (("B", "A"), 2**20),
    ]
    for order, first in cases:
        lazy, eager = request(order, first, "lazy"), request(order, first, "eager")
        diff = float((lazy.float() - eager.float()).abs().max())
        worst = max(worst, diff)
        rows.append(
            {
                "order": " ".join(order),
                "first": first,
                "lazy": f"{float(lazy[0, 0, 0]):+.6f}",
                "eager": f"{float(eager[0, 0, 0]):+.6f}",
                "diff": diff,
            }
        )
    _say(
        format_table(
            rows,
            [
                ("order", "order", ""),
                ("first", "starts at", "d"),
                ("lazy", "lazy out[0,0,0]", ""),
                ("eager", "eager out[0,0,0]", ""),
                ("diff", "max |lazy - eager|", ".2e"),
            ],
        )
    )
    _say(
        f"\n   largest difference over all placements: {worst:.2e} "
        "(float32 rounding; the cached copy was never rewritten)\n"
    )
    return worst


def _reuse_demo(model, seed: int) -> None:
    """Section 2: the model serves reordered requests over shared documents."""
    from lazyattention.serving.engine import Engine

    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    docs = {n: torch.randint(1, vocab, (L,), generator=g).tolist() for n, L in (("A", 40), ("B", 25), ("C", 33))}
    orders = [("A", "B", "C"), ("C", "A", "B"), ("B", "C", "A"), ("C", "B")]
    queries = [torch.randint(1, vocab, (6,), generator=g).tolist() for _ in orders]
    _say("2. Requests that reuse the same documents in new orders: lazy (no copy) beside Block-Attention (copy)")
    engines = {s: Engine(model, s, num_blocks=64, block_size=16, keep_logits=True) for s in ("lazy", "block_attention")}
    rows = []
    for order, query in zip(orders, queries, strict=True):
        out = {}
        for name, engine in engines.items():
            req = engine.add_request(query, [docs[d] for d in order], max_new_tokens=6)
            engine.run_until_done()
            out[name] = req
        lazy, block = out["lazy"], out["block_attention"]
        rows.append(
            {
                "order": " ".join(order),
                "hits": f"{lazy.hits}/{lazy.lookups}",
                "lazy": " ".join(map(str, lazy.output)),
                "block": " ".join(map(str, block.output)),
                "diff": float((lazy.first_logits - block.first_logits).abs().max()),
            }
        )
        _say(f"   served documents {' '.join(order)}")
    _say()
    _say(
        format_table(
            rows,
            [
                ("order", "documents", ""),
                ("hits", "cache hits", ""),
                ("lazy", "lazy tokens", ""),
                ("block", "block_attention tokens", ""),
                ("diff", "max |d logit|", ".1e"),
            ],
        )
    )
    lz, bl = engines["lazy"].stats, engines["block_attention"].stats
    _say(
        f"\n   lazy: {lz.segment_prefill_tokens} document tokens prefilled once, 0 bytes copied, "
        f"peak {lz.peak_blocks} blocks"
    )
    _say(
        f"   block_attention: same prefills, {bl.bytes_copied / 1e3:.1f} kB copied and re-rotated, "
        f"peak {bl.peak_blocks} blocks\n"
    )


def _quality_demo(model, seed: int) -> list[dict]:
    """Section 3: lazy vs Block-Attention vs full attention, per dtype."""
    from lazyattention.serving.quality import quality_check

    g = torch.Generator().manual_seed(seed + 1)
    vocab = model.cfg.vocab_size
    docs = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (30, 17, 44)]
    requests = [
        (torch.randint(1, vocab, (5,), generator=g).tolist(), [docs[i] for i in order])
        for order in ((0, 1, 2), (2, 0), (1, 2, 0))
    ]
    _say("3. Do the answers change? lazy vs Block-Attention vs full attention, in float32 and bfloat16")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        report = quality_check(model.to(dtype), requests, max_new_tokens=6)
        rows.append(asdict(report))
    model.to(torch.float32)
    _say(
        format_table(
            rows,
            [
                ("dtype", "dtype", ""),
                ("lazy_vs_block_logits", "lazy-block logits", ".2e"),
                ("lazy_vs_block_agreement", "lazy=block tokens", ".2f"),
                ("lazy_vs_full_logits", "lazy-full logits", ".2e"),
                ("lazy_vs_full_agreement", "lazy=full tokens", ".2f"),
            ],
        )
    )
    _say("   lazy and block_attention compute one function (documents encoded apart): they differ by rounding;")
    _say(
        "   full attention lets documents see each other, a different function (a random model is not tuned for it).\n"
    )
    return rows


def _strategies_demo(model, seed: int) -> list[dict]:
    """Section 4: every strategy on one small Zipf workload."""
    from lazyattention.serving.workload import WorkloadConfig

    cfg = WorkloadConfig(
        num_requests=24,
        num_documents=12,
        doc_len_mean=48,
        docs_per_request=3,
        zipf_alpha=1.0,
        query_len=8,
        output_len=4,
        vocab_size=model.cfg.vocab_size,
        seed=seed,
    )
    _say("4. Speed and memory of each caching strategy on a small stream of requests: 24 requests of")
    _say("   3 of 12 documents each, the documents equally popular (alpha=0) or a few popular (alpha=1),")
    _say("   a cache that holds 0.75x the documents")
    runs = run_sweep(
        model,
        cfg,
        alphas=[0.0, 1.0],
        budgets=[],
        budget=0.75,
        block_size=16,
        max_num_seqs=8,
        progress=progress_printer(),
    )
    _say()
    _say(format_table([display_units(r) for r in runs], [("alpha", "alpha", "g"), *METRIC_COLUMNS]))
    _say(
        "   (a CPU and a tiny model: the table shows the mechanics; "
        "speed is measured on a GPU by `lazyattention bench`)\n"
    )
    return runs


def progress_printer():
    """One line per finished run, with its wall time."""
    started = {}

    def progress(label: str, done: int, total: int) -> None:
        started.setdefault(label, time.perf_counter())
        if done == total:
            _say(f"   [{label}] {done}/{total} requests served in {time.perf_counter() - started[label]:.2f} s")

    return progress


def run_demo(backend: str, device: str, seed: int = 0) -> int:
    """Run the real-text part, then the four sections on ``device`` with the chosen
    attention backend. Without the real model's packages the first part is skipped
    with a one-line note naming what to install."""
    from lazyattention.rag_demo import run_rag_demo

    start = time.perf_counter()
    _say(f"lazyattention demo: backend={backend}, device={device}\n")
    _say("Part 1. A real model, real text\n")
    try:
        run_rag_demo(backend, device, seed)
    except ImportError as exc:  # transformers, or the package that ships SmolLM2, is missing
        _say(f"   skipped: {exc}\n")
    _say("Part 2. The mechanics, on a tiny random-weight model")
    _say("   Random weights make the answers meaningless words, but every equality below is exact:")
    _say("   each number is a check of the mechanism, not a claim about quality.\n")
    cpu_threads_for("tiny", device)
    _semantics_demo(get_backend(backend).ops, device, seed)
    model = random_model("tiny", backend, torch.float32, device, seed)
    _reuse_demo(model, seed)
    _quality_demo(model, seed)
    _strategies_demo(model, seed)
    _say(f"done in {time.perf_counter() - start:.1f} s")
    return 0
