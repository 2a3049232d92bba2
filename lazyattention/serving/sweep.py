"""The engine sweep: every strategy over popularity skews and KV budgets.

:func:`run_sweep` serves workloads drawn from one configuration under every strategy
and returns one row of metrics per run; :func:`plot_sweep` draws TTFT and throughput
against skew and against budget; :func:`format_table` prints rows as text.

:func:`dry_run` serves an offline burst through the engine's scheduler and block
accounting with no forward pass (host work only, any machine): what it admits,
evicts and preempts, and so its cache hit ratio, is exactly a real run's, since an
offline burst is scheduled the same whatever the steps cost. :func:`hit_ratio_table`
uses it for the hit ratio against the KV budget in GiB, beside the paper's figures
(:data:`PAPER_HIT_RATIO`).
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lazyattention.backends import get_backend
from lazyattention.reference.layout import ceil_div
from lazyattention.reference.rope import RopeConfig

__all__ = [
    "METRIC_COLUMNS",
    "PAPER_HIT_RATIO",
    "DryRun",
    "display_units",
    "dry_run",
    "environment",
    "format_table",
    "hit_ratio_table",
    "kv_block_bytes",
    "plot_sweep",
    "run_sweep",
    "sweep_size",
    "writable_paths",
]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width text table; ``columns`` are ``(key, header, format)``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if isinstance(row[k], (int, float)) else str(row[k]) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
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


def display_units(m: dict) -> dict:
    """Metrics in display units: milliseconds and megabytes."""
    out = dict(m)
    for k in ("ttft_p50", "ttft_p99", "tpot_mean"):
        out[k] = m[k] * 1e3
    out["bytes_copied"] = m["bytes_copied"] / 1e6
    return out


def _min_blocks(workload, strategies, block_size: int) -> int:
    """The smallest budget in which every request fits alone under every strategy."""
    from lazyattention.serving.engine import blocks_needed

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

    ``progress``, when given, is called as ``progress(label, done, total)`` after every
    engine step of every run and of every warm-up (``done`` of ``total`` requests
    finished; the label names the run, or ``"warm-up: <strategy>"``), so a caller can
    show progress; :func:`sweep_size` says how many labels a sweep reports.

    Returns:
        one dict per run: the :class:`Metrics` fields plus ``sweep``, ``alpha``,
        ``budget_fraction``.
    """
    from lazyattention.serving.engine import STRATEGIES, Engine
    from lazyattention.serving.workload import make_workload, run_workload

    strategies = list(strategies or STRATEGIES)
    plan = [("skew", a, budget) for a in alphas] + [("budget", skew, f) for f in budgets]
    runs = []
    warmed = set() if warmup > 0 else set(strategies)
    for sweep, alpha, fraction in plan:
        workload = make_workload(replace(base, zipf_alpha=alpha))
        pool_blocks = sum(ceil_div(len(d), block_size) for d in workload.documents)
        num_blocks = max(math.ceil(fraction * pool_blocks), _min_blocks(workload, strategies, block_size))
        for strategy in strategies:
            if strategy not in warmed:  # compile kernels, fill allocators: not timed
                warm = Engine(model, strategy, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs)
                specs = workload.requests[:warmup]
                for spec in specs:
                    warm.add_request(spec.query, workload.request_documents(spec), spec.max_new_tokens)
                served = 0
                while warm.has_work():
                    served += len(warm.step())
                    if progress is not None:
                        progress(f"warm-up: {strategy}", served, len(specs))
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


def sweep_size(alphas, budgets, strategies, warmup: int = 2) -> int:
    """How many runs :func:`run_sweep` reports to ``progress``: one per sweep point and
    strategy, plus one warm-up per strategy."""
    return len(strategies) * (len(alphas) + len(budgets) + (warmup > 0))


def writable_paths(folder: str | Path, names: list[str]) -> list[Path]:
    """``folder / name`` for every name, after checking that each can be written.

    Creates ``folder`` (and its parents) and opens each file for appending (a file that
    did not exist is removed again), so a sweep fails before it starts, not after.

    Raises:
        ValueError: naming the path that cannot be created or written, and why.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the folder {str(folder)!r} ({exc.strerror or exc})") from exc
    paths = [folder / name for name in names]
    for path in paths:
        existed = path.exists()
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot write {str(path)!r} ({exc.strerror or exc})") from exc
        if not existed:
            path.unlink()
    return paths


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
    env.update(get_backend(backend).versions())
    return env


# --------------------------------------------------------------------------- dry runs and hit ratios

#: The paper's VRAM hit ratios at a 1 GB KV budget and Zipf skew 2.1 (DESIGN §6): its
#: model and workload, not this engine's. CacheBlend is not a strategy here.
PAPER_HIT_RATIO = {
    "alpha": 2.1,
    "budget_gib": 1.0,
    "prefix_cache": 0.0,
    "cacheblend": 0.0596,
    "block_attention": 0.0727,
    "lazy": 0.1357,
}


def kv_block_bytes(cfg, dtype: torch.dtype, block_size: int) -> int:
    """Bytes of one KV block of a model of config ``cfg``: K and V, every layer,
    ``block_size`` tokens of ``num_kv_heads × head_dim`` in ``dtype``."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


class _NoForward:
    """Stands in for the engine's model runner in a dry run: no forward pass, one
    zero logit per row (so token 0 is sampled), and the ``(batch, blocks)`` shape of
    every decode step: its requests and its longest block table."""

    def __init__(self):
        self.decode_shapes: set[tuple[int, int]] = set()

    def run(self, token_ids: torch.Tensor, step, carried=None) -> torch.Tensor:
        if step.prefill is None and step.decode is not None:
            self.decode_shapes.add((step.decode.batch_size, step.decode.max_blocks))
        return torch.zeros(step.logit_rows.numel(), 1)


def _accounting_model(vocab_size: int):
    """The smallest model the engine accepts for ``vocab_size`` (its cache holds the
    budget's blocks at a few bytes each); a dry run never calls it."""
    from lazyattention.serving.config import ModelConfig
    from lazyattention.serving.model import Model

    shape = dict(hidden_size=2, intermediate_size=2, num_layers=1, num_heads=1, num_kv_heads=1)
    return Model(ModelConfig(vocab_size=vocab_size, rope=RopeConfig(head_dim=2), **shape))


@dataclass(frozen=True)
class DryRun:
    """What a dry run of an offline burst counted.

    Attributes:
        stats: the engine's counters (:class:`~lazyattention.serving.engine.EngineStats`:
            hits and lookups, preemptions, steps, peak blocks).
        decode_shapes: ``(batch, blocks)`` of every decode step: its requests and its
            longest block table (what picks a CUDA-graph bucket).
    """

    stats: object
    decode_shapes: frozenset[tuple[int, int]]


def dry_run(
    workload, strategy, num_blocks: int, block_size: int = 16, max_num_seqs: int = 16, max_batch_tokens: int = 8192
) -> DryRun:
    """Serve ``workload`` as an offline burst (every request at once, in order) with
    the engine's scheduler and block accounting, and no forward pass.

    The engine admits, evicts, copies and preempts exactly as in a real run of the
    burst: those decisions depend on the requests (documents, lengths) and the
    budget, never on the tokens sampled or on how long a step takes. So the cache hit
    ratio (``stats.hit_ratio``: each document of a request counted once, at its first
    admission; a hit when its K/V is cached, or computed for another request of the
    same step) is the real run's.

    Raises:
        ValueError: a request needs more blocks than ``num_blocks`` under ``strategy``.
    """
    from lazyattention.serving.engine import Engine

    engine = Engine(
        _accounting_model(workload.config.vocab_size),
        strategy,
        num_blocks=num_blocks,
        block_size=block_size,
        max_batch_tokens=max_batch_tokens,
        max_num_seqs=max_num_seqs,
    )
    engine.runner = runner = _NoForward()
    for r in workload.requests:
        engine.add_request(r.query, workload.request_documents(r), r.max_new_tokens)
    engine.run_until_done()
    engine.check_invariants()
    return DryRun(engine.stats, frozenset(runner.decode_shapes))


def hit_ratio_table(
    base,
    alphas,
    budgets_gib,
    block_bytes: int,
    strategies=("prefix_cache", "block_attention", "lazy"),
    block_size: int = 16,
    max_num_seqs: int = 16,
    max_batch_tokens: int = 8192,
) -> list[dict]:
    """The cache hit ratio of each strategy against the KV budget, by :func:`dry_run`.

    Args:
        base: the workload configuration (its ``zipf_alpha`` is replaced by each of
            ``alphas``; offline burst).
        alphas: Zipf skews.
        budgets_gib: KV budgets in GiB (``2^30`` bytes).
        block_bytes: bytes of one KV block of the model the budget is for
            (:func:`kv_block_bytes`).
        strategies: the strategies, by name.
        block_size: the engine's block size.
        max_num_seqs: the engine's limit on running requests.
        max_batch_tokens: the engine's prefill tokens per step.

    Returns:
        one row per skew, budget and strategy: ``alpha``, ``budget_gib``,
        ``num_blocks`` (``floor(budget / block_bytes)``), ``pool_fraction`` (blocks ÷
        the blocks of the whole document pool), ``strategy``, ``fits``, and
        ``hit_ratio``, ``preemptions``, ``peak_blocks`` — ``None`` where a request needs
        more blocks than the budget under that strategy (``fits`` false).
    """
    from lazyattention.serving.workload import make_workload

    rows = []
    for alpha in alphas:
        workload = make_workload(replace(base, zipf_alpha=alpha))
        pool = sum(ceil_div(len(d), block_size) for d in workload.documents)
        for gib in budgets_gib:
            num_blocks = int(gib * 2**30 // block_bytes)
            row = {"alpha": alpha, "budget_gib": gib, "num_blocks": num_blocks, "pool_fraction": num_blocks / pool}
            for strategy in strategies:
                counted = None
                if num_blocks >= _min_blocks(workload, [strategy], block_size):
                    counted = dry_run(workload, strategy, num_blocks, block_size, max_num_seqs, max_batch_tokens).stats
                rows.append(
                    {
                        **row,
                        "strategy": strategy,
                        "fits": counted is not None,
                        "hit_ratio": None if counted is None else counted.hit_ratio,
                        "preemptions": None if counted is None else counted.preemptions,
                        "peak_blocks": None if counted is None else counted.peak_blocks,
                    }
                )
    return rows
