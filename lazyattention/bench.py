"""``lazyattention bench``: every strategy over a sweep of skews and KV budgets.

:func:`run_bench` builds a random-weight model and a document workload, serves it
under every strategy with :func:`~lazyattention.serving.sweep.run_sweep`, prints one
table per sweep, and writes ``<name>.json`` (the runs, the workload, the engine
settings, device and versions) and ``<name>.png`` (TTFT and throughput against skew
and against budget) to a folder. The plot needs matplotlib (``pip install
lazyattention[plot]``); without it the plot is skipped with a note and the JSON is
still written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from lazyattention.console import SweepProgress, cpu_threads_for, note, say, ticking
from lazyattention.serving.engine import STRATEGIES
from lazyattention.serving.model import random_model
from lazyattention.serving.sweep import (
    METRIC_COLUMNS,
    display_units,
    environment,
    format_table,
    plot_sweep,
    run_sweep,
    sweep_size,
    writable_paths,
)
from lazyattention.serving.workload import WorkloadConfig

__all__ = ["DTYPES", "can_plot", "output_paths", "run_bench"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def can_plot() -> bool:
    """Whether matplotlib is installed (it is optional: the ``plot`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def output_paths(out: str | Path, name: str) -> tuple[Path, Path | None]:
    """The JSON and plot files ``run_bench`` writes (the plot ``None`` without matplotlib),
    checked to be writable now.

    Raises:
        ValueError: the folder cannot be created or a file cannot be written.
    """
    names = [f"{name}.json", f"{name}.png"] if can_plot() else [f"{name}.json"]
    paths = writable_paths(out, names)
    return paths[0], (paths[1] if len(paths) > 1 else None)


def run_bench(
    out: str | Path = "bench-out",
    name: str = "engine",
    model: str = "tiny",
    backend: str = "reference",
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    requests: int = 24,
    documents: int = 12,
    doc_len: int = 48,
    docs_per_request: int = 3,
    query_len: int = 8,
    output_len: int = 4,
    rate: float = math.inf,
    alphas: Sequence[float] = (0.0, 1.0),
    budgets: Sequence[float] = (0.5, 1.0),
    skew: float = 1.0,
    budget: float = 1.0,
    block_size: int = 16,
    max_num_seqs: int = 8,
    max_batch_tokens: int = 4096,
    strategies: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Run the sweep, print its tables, write the JSON and the plot; return the result.

    Args:
        out: folder for the files (created; checked to be writable before any work).
        name: file name stem of the JSON and the plot.
        model: random-weight model shape (``"tiny"`` or ``"llama3-1b"``).
        backend: ``"reference"`` or ``"fast"``.
        device: torch device of the model and the cache.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        seed: seeds the weights and the workload.
        requests: requests per workload.
        documents: documents in the pool.
        doc_len: mean document length in tokens (log-normal, clipped to
            ``[min(8, doc_len), 4 * doc_len]``).
        docs_per_request: distinct documents per request.
        query_len: query tokens per request.
        output_len: generated tokens per request.
        rate: Poisson arrivals per second (``math.inf``: all at once).
        alphas: Zipf skews of the skew sweep (at KV budget ``budget``).
        budgets: KV budgets (× the document pool) of the budget sweep (at skew ``skew``).
        skew: Zipf skew of the budget sweep.
        budget: KV budget of the skew sweep.
        block_size: tokens per KV block.
        max_num_seqs: requests running at once.
        max_batch_tokens: prefill tokens per engine step.
        strategies: the strategies to compare (default: all).
        progress: draw progress bars on stderr.

    Returns:
        what the JSON holds: ``environment``, ``model``, ``dtype``, ``workload``,
        ``engine``, ``seconds`` and ``runs`` (one dict of metrics per run).

    Raises:
        ValueError: a bad argument, or an output path that cannot be written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    json_path, plot_path = output_paths(out, name)
    strategies = list(strategies or STRATEGIES)
    say(f"lazyattention bench: model={model} backend={backend} device={device} dtype={dtype}")
    if plot_path is None:
        say(f"matplotlib is not installed: {name}.png will be skipped (pip install lazyattention[plot])")
    start = time.perf_counter()
    cpu_threads_for(model, device)
    with ticking(f"building the {model} model (random weights) on {device}:", enabled=progress):
        net = random_model(model, backend, DTYPES[dtype], device, seed)
    params = sum(p.numel() for p in net.parameters())
    note(f"built {params / 1e6:.1f} M parameters in {time.perf_counter() - start:.1f} s", enabled=progress)
    base = WorkloadConfig(
        num_requests=requests,
        num_documents=documents,
        doc_len_mean=doc_len,
        doc_len_min=min(WorkloadConfig.doc_len_min, doc_len),
        doc_len_max=4 * doc_len,
        docs_per_request=docs_per_request,
        query_len=query_len,
        output_len=output_len,
        rate=rate,
        vocab_size=net.cfg.vocab_size,
        seed=seed,
    )
    with SweepProgress(sweep_size(alphas, budgets, strategies), enabled=progress) as bar:
        runs = run_sweep(
            net,
            base,
            list(alphas),
            list(budgets),
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_batch_tokens=max_batch_tokens,
            strategies=strategies,
            skew=skew,
            budget=budget,
            progress=bar,
        )
    for sweep, key, head in (("skew", "alpha", "alpha"), ("budget", "budget_fraction", "budget")):
        chosen = [display_units(r) for r in runs if r["sweep"] == sweep]
        if chosen:
            say(f"\nvs {sweep}:")
            say(format_table(chosen, [(key, head, "g"), *METRIC_COLUMNS]))
    env = environment(device, backend)
    result = {
        "environment": env,
        "model": model,
        "dtype": dtype,
        "workload": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(base).items()},
        "engine": {"block_size": block_size, "max_num_seqs": max_num_seqs, "max_batch_tokens": max_batch_tokens},
        "seconds": time.perf_counter() - start,
        "runs": runs,
    }
    json_path.write_text(json.dumps(result, indent=1))
    written = [json_path]
    if plot_path is not None:
        plot_sweep(runs, plot_path, f"{model}, {backend} backend, {env['device_name']}")
        written.append(plot_path)
    say(f"\nwrote {' and '.join(map(str, written))} in {result['seconds']:.1f} s")
    return result
