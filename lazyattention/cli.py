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
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lazyattention.demo import _cpu_threads, _say, progress_printer
from lazyattention.serving.model import random_model
from lazyattention.serving.sweep import METRIC_COLUMNS, display_units, environment, format_table, plot_sweep, run_sweep

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_device(backend: str) -> str:
    return "cuda" if backend == "fast" else "cpu"


def demo(args) -> int:
    from lazyattention.demo import run_demo

    return run_demo(args.backend, args.device or _default_device(args.backend), args.seed)


def bench(args) -> int:
    from lazyattention.serving.workload import WorkloadConfig

    device = args.device or _default_device(args.backend)
    dtype = DTYPES[args.dtype]
    _cpu_threads(device, args.model)
    model = random_model(args.model, args.backend, dtype, device, args.seed)
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
        progress=progress_printer() if not args.quiet else None,
    )
    for sweep in ("skew", "budget"):
        chosen = [display_units(r) for r in runs if r["sweep"] == sweep]
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


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _strategy_list(text: str) -> list[str]:
    from lazyattention.serving.engine import STRATEGIES

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
    p = sub.add_parser("check", help="check a backend's properties on this device (Hypothesis)")
    p.add_argument("--backend", choices=("fast", "reference"), default="fast")
    p.add_argument("--profile", choices=("ci", "nightly"), default="ci", help="10 or 200 examples per function")
    p.add_argument("--functions", nargs="+", default=None, help="attention functions to check (default: all)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lazyattention`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            from lazyattention.testing.check import run_check

            return run_check(args.backend, args.profile, args.functions, args.device)
        return demo(args) if args.command == "demo" else bench(args)
    except (RuntimeError, ValueError) as exc:
        print(f"lazyattention {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
