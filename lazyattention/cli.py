"""The ``lazyattention`` command: ``demo`` and ``bench``.

``lazyattention demo`` shows, on a CPU in about a minute:

1. the reference semantics: a document cached once (keys rotated at ``0..L-1``) and
   read at several offsets and in several orders, side by side with eager RoPE (keys
   rotated where they sit), with the largest difference;
2. a tiny random Llama-shaped model serving requests that reuse documents in
   different orders, ``lazy`` beside ``block_attention``;
3. the quality check per dtype (lazy vs Block-Attention vs full attention);
4. every strategy on a small Zipf workload, side by side.

``lazyattention bench`` runs the workload under every strategy over a sweep of
popularity skews and KV budgets, prints a table, and writes ``engine.json`` and
``engine.png`` (TTFT and throughput vs skew and vs budget) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

__all__ = ["main", "run_sweep", "format_table", "plot_sweep"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _say(text: str = "") -> None:
    print(text, flush=True)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width text table; ``columns`` are ``(key, header, format)``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if isinstance(row[k], (int, float)) else str(row[k]) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


METRIC_COLUMNS = [
    ("strategy", "strategy", ""),
    ("num_blocks", "blocks", "d"),
    ("ttft_p50", "TTFT p50 ms", ".1f"),
    ("ttft_p99", "TTFT p99 ms", ".1f"),
    ("tpot_mean", "TPOT ms", ".2f"),
    ("requests_per_s", "req/s", ".2f"),
    ("tokens_per_s", "tok/s", ".0f"),
    ("hit_ratio", "hit ratio", ".2f"),
    ("bytes_copied", "MB copied", ".2f"),
    ("peak_blocks", "peak blocks", "d"),
]


def _display(m: dict) -> dict:
    """Metrics in display units: milliseconds and megabytes."""
    out = dict(m)
    for k in ("ttft_p50", "ttft_p99", "tpot_mean"):
        out[k] = m[k] * 1e3
    out["bytes_copied"] = m["bytes_copied"] / 1e6
    return out


# --------------------------------------------------------------------------- model setup


def _build_model(name: str, backend: str, dtype: torch.dtype, device: str, seed: int):
    from lazyattention.reference.model import Model, ModelConfig

    cfg = {"tiny": ModelConfig.tiny, "llama3-1b": ModelConfig.llama3_1b}[name]()
    # weights drawn on the CPU from a seeded generator, so every device gets the same model
    return Model(cfg, backend=backend).init_random(seed).to(device=device, dtype=dtype).eval()


def _default_device(backend: str) -> str:
    return "cuda" if backend == "fast" else "cpu"


def _cpu_threads(device: str, model_name: str) -> None:
    """The tiny model's matmuls are far too small for intra-op threads: on a CPU they
    only add hand-off cost (about 100x on a loaded 2-core machine), so use one."""
    if device == "cpu" and model_name == "tiny":
        torch.set_num_threads(1)


# --------------------------------------------------------------------------- demo


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

    _say("1. One cached copy, many placements: lazy (query rotated by p - delta) vs eager RoPE")
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
        f"\n   largest difference over all placements: {worst:.2e} (float32 rounding; the cached copy was never rewritten)\n"
    )
    return worst


def _reuse_demo(model, seed: int) -> None:
    """Section 2: the model serves reordered requests over shared documents."""
    from lazyattention.reference.engine import Engine

    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    docs = {n: torch.randint(1, vocab, (L,), generator=g).tolist() for n, L in (("A", 40), ("B", 25), ("C", 33))}
    orders = [("A", "B", "C"), ("C", "A", "B"), ("B", "C", "A"), ("C", "B")]
    queries = [torch.randint(1, vocab, (6,), generator=g).tolist() for _ in orders]
    _say("2. A tiny random Llama-shaped model serves requests that reuse documents in new orders")
    engines = {s: Engine(model, s, num_blocks=64, block_size=16, keep_logits=True) for s in ("lazy", "block_attention")}
    rows = []
    for order, query in zip(orders, queries):
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
        f"\n   lazy: {lz.segment_prefill_tokens} document tokens prefilled once, 0 bytes copied, peak {lz.peak_blocks} blocks"
    )
    _say(
        f"   block_attention: same prefills, {bl.bytes_copied / 1e3:.1f} kB copied and re-rotated, "
        f"peak {bl.peak_blocks} blocks\n"
    )


def _quality_demo(model, seed: int) -> list[dict]:
    """Section 3: lazy vs Block-Attention vs full attention, per dtype."""
    from lazyattention.reference.engine import quality_check

    g = torch.Generator().manual_seed(seed + 1)
    vocab = model.cfg.vocab_size
    docs = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (30, 17, 44)]
    requests = [
        (torch.randint(1, vocab, (5,), generator=g).tolist(), [docs[i] for i in order])
        for order in ((0, 1, 2), (2, 0), (1, 2, 0))
    ]
    _say("3. Quality: first-token logits and greedy tokens, lazy vs block_attention vs full attention")
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
    from lazyattention.reference.workload import WorkloadConfig, make_workload

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
    _say("4. Every strategy on a uniform (alpha=0) and a skewed (alpha=1) workload: 24 requests,")
    _say("   3 of 12 documents each, a KV budget of 0.75x the document pool")
    runs = run_sweep(
        model,
        cfg,
        alphas=[0.0, 1.0],
        budgets=[],
        budget=0.75,
        block_size=16,
        max_num_seqs=8,
        progress=_progress_printer(),
    )
    _say()
    _say(format_table([_display(r) for r in runs], [("alpha", "alpha", "g"), *METRIC_COLUMNS]))
    _say(
        "   (a CPU and a tiny model: the table shows the mechanics; speed is measured on a GPU by `lazyattention bench`)\n"
    )
    return runs


def _progress_printer():
    """One line per finished run, with its wall time."""
    started = {}

    def progress(label: str, done: int, total: int) -> None:
        started.setdefault(label, time.perf_counter())
        if done == total:
            _say(f"   [{label}] {done}/{total} requests served in {time.perf_counter() - started[label]:.2f} s")

    return progress


def demo(args) -> int:
    from lazyattention.reference.model import attention_backend

    device = args.device or _default_device(args.backend)
    _cpu_threads(device, "tiny")
    start = time.perf_counter()
    _say(f"lazyattention demo: backend={args.backend}, device={device}\n")
    _semantics_demo(attention_backend(args.backend), device, args.seed)
    model = _build_model("tiny", args.backend, torch.float32, device, args.seed)
    _reuse_demo(model, args.seed)
    _quality_demo(model, args.seed)
    _strategies_demo(model, args.seed)
    _say(f"done in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- bench


def _min_blocks(workload, strategies, block_size: int) -> int:
    """The smallest budget in which every request fits alone under every strategy."""
    from lazyattention.reference.engine import blocks_needed

    return max(
        blocks_needed(s, block_size, r.query, workload.request_documents(r), r.max_new_tokens)
        for r in workload.requests
        for s in strategies
    )


def run_sweep(
    model,
    base,
    alphas,
    budgets,
    block_size=16,
    max_num_seqs=16,
    max_batch_tokens=4096,
    strategies=None,
    skew=1.0,
    budget=1.0,
    progress=None,
    warmup: int = 2,
) -> list[dict]:
    """Serve workloads drawn from ``base`` under every strategy.

    Two sweeps share one table: popularity skew ``α`` in ``alphas`` at budget
    fraction ``budget``, and budget fraction in ``budgets`` at skew ``skew``. A budget
    fraction ``f`` means ``ceil(f ×`` the blocks the whole document pool needs ``)``,
    raised to the smallest budget in which every request fits alone (recorded as
    ``num_blocks``). Each strategy first serves the first ``warmup`` requests of the
    first workload untimed, on an engine of its own (kernel compilation — Triton
    specialises kernels on argument values, so a GPU run wants the whole workload
    here — and allocator growth).

    Returns:
        one dict per run: the :class:`Metrics` fields plus ``sweep``, ``alpha``,
        ``budget_fraction``.
    """
    from lazyattention.reference.engine import STRATEGIES, Engine
    from lazyattention.reference.workload import make_workload, run_workload

    strategies = list(strategies or STRATEGIES)
    plan = [("skew", a, budget) for a in alphas] + [("budget", skew, f) for f in budgets]
    runs = []
    warmed = set() if warmup > 0 else set(strategies)
    for sweep, alpha, fraction in plan:
        workload = make_workload(replace(base, zipf_alpha=alpha))
        pool_blocks = sum(-(-len(d) // block_size) for d in workload.documents)
        num_blocks = max(math.ceil(fraction * pool_blocks), _min_blocks(workload, strategies, block_size))
        for strategy in strategies:
            if strategy not in warmed:  # compile kernels, fill allocators: not timed
                warm = Engine(model, strategy, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs)
                for spec in workload.requests[:warmup]:
                    warm.add_request(spec.query, workload.request_documents(spec), spec.max_new_tokens)
                warm.run_until_done()
                warmed.add(strategy)
            engine = Engine(
                model,
                strategy,
                num_blocks=num_blocks,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_batch_tokens=max_batch_tokens,
            )
            label = f"{sweep}: alpha={alpha:g} budget={fraction:g} {strategy}"
            metrics = run_workload(
                engine, workload, None if progress is None else (lambda d, t, label=label: progress(label, d, t))
            )
            engine.check_invariants()
            runs.append({"sweep": sweep, "alpha": alpha, "budget_fraction": fraction, **metrics.as_dict()})
    return runs


def plot_sweep(runs: list[dict], path: Path, title: str) -> None:
    """TTFT p50 and throughput vs skew and vs KV budget, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for col, (sweep, xkey, xlabel) in enumerate(
        (("skew", "alpha", "Zipf skew α"), ("budget", "budget_fraction", "KV budget (× document pool)"))
    ):
        chosen = [r for r in runs if r["sweep"] == sweep]
        for strategy in dict.fromkeys(r["strategy"] for r in chosen):
            rs = sorted((r for r in chosen if r["strategy"] == strategy), key=lambda r: r[xkey])
            xs = [r[xkey] for r in rs]
            axes[0, col].plot(xs, [r["ttft_p50"] * 1e3 for r in rs], marker="o", label=strategy)
            axes[1, col].plot(xs, [r["requests_per_s"] for r in rs], marker="o", label=strategy)
        axes[0, col].set(xlabel=xlabel, ylabel="TTFT p50 (ms)", title=f"TTFT vs {sweep}")
        axes[1, col].set(xlabel=xlabel, ylabel="throughput (requests/s)", title=f"throughput vs {sweep}")
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device: str, backend: str) -> dict:
    """Device and versions, saved with every result."""
    import lazyattention

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lazyattention": lazyattention.__version__,
        "backend": backend,
        "device": device,
    }
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = platform.processor() or platform.machine()
    if backend == "fast":
        import triton

        env["triton"] = triton.__version__
    return env


def bench(args) -> int:
    from lazyattention.reference.workload import WorkloadConfig

    device = args.device or _default_device(args.backend)
    dtype = DTYPES[args.dtype]
    _cpu_threads(device, args.model)
    model = _build_model(args.model, args.backend, dtype, device, args.seed)
    base = WorkloadConfig(
        num_requests=args.requests,
        num_documents=args.documents,
        doc_len_mean=args.doc_len,
        doc_len_max=max(args.doc_len * 4, args.doc_len),
        docs_per_request=args.docs_per_request,
        query_len=args.query_len,
        output_len=args.output_len,
        rate=args.rate,
        vocab_size=model.cfg.vocab_size,
        seed=args.seed,
    )
    _say(f"lazyattention bench: model={args.model} backend={args.backend} device={device} dtype={args.dtype}")
    start = time.perf_counter()
    runs = run_sweep(
        model,
        base,
        args.alphas,
        args.budgets,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens,
        strategies=args.strategies,
        skew=args.skew,
        budget=args.budget,
        progress=_progress_printer() if not args.quiet else None,
    )
    for sweep in ("skew", "budget"):
        chosen = [_display(r) for r in runs if r["sweep"] == sweep]
        key, head = ("alpha", "alpha") if sweep == "skew" else ("budget_fraction", "budget")
        _say(f"\nvs {sweep}:")
        _say(format_table(chosen, [(key, head, "g"), *METRIC_COLUMNS]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "environment": environment(device, args.backend),
        "model": args.model,
        "dtype": args.dtype,
        "workload": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(base).items()},
        "engine": {
            "block_size": args.block_size,
            "max_num_seqs": args.max_num_seqs,
            "max_batch_tokens": args.max_batch_tokens,
        },
        "seconds": time.perf_counter() - start,
        "runs": runs,
    }
    name = args.name
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot_sweep(
        runs, out / f"{name}.png", f"{args.model}, {args.backend} backend, {result['environment']['device_name']}"
    )
    _say(f"\nwrote {out / (name + '.json')} and {out / (name + '.png')} in {result['seconds']:.1f} s")
    return 0


# --------------------------------------------------------------------------- parser


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _strategy_list(text: str) -> list[str]:
    from lazyattention.reference.engine import STRATEGIES

    names = [x for x in text.split(",") if x]
    bad = [n for n in names if n not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {bad[0] if bad else text!r}; choose from {', '.join(STRATEGIES)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyattention", description="Deferred positional encoding for KV-cache reuse."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("demo", "show the semantics, document reuse and the strategies side by side"),
        ("bench", "run the workload under every strategy; write a table, JSON and a plot"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--backend",
            choices=("reference", "fast"),
            default="reference",
            help="attention backend (fast = Triton, needs a GPU)",
        )
        p.add_argument("--device", default=None, help="torch device (default: cuda for fast, cpu for reference)")
        p.add_argument("--seed", type=int, default=0)
    p = sub.choices["bench"]
    p.add_argument("--model", choices=("tiny", "llama3-1b"), default="tiny", help="random-weight model shape")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--documents", type=int, default=12)
    p.add_argument("--doc-len", type=int, default=48, help="mean document length in tokens")
    p.add_argument("--docs-per-request", type=int, default=3)
    p.add_argument("--query-len", type=int, default=8)
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--alphas", type=_floats, default=[0.0, 1.0], help="Zipf skews of the skew sweep")
    p.add_argument(
        "--budgets", type=_floats, default=[0.5, 1.0], help="KV budgets (× document pool) of the budget sweep"
    )
    p.add_argument("--skew", type=float, default=1.0, help="Zipf skew of the budget sweep")
    p.add_argument("--budget", type=float, default=1.0, help="KV budget of the skew sweep")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--strategies", type=_strategy_list, default=None, help="comma-separated (default: all)")
    p.add_argument("--out", default="bench-out", help="folder for the JSON and the plot")
    p.add_argument("--name", default="engine", help="file name stem of the JSON and the plot")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lazyattention`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return demo(args) if args.command == "demo" else bench(args)
    except (RuntimeError, ValueError) as exc:
        print(f"lazyattention {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
